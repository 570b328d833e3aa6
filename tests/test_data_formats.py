"""Datasets as people have them (issue 23): ShareGPT, OpenAI messages, a CSV and a Parquet file with other column
names, each loading, measured, trained (demo model, two steps) and inspected; the column mapping; bad rows."""

import json
import threading

import pytest

from ruozhi_ui import data
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import ColumnMap, Record, load_source, parse_columns, read_records_file
from ruozhi_ui.errors import DataFormatError
from ruozhi_ui.events import JobFinished, ListSink
from ruozhi_ui.stats import compute_stats
from ruozhi_ui.train import loop

FORMATS = data.ASSETS / "formats"
SAMPLE = json.loads((data.SAMPLE_DIR / "train.json").read_text(encoding="utf-8"))[:24]
PAIRS = [Record(r["instruction"], r["output"]) for r in SAMPLE]
FILES = {
    "sharegpt.json": "format=sharegpt,messages=conversations,role=from,content=value",
    "messages.jsonl": "format=messages,messages=messages,role=role,content=content",
    "qa.csv": "format=alpaca,instruction=question,output=answer",
    "qa.parquet": "format=alpaca,instruction=prompt,output=response",
}


def load(name, **kw):
    return load_source(str(FORMATS / name), val_fraction=0.0, **kw)


@pytest.mark.parametrize("name,detected", FILES.items())
def test_each_format_is_detected_and_shown(name, detected):
    assert load(name).detected == detected


@pytest.mark.parametrize("name", ["messages.jsonl", "qa.csv", "qa.parquet"])
def test_single_turn_formats_read_the_sample_s_pairs(name):
    assert load(name).train == PAIRS


def test_sharegpt_dialogues_keep_their_history_and_system_turn():
    records = load("sharegpt.json").train
    assert records[0] == Record(PAIRS[1].instruction, PAIRS[1].output, system="你是一个有帮助的助手",
                                history=((PAIRS[0].instruction, PAIRS[0].output),))
    assert records[1] == Record(PAIRS[3].instruction, PAIRS[3].output, history=((PAIRS[2].instruction, PAIRS[2].output),))


def test_a_guessed_column_mapping_is_flagged_and_alpaca_s_own_is_not():
    assert (load("qa.csv").guessed, load("messages.jsonl").guessed, load_source("sample").guessed) == (True, False, False)


@pytest.mark.parametrize("name", FILES)
def test_each_format_has_statistics(name, tokenizer):
    st = compute_stats(load(name).train, tokenizer, "你是一个有帮助的助手", 62, 151)
    assert st.n == (12 if name == "sharegpt.json" else 24) and st.output.max > 0


def test_sharegpt_statistics_show_the_history_apart(tokenizer):
    st = compute_stats(load("sharegpt.json").train, tokenizer, "你是一个有帮助的助手", 62, 151)
    assert st.history is not None and st.history.min > 0
    assert st.lengths["total"] == [h + p + a + 1 for h, p, a in zip(st.lengths["history"], st.lengths["prompt"],
                                                                    [len(tokenizer(r.output).input_ids)
                                                                     for r in load("sharegpt.json").train])]


@pytest.mark.parametrize("name", FILES)
def test_each_format_trains_the_demo_model(name, tmp_path):
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source=str(FORMATS / name), max_source_length=200),
                      epochs=1, batch_size=4, max_steps=2, probe_prompts=(), device="cpu", run_name="fmt")
    sink = ListSink()
    final = loop.train(cfg, emit=sink, stop_event=threading.Event(), runs_root=tmp_path)
    assert final is not None and [e.status for e in sink.events if isinstance(e, JobFinished)] == ["finished"]


@pytest.mark.parametrize("name", FILES)
def test_each_format_appears_in_the_inspector_as_the_chat_template_renders_it(name, tokenizer):
    from ruozhi_ui.ui import data_tab

    splits = load(name)
    loaded = data_tab.LoadedData(key=None, splits=splits, tokenizer=tokenizer,
                                 rows=tuple(("train", r) for r in splits.train))
    text, segments, summary = data_tab.inspect_record(loaded, 0, 10_000, 10_000, "en", "你是一个有帮助的助手")
    r = splits.train[0]
    messages = [{"role": "system", "content": r.system or "你是一个有帮助的助手"}]
    for u, a in r.history:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    messages += [{"role": "user", "content": r.instruction}, {"role": "assistant", "content": r.output}]
    assert text == tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
    assert "".join(s for s, cat in segments if cat) .endswith(r.output + "<|im_end|>")


# --- the mapping ----------------------------------------------------------------------------------------------
def test_a_column_mapping_reads_any_column_names(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("q\ta\tsys\n问\t答\t系统\n", encoding="utf-8")
    records = read_records_file(path, columns=parse_columns("instruction=q,output=a,system=sys"))
    assert records == [Record("问", "答", system="系统")]


def test_the_mapping_round_trips_as_text():
    text = "format=sharegpt,messages=dialog,user_tag=USER|human,assistant_tag=BOT"
    assert str(parse_columns(text)) == text


def test_sharegpt_role_tags_can_be_mapped(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"dialog": [{"from": "Q", "value": "问"}, {"from": "A", "value": "答"}]}) + "\n")
    records = read_records_file(path, columns=parse_columns("format=sharegpt,messages=dialog,user_tag=Q,assistant_tag=A"))
    assert records == [Record("问", "答")]


@pytest.mark.parametrize("role", ["human", "user", "gpt", "bot", "model"])
def test_sharegpt_role_variants_are_understood(tmp_path, role):
    user, assistant = ("human", role) if role not in ("human", "user") else (role, "gpt")
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"conversations": [{"from": user, "value": "问"}, {"from": assistant, "value": "答"}]}]))
    assert read_records_file(path) == [Record("问", "答")]


def test_an_unknown_mapping_field_is_refused_naming_it():
    with pytest.raises(DataFormatError, match="Column mapping has no field 'answer'"):
        parse_columns("answer=output")


def test_columns_nothing_can_be_mapped_from_ask_for_a_mapping(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("foo,bar\n1,2\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"Cannot tell which column is the instruction, output \(columns: foo, bar\)"):
        load_source(str(path))


def test_a_bad_csv_row_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\n问,答\n,答\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.csv: line 3: field 'question' is empty"):
        load_source(str(path))


def test_a_bad_sharegpt_turn_is_reported_with_its_place(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]}]))
    with pytest.raises(DataFormatError, match=r"bad\.json: record 0, conversations\[1\]: field 'role' must be one of"):
        read_records_file(path)


def test_the_cli_takes_a_column_mapping(tmp_path, capsys):
    from ruozhi_ui import cli

    path = tmp_path / "t.csv"
    path.write_text("foo,bar\n问,答\n再问,再答\n", encoding="utf-8")
    assert cli.main(["stats", "--data", str(path), "--model", "demo", "--columns", "instruction=foo,output=bar",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


def test_the_mapping_is_saved_with_the_run(tmp_path):
    from ruozhi_ui.config import load_config

    path = tmp_path / "t.csv"
    path.write_text("foo,bar\n" + "".join(f"问{i},答{i}\n" for i in range(6)), encoding="utf-8")
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source=str(path), columns="instruction=foo,output=bar"),
                      epochs=1, batch_size=2, max_steps=1, probe_prompts=(), device="cpu", run_name="mapped")
    final = loop.train(cfg, emit=ListSink(), stop_event=threading.Event(), runs_root=tmp_path / "runs")
    assert load_config(final / "run_config.json").data.columns == "instruction=foo,output=bar"


# --- Hub datasets: the real load_dataset path, on a local file ----------------------------------------------
def test_a_hub_dataset_s_subset_and_splits_are_chosen(monkeypatch):
    import datasets

    asked = []

    def fake_load(repo, name=None, data_files=None):
        asked.append((repo, name))
        table = {"question": ["问1", "问2", "问3"], "answer": ["答1", "答2", "答3"]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(table),
                                     "dev": datasets.Dataset.from_dict(table)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda repo: ["zh", "en"])
    splits = load_source("owner/multi", subset="en", val_split="dev")
    assert asked == [("owner/multi", "en")]
    assert (splits.subsets, splits.splits, len(splits.val), splits.val_from_source) == (("zh", "en"), ("train", "dev"), 3, True)
    assert splits.detected == "format=alpaca,instruction=question,output=answer"
    with pytest.raises(DataFormatError, match="no split named 'test'; it has: train, dev"):
        load_source("owner/multi", val_split="test")
