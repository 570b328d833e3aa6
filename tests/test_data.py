"""Dataset sources -> records: every source kind, and every bad input named by file, line/index and field."""

import json

import pytest

from ruozhi_ui import data
from ruozhi_ui.data import Record, load_source, read_records_file, split_records
from ruozhi_ui.errors import DataFormatError


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path, objs):
    path.write_text("\n".join(json.dumps(o, ensure_ascii=False) for o in objs) + "\n", encoding="utf-8")
    return path


def alpaca(n):
    return [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(n)]


# --- sources that load ---

def test_sample_uses_its_own_validation_split():
    splits = load_source("sample")
    train = json.loads((data.SAMPLE_DIR / "train.json").read_text(encoding="utf-8"))
    val = json.loads((data.SAMPLE_DIR / "val.json").read_text(encoding="utf-8"))
    assert splits.val_from_source
    assert (len(splits.train), len(splits.val)) == (len(train), len(val))
    assert splits.train[0].output == train[0]["output"]


def test_json_list_of_alpaca_records_loads(tmp_path):
    path = write_json(tmp_path / "d.json", alpaca(3))
    assert read_records_file(path) == [Record("问题0", "回答0"), Record("问题1", "回答1"), Record("问题2", "回答2")]


def test_jsonl_one_record_per_line_loads_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}\n', encoding="utf-8")
    assert read_records_file(path) == [Record("a", "b"), Record("c", "d")]


def test_alpaca_input_is_joined_on_a_new_line(tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "翻译", "input": "你好", "output": "hello"}])
    assert read_records_file(path)[0].instruction == "翻译\n你好"


def test_chat_messages_keep_system_and_history(tmp_path):
    messages = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    assert read_records_file(path) == [Record("u2", "a2", system="你是助手", history=(("u1", "a1"),))]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(alpaca(1)).encode("utf-8"))
    assert read_records_file(path) == [Record("问题0", "回答0")]


def test_hub_id_offline_points_to_sample(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'hfl/ruozhiba_gpt4' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataFormatError) as e:
        load_source("hfl/ruozhiba_gpt4")
    assert "hfl/ruozhiba_gpt4" in str(e.value) and "'sample'" in str(e.value)


# --- bad inputs: the message names the file, the line or index, and the field ---

def test_malformed_json_reports_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json: line 3: invalid JSON"):
        read_records_file(path)


def test_malformed_jsonl_reports_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{oops\n',
                    encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: line 3: invalid JSON"):
        read_records_file(path)


def test_top_level_object_is_rejected(tmp_path):
    path = write_json(tmp_path / "obj.json", {"instruction": "a", "output": "b"})
    with pytest.raises(DataFormatError, match=r"obj\.json: the top level must be a list of records, got dict"):
        read_records_file(path)


def test_missing_field_names_record_and_field(tmp_path):
    path = write_json(tmp_path / "d.json", alpaca(2) + [{"instruction": "a"}])
    with pytest.raises(DataFormatError, match=r"d\.json: record 2: missing field 'output'"):
        read_records_file(path)


def test_non_string_field_names_record_field_and_type(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 7}])
    with pytest.raises(DataFormatError, match=r"d\.jsonl: line 2: field 'output' must be a string, got int"):
        read_records_file(path)


def test_empty_string_field_is_rejected(tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "  ", "output": "b"}])
    with pytest.raises(DataFormatError, match=r"d\.json: record 0: field 'instruction' is empty"):
        read_records_file(path)


def test_bad_chat_role_names_the_message(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataFormatError, match=r"c\.jsonl: line 1, messages\[0\]: field 'role' must be one of"):
        read_records_file(path)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: the file is empty"):
        read_records_file(path)


def test_non_utf8_bytes_report_their_line(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n' + '{"instruction": "中文", "output": "b"}\n'.encode("gbk"))
    with pytest.raises(DataFormatError, match=r"gbk\.jsonl: line 2: not valid UTF-8"):
        read_records_file(path)


def test_unsupported_extension_is_rejected(tmp_path):
    path = tmp_path / "d.xml"
    path.write_text("<instruction>a</instruction>", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"d\.xml: unsupported file type '\.xml'"):
        read_records_file(path)


def test_file_over_size_limit_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 10)
    path = write_json(tmp_path / "big.json", alpaca(2))
    with pytest.raises(DataFormatError, match=r"big\.json: file is .* over the .* limit"):
        read_records_file(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.json: no such file"):
        load_source(str(tmp_path / "nope.json"))


# --- splitting and duplicates ---

def test_duplicates_are_counted_and_noted(tmp_path):
    path = write_json(tmp_path / "d.json", alpaca(5) + alpaca(2))
    splits = load_source(str(path), val_fraction=0.2, seed=1)
    assert splits.duplicates == 2
    assert splits.notes == ["2 duplicate record(s) found (same instruction and output)"]


def test_seeded_split_is_deterministic_and_disjoint():
    records = [Record(f"q{i}", f"a{i}") for i in range(40)]
    train_a, val_a = split_records(records, 0.25, seed=7)
    train_b, val_b = split_records(records, 0.25, seed=7)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 10 and len(train_a) == 30
    assert not set(train_a) & set(val_a)
    assert split_records(records, 0.25, seed=8)[1] != val_a


def test_file_source_is_split_with_the_given_fraction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", alpaca(20))
    splits = load_source(str(path), val_fraction=0.1, seed=3)
    assert (len(splits.train), len(splits.val), splits.val_from_source) == (18, 2, False)


# --- hostile files: every way JSON parsing can fail is one DataFormatError line ------------------
@pytest.mark.parametrize("name,content,message", [
    ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: the JSON is nested too deeply to be a record"),
    ("deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "deep.jsonl: line 1: the JSON is nested too deeply"),
    ("bigint.json", '[{"instruction": "a", "output": ' + "9" * 5000 + "}]", "bigint.json: invalid JSON value (Exceeds"),
    ("surrogate.json", '[{"instruction": "a\\ud800", "output": "b"}]',
     "surrogate.json: record 0: field 'instruction' contains an invalid character (lone surrogate U+D800)"),
    ("nul.jsonl", '{"instruction": "a", "output": "b\\u0000"}\n', "nul.jsonl: line 1: field 'output' contains a NUL"),
])
def test_hostile_json_is_a_one_line_data_error(tmp_path, name, content, message):
    from ruozhi_ui.errors import DataFormatError

    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        data.read_records_file(path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("source", ["csv@/etc/passwd", "json@/tmp/**/*.js?n", "json@http://127.0.0.1:9/x",
                                    "text@/etc/hostname"])
def test_builder_prefixes_are_never_a_source(source):
    from ruozhi_ui.errors import DataFormatError

    with pytest.raises(DataFormatError, match="is neither 'sample'"):
        data.load_source(source)


def test_an_upload_source_reads_only_from_the_uploads_folder(tmp_path):
    from ruozhi_ui.errors import DataFormatError

    (tmp_path / "mine.json").write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]')
    assert data.load_source("upload:mine.json", uploads_dir=tmp_path).origin == "mine.json"
    with pytest.raises(DataFormatError, match="No uploaded file"):
        data.load_source("upload:mine.json")
    with pytest.raises(DataFormatError):
        data.load_source("upload:../mine.json", uploads_dir=tmp_path / "sub")


def test_a_hub_dataset_over_the_size_limit_is_refused_before_downloading(monkeypatch):
    from ruozhi_ui.errors import DataFormatError

    monkeypatch.setattr(data, "hub_dataset_bytes", lambda repo, file: 300 * 2**20)
    with pytest.raises(DataFormatError, match="the dataset is 300 MB, over this app's 50 MB limit"):
        data.load_source("owner/big", max_hub_bytes=50 * 2**20)
