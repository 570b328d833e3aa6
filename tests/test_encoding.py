"""The training objective: what is labelled, what is padded, and that packing changes nothing."""

import pytest
import torch

from ruozhi_ui.data import Record
from ruozhi_ui.encoding import (IGNORE_INDEX, batch_token_ids, collate_packed, collate_padded, encode_prompt,
                                encode_record, encode_records, end_of_turn_id, length_grouped_batches, render_prompt)
from ruozhi_ui.train.loss import batch_loss_sum, label_positions

SYSTEM = "你是一个有帮助的助手"
RECORDS = [
    Record("为什么天空是蓝色的", "因为空气把蓝光散射得更多。"),
    Record("鱼会不会口渴", "鱼生活在水里，通过鳃和皮肤调节水分，不会像人一样感到口渴。"),
    Record("一加一在什么情况下等于三", "在普通算术里一加一永远等于二，等于三只是玩笑。"),
]


def encode(tokenizer, record, max_source=62, max_target=151):
    return encode_record(tokenizer, record, SYSTEM, max_source, max_target)


def test_labels_cover_exactly_the_answer_and_end_token(tokenizer):
    e = encode(tokenizer, RECORDS[0])
    prompt_ids = tokenizer(render_prompt(tokenizer, RECORDS[0], SYSTEM), add_special_tokens=False).input_ids
    answer_ids = tokenizer(RECORDS[0].output, add_special_tokens=False).input_ids
    assert e.input_ids == prompt_ids + answer_ids + [end_of_turn_id(tokenizer)]
    assert e.labels == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [end_of_turn_id(tokenizer)]
    assert e.prompt_len == len(prompt_ids)


def test_end_token_is_im_end(tokenizer):
    e = encode(tokenizer, RECORDS[1])
    assert tokenizer.convert_ids_to_tokens(e.labels[-1]) == "<|im_end|>"


def test_no_padding_inside_an_example(tokenizer):
    pad = tokenizer.pad_token_id
    for r in RECORDS:
        assert pad not in encode(tokenizer, r).input_ids


def test_prompt_truncation_keeps_the_assistant_header(tokenizer):
    long = Record("为什么" * 200, "短答案。")
    ids, truncated = encode_prompt(tokenizer, long, SYSTEM, max_source_length=40)
    full_ids, _ = encode_prompt(tokenizer, long, SYSTEM, max_source_length=10_000)
    header = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert truncated and len(ids) == 40
    assert ids[-len(header):] == header
    assert ids[:40 - len(header)] == full_ids[:40 - len(header)]


def test_a_truncated_answer_gets_no_end_token_label(tokenizer):
    # A label on <|im_end|> after a cut answer teaches the model to stop mid-sentence.
    e = encode(tokenizer, Record("问题", "很长的回答。" * 100), max_target=5)
    assert e.answer_truncated
    assert len(e.input_ids) - e.prompt_len == 5
    assert end_of_turn_id(tokenizer) not in e.labels
    kept = encode_record(tokenizer, Record("问题", "很长的回答。" * 100), SYSTEM, 62, 5, label_truncated_end=True)
    assert kept.labels[-1] == end_of_turn_id(tokenizer)


def test_collate_pads_on_the_right_only(tokenizer):
    a, b = encode(tokenizer, RECORDS[0]), encode(tokenizer, RECORDS[1])
    batch = collate_padded([a, b], tokenizer.pad_token_id)
    short, long_ = sorted([a, b], key=len)
    row = [a, b].index(short)
    n = len(short)
    assert batch["input_ids"][row, :n].tolist() == short.input_ids
    assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(long_) - n)
    assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (len(long_) - n)


def test_packed_position_ids_restart_per_example(tokenizer):
    examples = [encode(tokenizer, r) for r in RECORDS]
    packed = collate_packed(examples)
    expected = sum((list(range(len(e))) for e in examples), [])
    assert packed["position_ids"][0].tolist() == expected
    assert packed["input_ids"].shape == (1, sum(len(e) for e in examples))


def _loss_sum(model, batch):
    batch = dict(batch)
    batch["positions"], batch["targets"] = label_positions(batch.pop("labels"))
    return batch_loss_sum(model, batch), batch["targets"].numel()


def test_packed_loss_equals_one_at_a_time_loss(tokenizer, demo_model):
    demo_model.eval()
    examples = [encode(tokenizer, r) for r in RECORDS]
    with torch.no_grad():
        singles = [_loss_sum(demo_model, collate_padded([e], tokenizer.pad_token_id)) for e in examples]
        packed_sum, packed_n = _loss_sum(demo_model, collate_packed(examples))
        padded_sum, padded_n = _loss_sum(demo_model, collate_padded(examples, tokenizer.pad_token_id))
    single_mean = sum(s for s, _ in singles) / sum(n for _, n in singles)
    assert packed_n == padded_n == sum(n for _, n in singles)
    assert abs((packed_sum / packed_n).item() - single_mean.item()) < 1e-5
    assert abs((padded_sum / padded_n).item() - single_mean.item()) < 1e-5


def test_chunked_loss_equals_plain_cross_entropy(tokenizer, demo_model):
    demo_model.eval()
    batch = collate_padded([encode(tokenizer, r) for r in RECORDS], tokenizer.pad_token_id)
    with torch.no_grad():
        ours, n = _loss_sum(demo_model, batch)
        reference = demo_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               labels=batch["labels"]).loss
    assert abs((ours / n).item() - reference.item()) < 1e-5


def test_length_grouped_batches_cover_every_example_once():
    lengths = [5, 50, 7, 48, 6, 49, 8, 47, 9, 46, 10, 45]
    batches = length_grouped_batches(lengths, batch_size=2, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == length_grouped_batches(lengths, batch_size=2, seed=3)
    # sorted within a chunk, so pairs hold neighbours in length
    assert max(abs(lengths[b[0]] - lengths[b[-1]]) for b in batches) <= 1


@pytest.mark.parametrize("max_source, max_target", [(62, 151), (20, 6)])
def test_encoding_a_batch_gives_what_encoding_each_record_gives(tokenizer, max_source, max_target):
    records = RECORDS + [Record("", "没有问题也有回答"), Record("很长的问题" * 20, "很长的回答" * 20)]
    batch = encode_records(tokenizer, records, SYSTEM, max_source, max_target)
    for record, example in zip(records, batch, strict=True):
        prompt, truncated = encode_prompt(tokenizer, record, SYSTEM, max_source)
        answer = tokenizer(record.output, add_special_tokens=False).input_ids
        end = [] if len(answer) > max_target else [end_of_turn_id(tokenizer)]
        assert example.input_ids == prompt + answer[:max_target] + end
        assert example.prompt_len == len(prompt) and example.prompt_truncated == truncated
        assert example.answer_truncated == (len(answer) > max_target)
    assert batch[-1].prompt_truncated
    assert batch[0].answer_truncated == (max_target == 6)
    assert encode_records(tokenizer, [], SYSTEM, max_source, max_target) == []


def test_batch_token_ids_are_the_tokenizer_s_own_with_or_without_its_backend(tokenizer, monkeypatch):
    texts = ["为什么天空是蓝色的", "<|im_start|>user\n鱼会不会口渴<|im_end|>", ""]
    expected = tokenizer(texts, add_special_tokens=False).input_ids
    assert batch_token_ids(tokenizer, texts) == expected
    tokenizer.backend_tokenizer.enable_truncation(3)  # a backend that truncates: go through transformers
    try:
        assert batch_token_ids(tokenizer, texts) == expected
    finally:
        tokenizer.backend_tokenizer.no_truncation()



# --- the prompt is split in token space (issue #18 a) -----------------------------------------------
TRICKY = ["a", "start", "im", "user", "system", "assistant", "你", SYSTEM]


@pytest.mark.parametrize("instruction", TRICKY)
def test_an_untruncated_prompt_is_the_tokenizers_own(tokenizer, instruction):
    record = Record(instruction, "回答")
    own = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}],
                                        add_generation_prompt=True, tokenize=True)
    own = own["input_ids"] if isinstance(own, dict) or hasattr(own, "keys") else own
    e = encode(tokenizer, record)
    assert e.input_ids[:e.prompt_len] == list(own)
    assert e.input_ids[e.prompt_len:] == tokenizer("回答", add_special_tokens=False).input_ids + [end_of_turn_id(tokenizer)]


@pytest.mark.parametrize("instruction", TRICKY)
def test_a_short_max_source_length_cuts_the_user_text_and_keeps_the_assistant_header(tokenizer, instruction):
    record = Record(instruction * 30, "回答")
    header = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    full = encode(tokenizer, record, max_source=10_000)
    template = full.prompt_len - len(tokenizer(instruction * 30, add_special_tokens=False).input_ids)
    cut = encode(tokenizer, record, max_source=template + 2)
    assert cut.prompt_truncated and cut.prompt_len == template + 2
    assert cut.input_ids[cut.prompt_len - len(header):cut.prompt_len] == header
    assert cut.input_ids[:cut.prompt_len - len(header) - 2] == full.input_ids[:cut.prompt_len - len(header) - 2]


# --- multi-turn records train every answer (issue #18 c) -------------------------------------------
def test_every_assistant_turn_of_a_multi_turn_record_is_labelled(tokenizer):
    end = end_of_turn_id(tokenizer)
    record = Record("第三问", "第三答", history=(("第一问", "第一答"), ("第二问", "第二答")))
    messages = [{"role": "system", "content": SYSTEM}]
    for u, a in [("第一问", "第一答"), ("第二问", "第二答"), ("第三问", "第三答")]:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    own = tokenizer(rendered, add_special_tokens=False).input_ids
    e = encode(tokenizer, record)  # max_source 62 bounds the last turn; the history comes on top of it
    assert e.input_ids == own[:len(e.input_ids)] and len(own) - len(e.input_ids) == 1  # all but the final "\n"
    labelled = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    answers = [tokenizer(a, add_special_tokens=False).input_ids + [end] for a in ("第一答", "第二答", "第三答")]
    assert labelled == [t for a in answers for t in a]
    only_last = encode_record(tokenizer, record, SYSTEM, 62, 151, train_all_turns=False)
    assert [t for t, lab in zip(only_last.input_ids, only_last.labels) if lab != IGNORE_INDEX] == answers[-1]


# --- issue 23: defects 2, 5 and 8 -----------------------------------------------------------------
@pytest.fixture(scope="module")
def merging_tokenizer(tokenizer):
    """The demo tokenizer with one more merge, "\\n\\n" -> one token, as Qwen2.5's vocabulary has."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["ĊĊ"] = max(max(vocab.values()), *(t["id"] for t in spec["added_tokens"])) + 1
    spec["model"]["merges"].append(["Ċ", "Ċ"])
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = tokenizer.chat_template
    return fast


def test_an_instruction_starting_with_a_newline_encodes_as_the_chat_template_does(merging_tokenizer):
    record = Record("\n为什么天空是蓝色的", "回答")
    own = merging_tokenizer(render_prompt(merging_tokenizer, record, SYSTEM), add_special_tokens=False).input_ids
    e = encode_record(merging_tokenizer, record, SYSTEM, 10_000, 151)
    assert e.input_ids[:e.prompt_len] == own


def test_a_system_prompt_that_leaves_no_room_for_the_question_is_refused(tokenizer):
    from ruozhi_ui.encoding import check_questions_kept
    from ruozhi_ui.errors import ConfigError

    long_system = "你是一个有帮助的助手" * 12
    examples = encode_records(tokenizer, RECORDS, long_system, 62, 151)
    with pytest.raises(ConfigError, match="max_source_length 62 leaves no room for the question in 3 of 3"):
        check_questions_kept(examples, 62)


def test_control_token_text_in_training_data_stays_the_control_token(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    injected, plain = encode(tokenizer, Record("问<|im_end|>题", "回答")), encode(tokenizer, Record("问题", "回答"))
    assert injected.input_ids[:injected.prompt_len].count(im_end) == plain.input_ids[:plain.prompt_len].count(im_end) + 1


def test_control_token_text_typed_in_a_chat_is_read_as_plain_text(tokenizer):
    from ruozhi_ui.encoding import prompt_ids

    ids = prompt_ids(tokenizer, Record("问<|im_end|>题", ""), SYSTEM)
    plain = prompt_ids(tokenizer, Record("问题", ""), SYSTEM)
    controls = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert sum(i in controls for i in ids) == sum(i in controls for i in plain)
    assert tokenizer.decode(ids) == render_prompt(tokenizer, Record("问<|im_end|>题", ""), SYSTEM)


def test_records_with_control_token_text_are_counted(tokenizer):
    from ruozhi_ui.encoding import count_control_token_records

    records = RECORDS + [Record("a<|im_start|>b", "c"), Record("q", "a", history=(("<|endoftext|>", "x"),))]
    assert count_control_token_records(tokenizer, records) == 2


def test_a_run_whose_system_prompt_leaves_no_question_is_refused_before_its_folder(tmp_path):
    import threading

    from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
    from ruozhi_ui.errors import ConfigError
    from ruozhi_ui.train import loop

    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample", system_prompt=SYSTEM * 12),
                      epochs=1, max_steps=1, probe_prompts=(), device="cpu")
    with pytest.raises(ConfigError, match="leaves no room for the question in 211 of 211 examples"):
        loop.train(cfg, stop_event=threading.Event(), runs_root=tmp_path)
    assert not list(tmp_path.iterdir())
