"""The decoding engine on the demo model (CPU, fp32): the same tokens as transformers' generate(),
batched as one at a time, the static step as the simple path, one loop for two models, Stop,
settings from a generation_config, probes equal to Compare."""

import threading

import pytest
import torch
from transformers import GenerationConfig

from ruozhi_ui import generation as g
from ruozhi_ui.config import REFERENCE_PROMPTS, GenConfig
from ruozhi_ui.decoding import (Batch, Decoder, IncrementalText, advance_together, chat_prompt_ids, decode_ids,
                                generate_batch, resolve_settings, stream_texts)
from ruozhi_ui.decoding.runners import EagerRunner, StaticRunner

SYSTEM = "你是一个有帮助的助手"
PROMPTS = ["游泳比赛时把水喝光后跑步犯规吗", "地球上有70亿人", "一些高中想提高升学率，为什么不直接招大学生？"]


def prompt(tokenizer, text: str) -> list[int]:
    return chat_prompt_ids(tokenizer, text, (), SYSTEM)


def hf_generate(model, ids: list[int], settings) -> list[int]:
    """transformers' own greedy/sampled answer with the same settings, the end token dropped."""
    x = torch.tensor([ids])
    kwargs = dict(do_sample=settings.do_sample, repetition_penalty=settings.repetition_penalty,
                  eos_token_id=list(settings.eos_token_ids), pad_token_id=settings.pad_token_id)
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=settings.max_new_tokens,
                         **kwargs)[0, x.shape[1]:].tolist()
    return out[:-1] if out and out[-1] in settings.eos_token_ids else out


def lively(seed: int):
    """The demo model with its final norm scaled by seeded noise: the plain demo model answers only newlines,
    this one writes varied tokens (so the repetition penalty and multi-byte characters matter)."""
    from ruozhi_ui.models import load_model

    m = load_model("demo", device=torch.device("cpu"), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        m.model.norm.weight.mul_(torch.randn_like(m.model.norm.weight) * 4)
    return m


@pytest.fixture
def model(demo_dir):
    return lively(7)


@pytest.fixture
def other_model(demo_dir):
    return lively(8)


def greedy(model, tokenizer, **overrides):
    return resolve_settings(model, tokenizer, GenConfig(**{"max_new_tokens": 24, **overrides}))


# ---------------------------------------------------------------- equal to generate()

def test_greedy_answer_equals_generate_with_the_same_penalty_and_end_ids(model, tokenizer):
    settings = greedy(model, tokenizer, repetition_penalty=2.0)
    for text in PROMPTS:
        ids = prompt(tokenizer, text)
        assert decode_ids(Decoder(model), [ids], settings)[0] == hf_generate(model, ids, settings)


def test_an_end_id_ends_the_answer_where_generate_ends(model, tokenizer):
    ids = prompt(tokenizer, PROMPTS[0])
    free = decode_ids(Decoder(model), [ids], greedy(model, tokenizer))[0]
    settings = greedy(model, tokenizer, eos_token_ids=(free[5], 99999))  # a token it writes at step 6
    answer = decode_ids(Decoder(model), [ids], settings)[0]
    assert answer == free[:free.index(free[5])]
    assert answer == hf_generate(model, ids, settings)


def test_sampled_answer_equals_generate_under_the_same_seed(model, tokenizer):
    settings = resolve_settings(model, tokenizer, GenConfig(max_new_tokens=24, do_sample=True, temperature=0.7,
                                                            top_p=0.8, top_k=20, repetition_penalty=1.05))
    ids = prompt(tokenizer, PROMPTS[0])
    torch.manual_seed(3)
    ours = decode_ids(Decoder(model), [ids], settings)[0]
    torch.manual_seed(3)
    assert ours == hf_generate(model, ids, settings)


# ---------------------------------------------------------------- batches and the static step

def test_left_padded_batch_of_mixed_lengths_equals_one_prompt_at_a_time(model, tokenizer):
    settings = greedy(model, tokenizer, repetition_penalty=2.0)
    rows = [prompt(tokenizer, t) for t in PROMPTS]
    assert len({len(r) for r in rows}) == 3
    assert decode_ids(Decoder(model), rows, settings) == [decode_ids(Decoder(model), [r], settings)[0] for r in rows]


def test_static_step_equals_the_simple_path_with_dummy_rows(model, tokenizer):
    # Three prompts in a 4-row slot of 256 cache slots: the CUDA path's step, run eagerly on the CPU.
    settings = greedy(model, tokenizer, repetition_penalty=2.0)
    rows = [prompt(tokenizer, t) for t in PROMPTS]
    batch = Batch(Decoder(model, static=True), rows, settings)
    assert isinstance(batch.runner, StaticRunner) and (batch.runner.slot.batch, batch.runner.slot.length) == (4, 256)
    for _ in advance_together([batch]):
        pass
    assert batch.tokens == decode_ids(Decoder(model), rows, settings)


def test_a_static_slot_is_reused_for_the_next_batch_and_gives_the_same_answers(model, tokenizer):
    settings = greedy(model, tokenizer)
    static = Decoder(model, static=True)
    rows = [prompt(tokenizer, t) for t in PROMPTS[:2]]
    first = decode_ids(static, rows, settings)
    assert decode_ids(static, rows, settings) == first
    assert list(static._slots) == [(2, 256)]


def test_the_static_slots_serve_one_batch_at_a_time(model, tokenizer):
    settings = greedy(model, tokenizer)
    static = Decoder(model, static=True)
    ids = prompt(tokenizer, PROMPTS[0])
    first, second = Batch(static, [ids], settings), Batch(static, [ids], settings)
    assert isinstance(first.runner, StaticRunner) and isinstance(second.runner, EagerRunner)
    first.close()
    second.close()
    assert isinstance(Batch(static, [ids], settings).runner, StaticRunner)


def test_a_chat_does_not_wait_for_a_missing_slot_it_is_built_behind(model, tokenizer):
    settings = greedy(model, tokenizer)
    static = Decoder(model, static=True)
    ids = prompt(tokenizer, PROMPTS[0])
    chat = Batch(static, [ids], settings, build_now=False)
    assert isinstance(chat.runner, EagerRunner)
    chat.close()
    assert static.wait_warm_up(60)
    assert list(static._slots) == [(1, 256)]
    assert isinstance(Batch(static, [ids], settings, build_now=False).runner, StaticRunner)


def test_an_answer_begun_on_the_simple_path_moves_onto_the_slot_once_built_with_the_same_tokens(model, tokenizer):
    settings = greedy(model, tokenizer, repetition_penalty=2.0)
    static = Decoder(model, static=True)
    ids = prompt(tokenizer, PROMPTS[0])
    with static._lock:  # the slots are busy: the answer starts on the simple path, the build waits
        chat = Batch(static, [ids], settings, build_now=False)
        static.start_warm_up(((1, 256),))
        ticks = advance_together([chat])
        next(ticks), next(ticks)
    assert isinstance(chat.runner, EagerRunner) and static.wait_warm_up(60)
    for _ in ticks:
        pass
    assert chat.switched_at == 2 and isinstance(chat.runner, StaticRunner)
    assert chat.tokens == decode_ids(Decoder(model), [ids], settings)


def test_the_builder_gives_every_decoder_its_short_slot_before_any_long_one(model, other_model, monkeypatch):
    from ruozhi_ui.decoding import engine

    decoders, built, real = [Decoder(model, static=True), Decoder(other_model, static=True)], [], Decoder._slot
    monkeypatch.setattr(Decoder, "_slot", lambda self, shape: built.append((decoders.index(self), shape[1]))
                        or real(self, shape))
    with engine.CAPTURE_LOCK:  # the builder starts on the first shape it was given, then waits here
        for decoder in decoders:
            decoder.start_warm_up(((1, 512), (1, 256)))
    assert all(d.wait_warm_up(60) for d in decoders)
    assert built == [(0, 256), (1, 256), (0, 512), (1, 512)]


# ---------------------------------------------------------------- one loop, Stop

def test_one_loop_advances_both_models_a_token_each_per_tick(model, other_model, tokenizer):
    settings = greedy(model, tokenizer, max_new_tokens=6, eos_token_ids=())
    ids = prompt(tokenizer, PROMPTS[0])
    batches = [Batch(Decoder(model), [ids], settings), Batch(Decoder(other_model), [ids], settings)]
    assert list(advance_together(batches)) == [[[0], [0]]] * 6


def test_the_pair_in_one_loop_gives_each_models_own_answer(model, other_model, tokenizer):
    settings = greedy(model, tokenizer, repetition_penalty=2.0)
    ids = prompt(tokenizer, PROMPTS[1])
    jobs = [(Decoder(m), tokenizer, ids, settings) for m in (model, other_model)]
    texts = list(stream_texts(jobs))
    alone = [tokenizer.decode(decode_ids(Decoder(m), [ids], settings)[0], skip_special_tokens=True)
             for m in (model, other_model)]
    assert texts[-1] == tuple(alone) and alone[0] != alone[1]
    for side in (0, 1):
        assert all(b.startswith(a) for a, b in zip([t[side] for t in texts], [t[side] for t in texts[1:]]))


def test_cancel_stops_decoding_at_the_next_token(model, tokenizer):
    settings = greedy(model, tokenizer, max_new_tokens=60, eos_token_ids=())
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        cancel = threading.Event()
        batch = Batch(Decoder(model), [prompt(tokenizer, PROMPTS[0])], settings)
        for tick, _ in enumerate(advance_together([batch], cancel), start=1):
            if tick == 3:
                cancel.set()
    finally:
        handle.remove()
    assert calls[0] == 3 and len(batch.tokens[0]) == 3 and batch.done


def test_closing_a_stream_releases_the_static_slot(model, tokenizer):
    settings = greedy(model, tokenizer, max_new_tokens=60)
    static = Decoder(model, static=True)
    ids = prompt(tokenizer, PROMPTS[0])
    static.start_warm_up(((1, 256),))
    assert static.wait_warm_up(60)
    stream = stream_texts([(static, tokenizer, ids, settings)])
    next(stream)
    assert static._lock.locked()
    stream.close()
    assert not static._lock.locked()


# ---------------------------------------------------------------- settings

def test_none_fields_take_the_models_generation_config_and_the_app_stays_greedy(model, tokenizer):
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                               repetition_penalty=1.05, eos_token_id=[2, 0], pad_token_id=0)
    s = resolve_settings(model, tokenizer, GenConfig())
    assert (s.do_sample, s.repetition_penalty, s.eos_token_ids) == (False, 1.05, (2, 0))
    assert (s.temperature, s.top_p, s.top_k) == (0.7, 0.8, 20)
    assert s.describe() == ("greedy · repetition penalty 1.05 (model) · stops at <|im_end|>, <|endoftext|> (model) · "
                            "at most 151 new tokens")
    own = resolve_settings(model, tokenizer, GenConfig(do_sample=None))
    assert own.describe() == ("sampling (model): temperature 0.7 (model), top-p 0.8 (model), top-k 20 (model) · "
                              "repetition penalty 1.05 (model) · stops at <|im_end|>, <|endoftext|> (model) · "
                              "at most 151 new tokens")


def test_set_fields_override_the_model(model, tokenizer):
    model.generation_config = GenerationConfig(repetition_penalty=1.05, eos_token_id=[2, 0])
    s = resolve_settings(model, tokenizer, GenConfig(max_new_tokens=9, repetition_penalty=1.0, eos_token_ids=(5,)))
    assert (s.max_new_tokens, s.repetition_penalty, s.eos_token_ids, s.from_model) == (
        9, 1.0, (5,), ("temperature", "top_p", "top_k"))


def test_unset_values_are_transformers_defaults_and_the_chat_end_is_always_an_end_id(model, tokenizer):
    model.generation_config = GenerationConfig(eos_token_id=0)  # a base model's config: <|endoftext|> only
    s = resolve_settings(model, tokenizer, GenConfig(do_sample=None))
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (False, 1.0, 1.0, 50, 1.0)
    assert s.eos_token_ids == (0, 2)  # <|endoftext|>, then <|im_end|> from the chat template


# ---------------------------------------------------------------- text, probes

def test_incremental_text_only_grows_and_ends_as_the_full_decode(tokenizer):
    ids = tokenizer("弱智吧里没有弱智，only 聪明人 🤔。", add_special_tokens=False).input_ids
    text, seen = IncrementalText(tokenizer), []
    for token in ids:
        if text.add(token):
            seen.append(text.text)
    text.finish()
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:]))
    assert text.text == "弱智吧里没有弱智，only 聪明人 🤔。" == tokenizer.decode(ids)


def test_probe_answers_equal_compare_answers_from_the_same_weights(model, tokenizer):
    model.generation_config.repetition_penalty = 2.0  # the model's own setting reaches both places
    gen = GenConfig(max_new_tokens=16)
    probes = generate_batch(model, tokenizer, REFERENCE_PROMPTS, SYSTEM, gen)  # one left-padded batch
    loaded = g.LoadedModel(model, tokenizer, "base: demo", "demo", "base")
    compare = [list(g.stream_answer(loaded, p, [], SYSTEM, gen, threading.Event()))[-1] for p in REFERENCE_PROMPTS]
    assert probes == compare
    assert probes != generate_batch(model, tokenizer, REFERENCE_PROMPTS, SYSTEM,
                                    GenConfig(max_new_tokens=16, repetition_penalty=1.0))


def test_probes_under_the_training_steps_causal_only_attention_equal_the_plain_models(model, tokenizer):
    # The CUDA training step sets an attention implementation whose mask builder returns None
    # (cuda/layers.py: use_causal_only_attention); the probes then run on that model. Left-padded
    # batches carry their own 4D masks, so the answers stay those of the plain model.
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    gen = GenConfig(max_new_tokens=12, repetition_penalty=2.0)
    plain = generate_batch(model, tokenizer, REFERENCE_PROMPTS, SYSTEM, gen)
    AttentionInterface.register("test_causal_only", sdpa_attention_forward)
    AttentionMaskInterface.register("test_causal_only", lambda *args, **kwargs: None)
    model.set_attn_implementation("test_causal_only")
    assert generate_batch(model, tokenizer, REFERENCE_PROMPTS, SYSTEM, gen) == plain
    assert generate_batch(model, tokenizer, REFERENCE_PROMPTS, SYSTEM, gen, decoder=Decoder(model, static=True)) == plain


def test_generate_batch_leaves_a_training_model_in_training_mode(model, tokenizer):
    model.train()
    generate_batch(model, tokenizer, ["你好"], SYSTEM, GenConfig(max_new_tokens=3))
    assert model.training
