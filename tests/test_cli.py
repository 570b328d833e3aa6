"""The command line, run in-process through `cli.main(argv)`: stats output, argument handling, exit codes."""

import json
import shutil
from pathlib import Path

import pytest

from ruozhi_ui import cli, models
from ruozhi_ui.config import DataConfig, TrainConfig


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


# --- stats ---

def test_stats_prints_reference_table(demo_dir, capsys):
    assert cli.main(["stats", "--data", "sample", "--model", "demo"]) == 0
    out = capsys.readouterr().out
    assert "instruction" in out and "output" in out
    assert out.index("instruction") < out.index("prompt") and "suggested (p95)" in out


def test_stats_measures_the_whole_file_by_default_as_the_data_tab_does(demo_dir, capsys):
    assert cli.main(["stats", "--data", "sample", "--model", "demo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 183 + 28  # train.json + val.json


def test_stats_json_prints_one_object_with_summaries(demo_dir, capsys):
    assert cli.main(["stats", "--data", "sample", "--model", "demo", "--json", "--split", "all"]) == 0
    d = json.loads(capsys.readouterr().out)
    for name in ("instruction", "output"):
        assert {"min", "max", "mean", "p95"} <= set(d[name])
    assert d["max_source_length"] == DataConfig().max_source_length and d["n"] == d["n_total"]


def test_stats_loads_tokenizer_only_never_weights(demo_dir, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "tok-only"
    folder.mkdir()
    for f in Path(demo_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    assert not list(folder.glob("*.safetensors")) and not (folder / "config.json").exists()

    def no_weights(*args, **kwargs):
        raise AssertionError("stats must not load model weights")

    monkeypatch.setattr(models, "load_model", no_weights)
    assert cli.main(["stats", "--data", "sample", "--model", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] > 0


def test_stats_bad_source_is_one_error_line(capsys):
    assert cli.main(["stats", "--data", "missing.jsonl", "--model", "demo"]) == 2
    assert "missing.jsonl: no such file" in one_error_line(capsys)


def test_stats_missing_model_folder_is_one_error_line(capsys):
    assert cli.main(["stats", "--data", "sample", "--model", "./no-such-model"]) == 2
    assert "no-such-model" in one_error_line(capsys)


# --- train: argument handling ---

def test_train_bad_method_is_one_error_line(capsys):
    assert cli.main(["train", "--data", "sample", "--model", "demo", "--method", "qlora"]) == 2
    assert "method must be 'full' or 'lora'" in one_error_line(capsys)


def test_train_out_of_range_lr_is_one_error_line(capsys):
    assert cli.main(["train", "--data", "sample", "--model", "demo", "--lr", "3"]) == 2
    assert "lr must be between 0 and 1" in one_error_line(capsys)


def test_train_unparsable_number_is_one_error_line(capsys):
    assert cli.main(["train", "--lr", "fast"]) == 2
    assert "--lr" in one_error_line(capsys)


def test_train_missing_data_file_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert cli.main(["train", "--data", str(missing), "--model", "demo"]) == 2
    assert "nope.json: no such file" in one_error_line(capsys)


def test_train_flags_left_out_keep_dataclass_defaults():
    args = cli.build_parser().parse_args(["train", "--data", "sample", "--model", "demo", "--epochs", "2",
                                          "--seed", "5", "--packing"])
    cfg = cli.build_train_config(args, "my-run")
    assert (cfg.epochs, cfg.seed, cfg.packing, cfg.run_name) == (2, 5, True, "my-run")
    assert (cfg.lr, cfg.batch_size, cfg.method) == (TrainConfig().lr, TrainConfig().batch_size, TrainConfig().method)
    assert cfg.data.seed == DataConfig().seed  # --seed is the run's seed, not the hold-out split's
    assert (cfg.data.source, cfg.model.spec) == ("sample", "demo")


def test_output_with_separator_is_parent_root_and_basename(tmp_path):
    assert cli.split_output("my-run", tmp_path) == (tmp_path, "my-run")
    assert cli.split_output(str(tmp_path / "runs" / "t"), Path("/elsewhere")) == ((tmp_path / "runs").resolve(), "t")
    assert cli.split_output(None, tmp_path) == (tmp_path, None)


def test_help_exits_zero(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "--grad-accum-steps" in capsys.readouterr().out


# --- train: end to end on the demo model ---

def test_train_two_steps_writes_final_checkpoint(demo_dir, tmp_path, capsys):
    out = tmp_path / "runs" / "t"
    code = cli.main(["train", "--data", "sample", "--model", "demo", "--output", str(out),
                     "--max-steps", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "checkpoints" / "final").is_dir()
    assert Path(captured.out.strip().splitlines()[-1]) == out / "checkpoints" / "final"
    assert "step 2/" in captured.err


def test_resume_continues_into_a_new_run_folder_and_refuses_conflicting_flags(tmp_path, capsys, demo_dir):
    root = tmp_path / "runs"
    common = ["--data", "sample", "--model", "demo", "--device", "cpu", "--max-steps", "2"]
    assert cli.main(["train", *common, "--output", str(root / "t")]) == 0
    final = root / "t" / "checkpoints" / "final"
    before = (root / "t" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(final), "--lr", "0.5", "--method", "lora"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --resume continues the checkpoint with its own settings; these flags would change them: "
                   "--lr, --method (leave them out, or start a new run)"]
    assert cli.main(["train", "--resume", str(final), "--data", "sample", "--max-steps", "4",
                     "--output", str(root / "more")]) == 0
    assert (root / "t" / "metrics.jsonl").read_text() == before  # the original run is untouched
    steps = [json.loads(line)["step"] for line in (root / "more" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "StepLogged"]
    assert steps == [3, 4]  # each step once, continuing the numbering
