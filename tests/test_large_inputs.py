"""Big inputs stay bounded: a 100 MB file loads, 100k records give statistics from a seeded subsample."""

import json

import pytest

from ruozhi_ui import data
from ruozhi_ui.data import load_source
from ruozhi_ui.errors import DataFormatError
from ruozhi_ui.stats import compute_stats


def test_a_100_mb_file_loads(tmp_path):
    path = tmp_path / "big.jsonl"
    answer = "这是一个很长的回答。" * 3500  # ~105 KB of UTF-8 per record
    line = json.dumps({"instruction": "长问题", "output": answer}, ensure_ascii=False) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(1000):
            f.write(line.replace("长问题", f"长问题{i}"))
    assert path.stat().st_size > 100 * 2**20
    splits = load_source(str(path), val_fraction=0.01)
    assert len(splits.train) + len(splits.val) == 1000


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "huge.json"
    path.write_text("[" + "x" * 2048)  # not even valid JSON: the size check must come first
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1024)
    with pytest.raises(DataFormatError, match="over the 0 MB limit|limit"):
        load_source(str(path))


def test_statistics_of_100k_records_use_a_bounded_seeded_subsample(tmp_path, tokenizer):
    path = tmp_path / "many.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(100_000):
            f.write(json.dumps({"instruction": f"问题{i}", "output": f"回答{i}"}, ensure_ascii=False) + "\n")
    splits = load_source(str(path), val_fraction=0.0)
    assert len(splits.train) == 100_000
    stats = compute_stats(splits.train, tokenizer, "系统", 62, 151, max_records=2000)
    again = compute_stats(splits.train, tokenizer, "系统", 62, 151, max_records=2000)
    assert stats.subsampled and stats.n == 2000 and stats.n_total == 100_000
    assert len(stats.lengths["output"]) == 2000
    assert stats == again


def test_duplicate_records_are_reported(tmp_path):
    path = tmp_path / "dup.json"
    rows = [{"instruction": "同一个问题", "output": "同一个回答"}] * 3 + [{"instruction": "另一个", "output": "不同"}]
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    splits = load_source(str(path), val_fraction=0.0)
    assert splits.duplicates == 2
    assert any("2 duplicate" in n for n in splits.notes)
