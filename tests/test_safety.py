"""Safety: run names stay inside the runs folder, remote code stays off, weights load only from safetensors."""

import dataclasses
import json

import pytest
import torch

from ruozhi_ui import models
from ruozhi_ui.checkpoints import list_checkpoints, run_dir_for, sanitize_run_name, unique_run_dir
from ruozhi_ui.config import ModelConfig, TrainConfig
from ruozhi_ui.errors import ConfigError, ModelLoadError


@pytest.mark.parametrize("name", [
    "../escape", "../../etc/passwd", "/abs/path", "a/../../b", "../x", "名字/../../x", "x" * 500,
    "bad\x00name", "tab\tand\nnewline", "\u202eevil", "C:\\windows\\system32",
])
def test_run_names_never_leave_the_runs_folder(tmp_path, name):
    path = run_dir_for(tmp_path, name)
    assert path.parent == tmp_path.resolve()
    assert len(path.name) <= 64
    assert not any(ord(c) < 32 for c in path.name)


def test_a_chinese_run_name_is_kept():
    assert sanitize_run_name("弱智吧 微调 v2") == "弱智吧-微调-v2"


@pytest.mark.parametrize("name", ["", "../..", "///", "\x00\x01"])
def test_a_run_name_with_nothing_safe_left_is_refused(name):
    with pytest.raises(ConfigError, match="run_name"):
        sanitize_run_name(name)


def test_new_runs_never_overwrite_old_ones(tmp_path):
    first = unique_run_dir(tmp_path, "run")
    first.mkdir()
    assert unique_run_dir(tmp_path, "run").name == "run-2"


def test_trust_remote_code_is_off_by_default():
    assert TrainConfig().model.trust_remote_code is False
    assert ModelConfig().trust_remote_code is False


def test_trust_remote_code_reaches_from_pretrained_only_when_opted_in(demo_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append((kwargs.get("trust_remote_code"), kwargs.get("use_safetensors")))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model("demo", device=torch.device("cpu"))
    models.load_model("demo", device=torch.device("cpu"), trust_remote_code=True)
    assert seen == [(False, True), (True, True)]


def test_pickle_weights_are_refused(demo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    model.save_pretrained(folder, safe_serialization=False)
    if (folder / "model.safetensors").exists():  # transformers 5 may always write safetensors
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled"):
        models.load_model(str(folder), device=torch.device("cpu"))


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_model(str(tmp_path / "nope"))


def test_unfinished_checkpoint_folders_are_not_listed(tmp_path, demo_dir):
    import shutil

    run = tmp_path / "r" / "checkpoints"
    shutil.copytree(demo_dir, run / "final")
    (run / ".tmp-epoch-2-1-1").mkdir()
    (run / ".tmp-epoch-2-1-1" / "config.json").write_text(json.dumps({}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["final"]


def _edited_copy(demo_dir, tmp_path, **changes):
    import json
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(demo_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes,message", [
    (dict(num_hidden_layers=4, layer_types=None), "24 missing (first: model.layers.2.input_layernorm.weight"),
    (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "6 unexpected (first: model.layers.0.self_attn.k_proj.bias"),
    (dict(intermediate_size=400), "6 mis-shaped (first: model.layers.0.mlp.down_proj.weight"),
])
def test_weights_that_do_not_fill_their_config_are_refused_naming_the_tensors(demo_dir, tmp_path, changes, message):
    from ruozhi_ui.errors import ModelLoadError
    from ruozhi_ui.models import load_model

    folder = _edited_copy(demo_dir, tmp_path, **changes)
    with pytest.raises(ModelLoadError, match="do not match its config.json") as e:
        load_model(str(folder), device=torch.device("cpu"))
    assert message in str(e.value)
