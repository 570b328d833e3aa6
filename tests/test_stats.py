"""Token-length statistics: the formulas on a hand-checked fixture, the prompt count on the demo tokenizer."""

import json
import math
from types import SimpleNamespace

import pytest

from ruozhi_ui.data import Record
from ruozhi_ui.encoding import encode_prompt
from ruozhi_ui.errors import DataFormatError
from ruozhi_ui.stats import compute_stats, format_table, reference_table, stats_to_dict, summarize


class CharTokenizer:
    """One token per character; the 'chat template' wraps each message in [] and adds '>'."""

    def __call__(self, text, add_special_tokens=True):
        ids = [list(range(len(t))) for t in text] if isinstance(text, list) else list(range(len(text)))
        return SimpleNamespace(input_ids=ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"[{m['content']}]" for m in messages) + (">" if add_generation_prompt else "")


# instruction lengths 1, 2, 3, 4, 10; output lengths 50, 10, 15, 20, 5.
# With system prompt "S" the prompt is "[S]" + "[instr]" + ">" = len(instr) + 6: 7, 8, 9, 10, 16.
INSTR_LENS = [1, 2, 3, 4, 10]
OUTPUT_LENS = [50, 10, 15, 20, 5]
RECORDS = [Record(instruction="i" * a, output="o" * b) for a, b in zip(INSTR_LENS, OUTPUT_LENS)]


def fixture_stats(**kw):
    args = dict(max_source_length=9, max_target_length=12, batch_size=5)
    args.update(kw)
    return compute_stats(RECORDS, CharTokenizer(), "S", **args)


def test_instruction_summary_matches_hand_computation():
    # sorted 1,2,3,4,10: mean 20/5 = 4; linear percentile at index q*(n-1):
    # p50 -> idx 2 -> 3; p90 -> idx 3.6 -> 4 + 0.6*6 = 7.6; p95 -> idx 3.8 -> 4 + 0.8*6 = 8.8;
    # p99 -> idx 3.96 -> 4 + 0.96*6 = 9.76
    s = fixture_stats().instruction
    assert (s.min, s.max) == (1, 10)
    assert s.mean == 4.0
    assert (s.p50, s.p90) == (3.0, pytest.approx(7.6))
    assert s.p95 == pytest.approx(8.8)
    assert s.p99 == pytest.approx(9.76)


def test_output_summary_matches_hand_computation():
    # sorted 5,10,15,20,50: mean 100/5 = 20; p95 -> idx 3.8 -> 20 + 0.8*30 = 44
    s = fixture_stats().output
    assert (s.min, s.max, s.mean, s.p50) == (5, 50, 20.0, 15.0)
    assert s.p95 == pytest.approx(44.0)


def test_prompt_and_total_lengths_include_template_and_end_token():
    # prompt = instr + 6; total = prompt + output + 1 = 58, 19, 25, 31, 22
    st = fixture_stats()
    assert st.lengths["prompt"] == [7, 8, 9, 10, 16]
    assert st.lengths["total"] == [58, 19, 25, 31, 22]
    assert (st.total.min, st.total.max, st.total.mean) == (19, 58, 31.0)


def test_truncation_shares_count_each_limit():
    # prompt > 9: records 3, 4 -> 2/5; output > 12: records 0, 2, 3 -> 3/5; either: 0, 2, 3, 4 -> 4/5
    st = fixture_stats()
    assert st.prompt_truncated_share == 0.4
    assert st.output_truncated_share == 0.6
    assert st.any_truncated_share == 0.8


def test_padding_waste_reference_pads_every_row_to_both_limits():
    # capped lengths min(p,9)+min(o,12)+1 = 20, 19, 22, 22, 15 (sum 98); width 9+12+1 = 22
    # -> 1 - 98/110 = 12/110
    assert fixture_stats().padding_waste_reference == pytest.approx(12 / 110)


def test_padding_waste_grouped_pads_each_batch_to_its_longest():
    # batch_size 2, sorted 22, 22 | 20, 19 | 15 -> pads 0 + 1 + 0 = 1 over 44 + 40 + 15 = 99 slots
    assert fixture_stats(batch_size=2).padding_waste_grouped == pytest.approx(1 / 99)


def test_suggestions_are_ceil_of_p95():
    # prompt p95 = 8.8 + 6 = 14.8 -> 15; output p95 = 44.0 -> 44
    st = fixture_stats()
    assert (st.suggested_max_source_length, st.suggested_max_target_length) == (15, 44)


def test_subsample_is_seeded_and_flagged():
    a = fixture_stats(max_records=3)
    b = fixture_stats(max_records=3)
    assert (a.n, a.n_total, a.subsampled) == (3, 5, True)
    assert a.lengths == b.lengths
    assert not fixture_stats().subsampled


def test_empty_records_raise_data_format_error():
    with pytest.raises(DataFormatError, match="No records"):
        compute_stats([], CharTokenizer(), "S", 9, 12)


def test_reference_table_rows_are_instruction_output_then_prompt_total():
    rows = reference_table(fixture_stats())
    assert [r[0] for r in rows] == ["instruction", "output", "prompt", "total"]
    assert rows[0][:4] == ["instruction", 1, 10, 4.0] and rows[0][4] == pytest.approx(8.8)


def test_stats_to_dict_is_json_with_summaries_and_shares():
    d = json.loads(json.dumps(stats_to_dict(fixture_stats())))
    for name in ("instruction", "output", "prompt", "total"):
        assert set(d[name]) == {"min", "max", "mean", "p50", "p90", "p95", "p99"}
    assert d["n"] == 5 and d["any_truncated_share"] == 0.8
    assert "lengths" not in d
    assert stats_to_dict(fixture_stats(), include_lengths=True)["lengths"]["instruction"] == INSTR_LENS


def test_format_table_lists_reference_rows_first():
    text = format_table(fixture_stats())
    positions = [text.index(f"\n{name} ") for name in ("instruction", "output", "prompt", "total")]
    assert positions == sorted(positions)
    assert "8.800" in text


def test_summarize_uses_numpy_linear_percentile():
    s = summarize([13, 357])
    assert s.p95 == pytest.approx(13 + 0.95 * 344)


def test_prompt_length_equals_encoded_prompt_on_demo_tokenizer(tokenizer):
    record = Record(instruction="游泳比赛时把水喝光后跑步犯规吗", output="不犯规。")
    st = compute_stats([record], tokenizer, "你是一个有帮助的助手", 62, 151)
    ids, truncated = encode_prompt(tokenizer, record, "你是一个有帮助的助手", 10_000)
    assert st.lengths["prompt"] == [len(ids)] and not truncated
    assert st.lengths["instruction"] == [len(tokenizer(record.instruction).input_ids)]
    assert st.lengths["total"] == [len(ids) + len(tokenizer(record.output).input_ids) + 1]
    assert st.suggested_max_source_length == math.ceil(len(ids))


def test_statistics_count_the_answers_that_will_be_cut(tokenizer):
    from ruozhi_ui.data import Record
    from ruozhi_ui.stats import compute_stats, format_table

    records = [Record("问", "答" * 3), Record("问", "很长的回答" * 50), Record("问", "很长的回答" * 60)]
    stats = compute_stats(records, tokenizer, "你是一个有帮助的助手", 62, 20)
    assert (stats.output_truncated_count, stats.prompt_truncated_count) == (2, 0)
    assert "answer 66.7% (2: trained without the end token)" in format_table(stats)


# --- issue 23 defect 3: multi-turn records are measured the way the encoder cuts them ---------------
# "[S][xyz][uvw][ab]>" is 18 characters; the last turn alone, "[S][ab]>", 8: the history adds 10.
DIALOGUE = [Record(instruction="ab", output="o", history=(("xyz", "uvw"),))]


def test_a_multi_turn_prompt_is_its_last_turn_with_the_history_apart():
    st = compute_stats(DIALOGUE, CharTokenizer(), "S", max_source_length=9, max_target_length=12)
    assert (st.lengths["prompt"], st.lengths["history"], st.lengths["total"]) == ([8], [10], [20])


def test_a_dialogue_whose_last_turn_fits_is_not_counted_as_truncated():
    st = compute_stats(DIALOGUE, CharTokenizer(), "S", max_source_length=9, max_target_length=12)
    assert (st.prompt_truncated_count, st.suggested_max_source_length) == (0, 8)


def test_the_history_has_its_own_row_in_the_table():
    st = compute_stats(DIALOGUE, CharTokenizer(), "S", max_source_length=9, max_target_length=12)
    assert [row[0] for row in reference_table(st)] == ["instruction", "output", "prompt", "history", "total"]
