"""Export without the page: zip, model card, Hub push (through a recording stand-in for HfApi), the CLI,
the export job runner, and the token rule of public mode. GGUF through llama.cpp: test_export_gguf.py."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from ruozhi_ui import cli
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.errors import ConfigError, JobConflict, PolicyError
from ruozhi_ui.export import Cancelled, ExportRequest, ExportRunner, choose_token, run_export
from ruozhi_ui.export.card import LOSS_IMAGE, write_card
from ruozhi_ui.export.source import describe
from ruozhi_ui.models import load_model, load_tokenizer
from ruozhi_ui.train import loop

PROMPT = "游泳比赛时把水喝光后跑步犯规吗"


def train_demo(root: Path, **changes) -> Path:
    settings = dict(lr=1e-4, epochs=2, max_steps=20, probe_max_new_tokens=4, device="cpu", run_name="exp")
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), **{**settings, **changes})
    return Path(loop.train(cfg, emit=lambda e: None, stop_event=None, runs_root=root))


@pytest.fixture(scope="module")
def full(tmp_path_factory, demo_dir):
    return train_demo(tmp_path_factory.mktemp("export-runs"), run_name="full")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, demo_dir):
    return train_demo(tmp_path_factory.mktemp("export-lora"), run_name="lora", method="lora", epochs=1, max_steps=4)


def greedy(model, tokenizer, n=12) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records each call and the files each upload would send."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, token=None):
        self.calls.append(("HfApi", {"token": token}))
        return self

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {k: v for k, v in kwargs.items() if k != "folder_path"}, files))


# ---------------------------------------------------------------- zip

def test_zip_unzips_to_a_model_whose_greedy_answer_equals_the_checkpoints(full, tmp_path):
    zipped = Path(run_export(ExportRequest(checkpoint=full, format="zip", output=tmp_path / "m.zip")).files[0])
    with zipfile.ZipFile(zipped) as zf:
        zf.extractall(tmp_path / "unzipped")
    original = load_model(str(full), torch.device("cpu"), torch.float32).eval()
    copy = load_model(str(tmp_path / "unzipped"), torch.device("cpu"), torch.float32).eval()
    tokenizer = load_tokenizer(str(tmp_path / "unzipped"))
    assert greedy(copy, tokenizer) == greedy(original, load_tokenizer(str(full)))


def test_zip_holds_checkpoint_run_files_and_card_but_no_training_state(full, tmp_path):
    zipped = run_export(ExportRequest(checkpoint=full, format="zip", output=tmp_path / "m.zip")).files[0]
    names = set(zipfile.ZipFile(zipped).namelist())
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", "run_config.json", "metrics.json",
            "run/config.json", "run/metrics.jsonl", "README.md", LOSS_IMAGE} <= names
    assert "training_state.pt" not in names and not any(n.startswith(".") for n in names)


def test_cancelled_zip_leaves_no_file(full, tmp_path):
    def cancel(stage, done):
        if stage == "export.stage_zip" and done > 0:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_export(ExportRequest(checkpoint=full, format="zip", output=tmp_path / "m.zip"), cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- model card

def test_card_of_a_full_run_parses_with_transformers_metadata(full, tmp_path):
    write_card(describe(full), tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data == {"language": ["zh", "en"], "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["ruozhi-sft", "sft", "qwen2"]}


def test_card_of_a_lora_run_names_peft_and_its_hub_base_and_dataset(lora, tmp_path):
    source = describe(lora)
    hub_cfg = source.config.__class__(**{**source.config.__dict__,
                                         "model": ModelConfig(spec="Qwen/Qwen2.5-0.5B-Instruct"),
                                         "data": DataConfig(source="hfl/ruozhiba_gpt4")})
    write_card(source.__class__(**{**source.__dict__, "config": hub_cfg}), tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert (data["library_name"], data["base_model"], data["datasets"], data["license"], data["tags"][-1]) == \
        ("peft", "Qwen/Qwen2.5-0.5B-Instruct", ["hfl/ruozhiba_gpt4"], "apache-2.0", "lora")


def test_card_of_a_lora_pushed_merged_names_transformers(lora, tmp_path):
    write_card(describe(lora), tmp_path, merged=True)
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "transformers"


def test_card_has_both_languages_the_data_table_and_the_probes(full, tmp_path):
    write_card(describe(full), tmp_path)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    for heading in ("## 中文说明", "## English", "### 数据概况（token 长度）", "### Data summary (token lengths)",
                    "### Probe answers (first and last epoch)", "| Epoch 1 | Epoch 2 |", "AutoModelForCausalLM"):
        assert heading in text, heading
    assert "| instruction |" in text and PROMPT in text


def test_card_references_a_loss_image_that_exists_and_draws_both_curves(full, tmp_path):
    write_card(describe(full), tmp_path)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert text.count(f"]({LOSS_IMAGE})") == 2
    svg = (tmp_path / LOSS_IMAGE).read_text(encoding="utf-8")
    assert svg.startswith("<svg") and svg.count("<polyline") == 2


# ---------------------------------------------------------------- Hub push

def test_push_creates_a_private_repo_and_uploads_checkpoint_card_and_run_files(full, tmp_path):
    api = RecordingHfApi()
    result = run_export(ExportRequest(checkpoint=full, format="hub", output=tmp_path / "stage", repo_id="me/demo-sft",
                                      token="hf_typed"), api_factory=api)
    assert api.calls == [
        ("HfApi", {"token": "hf_typed"}),
        ("create_repo", {"repo_id": "me/demo-sft", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"repo_id": "me/demo-sft", "repo_type": "model",
                           "commit_message": "Upload fine-tuned model from ruozhi-sft studio"},
         ["README.md", "chat_template.jinja", "config.json", "generation_config.json", LOSS_IMAGE, "metrics.json",
          "model.safetensors", "run/config.json", "run/metrics.jsonl", "run_config.json", "tokenizer.json",
          "tokenizer_config.json"])]
    assert result.url == "https://huggingface.co/me/demo-sft"


def test_push_public_repo_with_gguf_uploads_gguf_and_modelfile(full, tmp_path):
    api = RecordingHfApi()
    run_export(ExportRequest(checkpoint=full, format="hub", output=tmp_path / "stage", repo_id="me/x", private=False,
                             with_gguf=True, quant="q8_0"), api_factory=api)
    assert api.calls[1][1]["private"] is False
    assert {"model-q8_0.gguf", "Modelfile", "README.md"} <= set(api.calls[2][2])


def test_push_of_a_lora_run_sends_the_adapter_or_the_merged_model(lora, tmp_path):
    adapter, merged = RecordingHfApi(), RecordingHfApi()
    run_export(ExportRequest(checkpoint=lora, format="hub", output=tmp_path / "a", repo_id="me/a"), api_factory=adapter)
    run_export(ExportRequest(checkpoint=lora, format="hub", output=tmp_path / "m", repo_id="me/m", merged=True),
               api_factory=merged)
    assert "adapter_model.safetensors" in adapter.calls[2][2] and "model.safetensors" not in adapter.calls[2][2]
    assert "model.safetensors" in merged.calls[2][2] and "adapter_model.safetensors" not in merged.calls[2][2]


@pytest.mark.parametrize("repo_id", ["no-owner", "a/b/c", "me/bad name", "me/" + "x" * 200, ""])
def test_push_refuses_an_invalid_repo_name_before_any_hub_call(full, tmp_path, repo_id):
    api = RecordingHfApi()
    with pytest.raises(ConfigError) as e:
        run_export(ExportRequest(checkpoint=full, format="hub", output=tmp_path / "s", repo_id=repo_id),
                   api_factory=api)
    assert e.value.key == "err.export.repo_id" and api.calls == []


def test_push_reports_forbidden_and_network_errors_in_the_pages_words(full, tmp_path):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    def failing(error):
        class Api(RecordingHfApi):
            def create_repo(self, **kwargs):
                raise error
        return Api()

    forbidden = HfHubHTTPError("403", response=httpx.Response(403, request=httpx.Request("POST", "https://x")))
    keys = []
    for error in (forbidden, httpx.ConnectError("no route")):
        with pytest.raises(Exception) as e:
            run_export(ExportRequest(checkpoint=full, format="hub", output=tmp_path / "s", repo_id="me/x"),
                       api_factory=failing(error))
        keys.append(e.value.key)
    assert keys == ["err.export.forbidden", "err.export.network"]


def test_public_push_without_the_visitors_oauth_token_is_refused():
    with pytest.raises(PolicyError) as e:
        choose_token(public=True, oauth_token=None, typed="hf_typed_by_someone")
    assert e.value.key == "err.export.sign_in"


def test_public_push_uses_the_oauth_token_and_never_reads_hf_token(monkeypatch):
    import os

    class Watched(dict):
        def get(self, key, default=None):
            assert key != "HF_TOKEN", "public mode read the Space's HF_TOKEN"
            return super().get(key, default)

        def __getitem__(self, key):
            assert key != "HF_TOKEN", "public mode read the Space's HF_TOKEN"
            return super().__getitem__(key)

    monkeypatch.setattr(os, "environ", Watched(os.environ, HF_TOKEN="hf_space_secret"))
    assert choose_token(public=True, oauth_token="hf_visitor") == "hf_visitor"


def test_local_push_without_a_typed_token_leaves_it_to_huggingface_hubs_login():
    assert choose_token(public=False, oauth_token=None, typed="  ") is None


# ---------------------------------------------------------------- CLI

def test_cli_export_zip_prints_the_zip_path(full, tmp_path, capsys):
    assert cli.main(["export", str(full), "--format", "zip", "--output", str(tmp_path / "o.zip")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o.zip") and zipfile.is_zipfile(tmp_path / "o.zip")


def test_cli_export_gguf_writes_q8_0_and_a_modelfile(lora, tmp_path, capsys):
    assert cli.main(["export", str(lora), "--format", "gguf", "--quant", "q8_0", "--output", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "model-q8_0.gguf"), str(tmp_path / "Modelfile")]


def test_cli_export_unknown_quant_is_one_error_line(full, tmp_path, capsys):
    assert cli.main(["export", str(full), "--format", "gguf", "--quant", "q4", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: argument --quant")


def test_cli_export_of_a_non_checkpoint_is_one_error_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--format", "zip", "--output", str(tmp_path / "o.zip")]) == 2
    assert capsys.readouterr().err.strip() == f"error: '{tmp_path.name}' is not a checkpoint folder"


# ---------------------------------------------------------------- job runner

def test_export_job_reports_done_with_its_files():
    runner = ExportRunner()

    class Result:
        files, url = ("/x.zip",), ""

    runner.start("a", "zip", lambda progress: (progress("export.stage_zip", 0.5), Result())[1])
    assert runner.wait("a", 30)
    snap = runner.snapshot_for("a")
    assert (snap.status, snap.files, snap.done) == ("done", ("/x.zip",), 1.0)


def test_export_job_cancel_stops_it_at_its_next_progress_report():
    runner, gate = ExportRunner(), threading.Event()

    def work(progress):
        gate.wait(30)
        progress("export.stage_zip", 0.1)
        raise AssertionError("went on after cancel")

    runner.start("a", "zip", work)
    assert runner.cancel("a")
    gate.set()
    assert runner.wait("a", 30) and runner.snapshot_for("a").status == "cancelled"


def test_one_export_per_owner_at_a_time_and_others_see_nothing_of_it():
    runner, gate = ExportRunner(), threading.Event()
    runner.start("a", "zip", lambda progress: gate.wait(30))
    try:
        with pytest.raises(JobConflict) as e:
            runner.start("a", "zip", lambda progress: None)
        assert e.value.key == "err.export.running" and runner.snapshot_for("b").status == "idle"
        assert not runner.cancel("b") and runner.snapshot_for("a").status == "running"
    finally:
        gate.set()
        runner.shutdown()
