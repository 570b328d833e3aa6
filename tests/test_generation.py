"""Generation on the demo model: prompt parity with training, streaming, real cancel, the pair, the cache, A/B."""

import threading
from pathlib import Path

import pytest
import torch

from ruozhi_ui import generation as g
from ruozhi_ui.config import DataConfig, GenConfig, ModelConfig, TrainConfig, save_config
from ruozhi_ui.data import Record
from ruozhi_ui.encoding import IGNORE_INDEX, collate_padded, encode_prompt, encode_record, render_prompt
from ruozhi_ui.errors import GenerationError, ModelLoadError

SYSTEM = "你是一个有帮助的助手"
PROMPT = "游泳比赛时把水喝光后跑步犯规吗"
CPU = torch.device("cpu")
MODELS = g.ModelCache()  # one app's cache, shared by this module's tests


def make_checkpoint(model, tokenizer, folder: Path, method="full", system_prompt="你是弱智吧吧友") -> Path:
    """A checkpoint folder as the engine writes one: weights, tokenizer, run_config.json."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample", system_prompt=system_prompt),
                      method=method)
    save_config(cfg, folder / "run_config.json")
    return folder


@pytest.fixture
def base():
    return MODELS.get("demo", device=CPU)


@pytest.fixture
def tuned_dir(tmp_path, demo_model, tokenizer):
    """The demo model with its final norm scaled by seeded noise: same shapes, different answers."""
    torch.manual_seed(1)
    with torch.no_grad():
        demo_model.model.norm.weight.mul_(torch.randn_like(demo_model.model.norm.weight) * 4)
    return make_checkpoint(demo_model, tokenizer, tmp_path / "runs" / "myrun" / "checkpoints" / "final")


@pytest.fixture
def tuned(tuned_dir):
    return MODELS.get(str(tuned_dir), device=CPU)


@pytest.fixture
def count_forwards():
    """count_forwards(model) -> [n]: forward passes generate() made, one per generated token."""
    handles = []

    def attach(model) -> list[int]:
        calls = [0]

        def hook(*_):
            calls[0] += 1

        handles.append(model.register_forward_hook(hook))
        return calls

    yield attach
    for handle in handles:  # the model is cached: leave it as we found it
        handle.remove()


def generation_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("ruozhi-generate", "ruozhi-pair"))]


def assert_growing(texts):
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before) and len(after) > len(before)


def test_generation_prompt_equals_training_prompt(tokenizer):
    history = [("你好", "你好！"), ("1+1", "2")]
    record = Record(instruction=PROMPT, output="", history=tuple(history))
    assert g.build_generation_prompt(tokenizer, PROMPT, history, SYSTEM) == render_prompt(tokenizer, record, SYSTEM)


def test_generation_prompt_ids_equal_encode_prompt_ids(base):
    expected, truncated = encode_prompt(base.tokenizer, Record(instruction=PROMPT, output=""), SYSTEM, 10_000)
    ids = g.prompt_ids(base, PROMPT, [], SYSTEM, GenConfig())
    assert not truncated
    assert ids[0].tolist() == expected


def test_stream_answer_yields_growing_text_and_ends(base):
    cancel = threading.Event()
    texts = list(g.stream_answer(base, PROMPT, [], SYSTEM, GenConfig(max_new_tokens=20), cancel))
    assert texts
    assert_growing(texts)
    assert cancel.is_set() and generation_threads() == []


def test_stream_answer_final_text_equals_the_non_streamed_answer(base):
    gen = GenConfig(max_new_tokens=20)
    texts = list(g.stream_answer(base, PROMPT, [], SYSTEM, gen, threading.Event()))
    assert texts[-1] == g.generate_answer(base, PROMPT, SYSTEM, gen)[0]


def test_setting_cancel_stops_generate_before_max_new_tokens(demo_dir, count_forwards):
    loaded = MODELS.get(str(demo_dir), device=CPU)
    gen = GenConfig(max_new_tokens=60)
    forwards = count_forwards(loaded.model)
    list(g.stream_answer(loaded, PROMPT, [], SYSTEM, gen, threading.Event()))
    assert forwards[0] == 60  # uncancelled, this prompt runs to the limit

    forwards[0] = 0
    cancel = threading.Event()
    stream = g.stream_answer(loaded, PROMPT, [], SYSTEM, gen, cancel)
    next(stream)
    cancel.set()
    list(stream)
    assert generation_threads() == []
    assert forwards[0] < 60


def test_closing_the_stream_stops_generate(demo_dir, count_forwards):
    loaded = MODELS.get(str(demo_dir), device=CPU)
    forwards = count_forwards(loaded.model)
    cancel = threading.Event()
    stream = g.stream_answer(loaded, PROMPT, [], SYSTEM, GenConfig(max_new_tokens=60), cancel)
    next(stream)
    stream.close()  # what a cancelled Gradio event does to its generator
    assert cancel.is_set() and generation_threads() == []
    assert forwards[0] < 60


def test_stream_pair_grows_both_panes_and_ends_with_each_models_answer(base, tuned):
    gen = GenConfig(max_new_tokens=20)
    pairs = list(g.stream_pair(base, tuned, PROMPT, [], [], SYSTEM, gen, threading.Event()))
    for side in (0, 1):
        texts = [p[side] for p in pairs]
        for before, after in zip(texts, texts[1:]):
            assert after.startswith(before)
    assert pairs[-1] == (g.generate_answer(base, PROMPT, SYSTEM, gen)[0], g.generate_answer(tuned, PROMPT, SYSTEM, gen)[0])
    assert generation_threads() == []


def test_closing_stream_pair_stops_both_generations(base, tuned):
    cancel = threading.Event()
    pair = g.stream_pair(base, tuned, PROMPT, [], [], SYSTEM, GenConfig(max_new_tokens=400), cancel)
    next(pair)
    pair.close()
    assert cancel.is_set() and generation_threads() == []


def test_tuned_label_names_the_checkpoint_and_its_weights_differ_from_base(base, tuned, tuned_dir):
    assert base.label == "base: demo (tiny offline model, random weights)"
    assert tuned.label == f"tuned: {tuned_dir} (full, from demo)"
    assert tuned.kind == "full" and tuned.trained_from == "demo"
    assert not torch.equal(base.model.model.norm.weight, tuned.model.model.norm.weight)
    gen = GenConfig(max_new_tokens=20)
    assert g.generate_answer(base, PROMPT, SYSTEM, gen)[0] != g.generate_answer(tuned, PROMPT, SYSTEM, gen)[0]


def test_lora_checkpoint_loads_as_adapter_over_its_base(tmp_path, demo_model, tokenizer, base):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    peft_model = get_peft_model(demo_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # B starts at zero: make the adapter do something
    folder = make_checkpoint(peft_model, tokenizer, tmp_path / "r" / "checkpoints" / "epoch-1", method="lora")
    loaded = MODELS.get(str(folder), device=CPU)
    assert loaded.kind == "lora"
    assert loaded.label == f"tuned: {folder} (LoRA r=8 on demo)"
    gen = GenConfig(max_new_tokens=20)
    assert g.generate_answer(loaded, PROMPT, SYSTEM, gen)[0] != g.generate_answer(base, PROMPT, SYSTEM, gen)[0]


def test_get_model_returns_the_same_object_twice(base):
    assert MODELS.get("demo", device=CPU) is base


def test_concurrent_get_model_loads_once(tuned_dir, monkeypatch):
    MODELS.clear()
    loads = []
    real = g._load_uncached
    monkeypatch.setattr(g, "_load_uncached", lambda *a: loads.append(a) or real(*a))
    results = []
    threads = [threading.Thread(target=lambda: results.append(MODELS.get(str(tuned_dir), device=CPU)))
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(loads) == 1
    assert all(r is results[0] for r in results)


def test_cache_evicts_the_least_recently_used_model(tuned_dir, demo_dir):
    cache = g.ModelCache(size=1)
    first = cache.get("demo", device=CPU)
    cache.get(str(tuned_dir), device=CPU)
    assert cache.labels() == [f"tuned: {tuned_dir} (full, from demo)"]
    assert cache.get("demo", device=CPU) is not first


def test_checkpoint_system_prompt_comes_from_run_config(tuned_dir):
    assert g.checkpoint_system_prompt(tuned_dir) == "你是弱智吧吧友"


def test_empty_prompt_is_a_clear_error(base):
    with pytest.raises(GenerationError, match="message is empty"):
        next(g.stream_answer(base, "   ", [], SYSTEM, GenConfig(), threading.Event()))


def test_prompt_longer_than_the_context_is_a_clear_error(base):
    with pytest.raises(GenerationError, match="reads at most 1024 tokens and 1000 are kept for the answer"):
        next(g.stream_answer(base, PROMPT * 3, [], SYSTEM, GenConfig(max_new_tokens=1000), threading.Event()))


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        MODELS.get(str(tmp_path / "runs" / "gone" / "checkpoints" / "final"), device=CPU)


def test_checkpoint_with_another_vocabulary_is_refused(tmp_path, tokenizer, base):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer) + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    folder = make_checkpoint(Qwen2ForCausalLM(config), tokenizer, tmp_path / "x" / "checkpoints" / "final")
    other = MODELS.get(str(folder), device=CPU)
    with pytest.raises(GenerationError, match=f"vocabulary {len(tokenizer) + 64}"):
        g.check_pair(base, other)


def test_batch_ab_gives_one_row_per_prompt_with_both_answers(base, tuned):
    prompts, refs = ["地球上有70亿人", "一些高中想提高升学率"], ["参考一", "参考二，含逗号"]
    rows = g.batch_ab(base, tuned, prompts, refs, SYSTEM, GenConfig(max_new_tokens=8))
    assert [r["prompt"] for r in rows] == prompts and [r["reference"] for r in rows] == refs
    for row, prompt in zip(rows, prompts):
        assert (row["base_answer"], row["base_len"]) == g.generate_answer(base, prompt, SYSTEM, GenConfig(max_new_tokens=8))
        assert (row["tuned_answer"], row["tuned_len"]) == g.generate_answer(tuned, prompt, SYSTEM, GenConfig(max_new_tokens=8))
        assert list(row) == ["index", *g.AB_COLUMNS]
    assert [r["index"] for r in rows] == [0, 1]


def test_ab_rows_come_batch_by_batch_shortest_prompts_first_each_with_its_index(base, tuned, monkeypatch):
    monkeypatch.setattr("ruozhi_ui.decoding.chat.AB_BATCH_ROWS", 2)
    prompts = ["一二三四五六七八九十", "一", "一二三四五", "一二", "一二三四五六七"]
    rows = list(g.iter_batch_ab(base, tuned, prompts, None, SYSTEM, GenConfig(max_new_tokens=4)))
    assert [r["index"] for r in rows] == [1, 3, 2, 4, 0]
    assert [r["prompt"] for r in rows] == [prompts[i] for i in (1, 3, 2, 4, 0)]


def test_stop_during_ab_ends_it_without_the_unfinished_batch(base, tuned, monkeypatch):
    monkeypatch.setattr("ruozhi_ui.decoding.chat.AB_BATCH_ROWS", 2)
    cancel = threading.Event()
    rows = []
    for row in g.iter_batch_ab(base, tuned, ["一", "一二", "一二三", "一二三四"], None, SYSTEM,
                               GenConfig(max_new_tokens=4), cancel):
        rows.append(row["index"])
        cancel.set()  # Stop pressed once the first rows are in
    assert rows == [0, 1]


def test_settings_line_names_each_value_and_where_it_came_from(base):
    assert g.describe_settings(base, GenConfig()) == (
        "greedy · no repetition penalty (model) · stops at <|im_end|> (model) · at most 151 new tokens")
    assert g.describe_settings(base, GenConfig(max_new_tokens=20, repetition_penalty=1.1, eos_token_ids=())) == (
        "greedy · repetition penalty 1.1 · never stops early · at most 20 new tokens")


def test_validation_loss_of_one_record_equals_the_transformers_loss(base):
    record = Record(instruction=PROMPT, output="不犯规，因为水已经喝光了。")
    ex = encode_record(base.tokenizer, record, SYSTEM, 62, 151)
    batch = collate_padded([ex], 0)
    with torch.no_grad():
        expected = base.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert g.validation_loss(base, [record], SYSTEM, 62, 151) == pytest.approx(expected, rel=1e-5)
    assert sum(label != IGNORE_INDEX for label in ex.labels) > 1
