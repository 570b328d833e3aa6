"""The policy as plain functions: modes, limits at their bound + 1, allowlists, visitors, quotas, redaction."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from ruozhi_ui import specs
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.errors import ConfigError, PolicyError
from ruozhi_ui.policy import (PUBLIC_LIMITS, Limits, Policy, check_text, detect_mode, policy_from_env, safe_file_name,
                              safe_text)

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def public(tmp_path) -> Policy:
    return Policy(mode="public", runs_root=tmp_path, limits=PUBLIC_LIMITS)


def cfg(**changes) -> TrainConfig:
    data = {k: changes.pop(k) for k in ("max_source_length", "max_target_length", "seed_data") if k in changes}
    base = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"))
    if data:
        base = dataclasses.replace(base, data=dataclasses.replace(base.data, **data))
    return dataclasses.replace(base, **changes)


# --- modes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("host,env,mode", [
    ("127.0.0.1", {}, "local"), ("localhost", {}, "local"), ("::1", {}, "local"), (None, {}, "local"),
    ("0.0.0.0", {}, "public"), ("192.168.1.5", {}, "public"),
    ("127.0.0.1", {"SYSTEM": "spaces"}, "public"), ("127.0.0.1", {"SPACE_ID": "me/app"}, "public"),
    ("0.0.0.0", {"RUOZHI_MODE": "local"}, "local"), ("127.0.0.1", {"RUOZHI_MODE": "public"}, "public"),
])
def test_the_mode_follows_the_host_spaces_and_the_operator(host, env, mode):
    assert detect_mode(host, env) == mode


def test_operator_variables_set_limits_and_allowlists(tmp_path):
    env = {"RUOZHI_MODE": "public", "RUOZHI_LIMIT_EPOCHS": "20", "RUOZHI_ALLOWED_MODELS": "Qwen/Qwen2.5-1.5B-Instruct",
           "RUOZHI_REMOTE_CODE_MODELS": "me/custom"}
    policy = policy_from_env(tmp_path, env=env)
    assert (policy.mode, policy.limits.epochs, policy.limits.batch_size) == ("public", 20, PUBLIC_LIMITS.batch_size)
    assert policy.allowed_models == ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "demo")
    assert policy.trust_remote_code("me/custom", asked=False) is True
    assert policy.trust_remote_code("Qwen/Qwen2.5-1.5B-Instruct", asked=True) is False
    with pytest.raises(ConfigError, match="RUOZHI_LIMIT_EPOCHS='many'"):
        policy_from_env(tmp_path, env={"RUOZHI_LIMIT_EPOCHS": "many"})


# --- limits -------------------------------------------------------------------------------------
LIMITED = [("epochs", "epochs"), ("max_steps", "max_steps"), ("batch_size", "batch_size"),
           ("grad_accum_steps", "grad_accum_steps"), ("warmup_steps", "warmup_steps"),
           ("max_source_length", "max_source_length"), ("max_target_length", "max_target_length"),
           ("lora_rank", "lora_rank"), ("lora_alpha", "lora_alpha"), ("seed", "seed"),
           ("probe_max_new_tokens", "max_new_tokens"), ("gpus", "gpus")]


@pytest.mark.parametrize("field,limit", LIMITED)
def test_every_training_limit_holds_at_its_bound_and_refuses_bound_plus_one(public, field, limit):
    bound = getattr(PUBLIC_LIMITS, limit)
    public.check_train_config(cfg(**{field: bound}), public.visitor(TOKEN))
    with pytest.raises(PolicyError, match=f"{field} must be at most {bound:,}"):
        public.check_train_config(cfg(**{field: bound + 1}), public.visitor(TOKEN))


def test_a_visitor_cannot_start_cpu_processes(public):
    with pytest.raises(PolicyError, match="several processes needs several GPUs"):
        public.check_train_config(cfg(gpus=2, device="cpu"), public.visitor(TOKEN))


def test_local_mode_still_refuses_what_cannot_be_meant(tmp_path):
    local = Policy(runs_root=tmp_path)
    with pytest.raises(PolicyError, match="seed must be at most 4,294,967,295"):
        local.check_train_config(cfg(seed=2**70), local.visitor())
    with pytest.raises(PolicyError, match="seed must be at least 0"):
        local.check_train_config(cfg(seed=-1), local.visitor())
    assert local.check_train_config(cfg(epochs=50, batch_size=512), local.visitor()).epochs == 50


def test_public_runs_are_bounded_and_keep_few_checkpoints(public):
    checked = public.check_train_config(cfg(max_steps=0), public.visitor(TOKEN))
    assert checked.max_steps == PUBLIC_LIMITS.max_steps
    if hasattr(checked, "keep_checkpoints"):
        assert checked.keep_checkpoints == PUBLIC_LIMITS.checkpoints_per_run


def test_generation_limits_hold_at_the_bound(public):
    public.check_generation(PUBLIC_LIMITS.max_new_tokens, PUBLIC_LIMITS.ab_prompts)
    with pytest.raises(PolicyError, match="max_new_tokens must be at most 512"):
        public.check_generation(PUBLIC_LIMITS.max_new_tokens + 1)
    with pytest.raises(PolicyError, match="the number of A/B prompts must be at most 200"):
        public.check_generation(1, PUBLIC_LIMITS.ab_prompts + 1)


@pytest.mark.parametrize("name,bound", [("num_hidden_layers", PUBLIC_LIMITS.config_layers),
                                        ("vocab_size", PUBLIC_LIMITS.config_vocab),
                                        ("hidden_size", PUBLIC_LIMITS.config_hidden)])
def test_an_absurd_model_config_is_refused_before_anything_is_built(public, name, bound):
    from transformers import Qwen2Config

    public.check_config_shape(Qwen2Config(**{name: bound}))
    with pytest.raises(PolicyError, match=f"{name} is {bound + 1}"):
        public.check_config_shape(Qwen2Config(**{name: bound + 1}))


def test_the_estimate_reads_a_40000_layer_config_and_builds_nothing(tmp_path, monkeypatch, demo_dir):
    from ruozhi_ui import preflight

    folder = tmp_path / "huge"
    folder.mkdir()
    config = json.loads((demo_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 40000, "layer_types": None}))
    monkeypatch.setattr(preflight, "model_shape", lambda *a: pytest.fail("built a model from the config"))
    local = Policy(runs_root=tmp_path)
    with pytest.raises(PolicyError, match="num_hidden_layers is 40000"):
        preflight.estimate(dataclasses.replace(cfg(), model=ModelConfig(spec=str(folder))), 10, local.check_config_shape)


# --- models and data sources ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["/tmp", "./x", "../runs", "Qwen/Qwen2.5-7B-Instruct", "gpt2", "demo/../x", ""])
def test_public_models_are_demo_and_the_allowlist_only(public, spec):
    with pytest.raises(PolicyError):
        public.check_model(spec)


def test_public_allows_the_default_model_and_demo(public):
    assert public.check_model(" Qwen/Qwen2.5-0.5B-Instruct ") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert public.check_model("DEMO") == "demo"


@pytest.mark.parametrize("source", ["/etc/passwd", "../x.json", "x.json", "csv@/etc/passwd", "json@/d/**/*.js?n",
                                    "json@http://127.0.0.1:1/x", "hfl/ruozhiba_gpt4@../x.json",
                                    "hfl/ruozhiba_gpt4@a/b.json", "hfl/ruozhiba_gpt4@*.json", "http://x/y.json",
                                    "upload:../x.json", "upload:/etc/x.json", "upload:", "a/b/c", "owner/na me"])
def test_public_data_sources_are_never_paths_globs_builders_or_urls(public, source):
    with pytest.raises(PolicyError, match="In this public app a dataset is"):
        public.check_data_source(source, public.visitor(TOKEN))


@pytest.mark.parametrize("source", ["sample", "hfl/ruozhiba_gpt4", "hfl/ruozhiba_gpt4@ruozhiba_qa2449_gpt4t.json",
                                    "owner/name@data.jsonl"])
def test_public_data_sources_allowed(public, source):
    assert public.check_data_source(source, public.visitor(TOKEN)) == source


def test_an_upload_is_found_only_in_its_own_visitors_folder(public):
    alice, bob = public.visitor(TOKEN), public.visitor("f" * 32)
    alice.uploads.mkdir(parents=True)
    (alice.uploads / "mine.json").write_text("[]")
    assert public.check_data_source("upload:mine.json", alice) == "upload:mine.json"
    with pytest.raises(PolicyError, match="No uploaded file 'mine.json' in this session"):
        public.check_data_source("upload:mine.json", bob)


def test_specs_tell_hub_ids_from_paths():
    assert specs.split_hub_dataset("hfl/ruozhiba_gpt4@a.json") == ("hfl/ruozhiba_gpt4", "a.json")
    assert specs.split_hub_dataset("csv@/etc/passwd") is None
    assert not specs.is_hub_id("a/b.json") and not specs.is_hub_id("../x") and specs.is_hub_id("Qwen/Qwen2.5-0.5B")
    assert specs.data_kind("x/y.json") == "path" and specs.data_kind("x/y.json", look_at_disk=False) == "invalid"
    assert specs.model_kind("demo") == "demo" and specs.model_kind("/nope/x", look_at_disk=False) == "invalid"


# --- visitors, checkpoints, quotas ------------------------------------------------------------------
def test_visitors_get_separate_hashed_folders_and_a_bad_token_falls_back_to_the_session(public):
    alice = public.visitor(TOKEN)
    assert alice.runs_root.parent.name == ".visitors" and TOKEN not in str(alice.runs_root)
    assert public.visitor(TOKEN) == alice and public.visitor("f" * 32) != alice
    assert public.visitor("../../etc", "s1") == public.visitor(None, "s1") != public.visitor(None, "s2")
    with pytest.raises(PolicyError, match="No visitor session"):
        public.visitor(None, "")
    assert Policy(runs_root=public.runs_root).visitor("anything").runs_root == Path(public.runs_root)


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_checkpoint_resolves_only_inside_the_visitors_runs(public, tmp_path):
    alice = public.visitor(TOKEN)
    mine = _checkpoint(alice.runs_root / "r" / "checkpoints" / "final")
    other = _checkpoint(public.visitor("f" * 32).runs_root / "r2" / "checkpoints" / "final")
    assert public.resolve_checkpoint("r/checkpoints/final", alice) == mine.resolve()
    for value in (str(mine), str(other), "../" + other.parent.parent.parent.name + "/r2/checkpoints/final",
                  "r2/checkpoints/final", ".uploads/checkpoints/x", "r/checkpoints/../../r/checkpoints/final"):
        with pytest.raises(PolicyError, match="is not one of your checkpoints"):
            public.resolve_checkpoint(value, alice)


def test_the_quota_removes_the_oldest_runs_first_and_never_a_kept_one(tmp_path):
    policy = Policy(mode="public", runs_root=tmp_path, limits=dataclasses.replace(PUBLIC_LIMITS, session_disk_mb=1))
    visitor = policy.visitor(TOKEN)
    runs = []
    for i, name in enumerate(("old", "middle", "new")):
        folder = visitor.runs_root / name
        folder.mkdir(parents=True)
        (folder / "w.bin").write_bytes(b"x" * 400_000)
        os.utime(folder, (time.time() - 100 + i, time.time() - 100 + i))
        runs.append(folder)
    policy.make_room(visitor, keep=(runs[0],))
    assert [p.exists() for p in runs] == [True, False, True]
    with pytest.raises(PolicyError, match="Your space is full"):
        (runs[2] / "w2.bin").write_bytes(b"x" * 800_000)
        policy.make_room(visitor, keep=(runs[0], runs[2]))


# --- text --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [("a\ud800", "lone surrogate, U+D800"), ("\udfff", "lone surrogate, U+DFFF"),
                                          ("a\x00", "control character (U+0000)"), ("a\x1b[2J", "control character")])
def test_bad_characters_are_refused_at_the_boundary(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        check_text(text, "field")


def test_newlines_pass_in_multiline_text_and_long_text_is_refused():
    assert check_text("a\nb\tc", "prompt", multiline=True) == "a\nb\tc"
    with pytest.raises(ConfigError, match="at most 3 are allowed"):
        check_text("abcd", "prompt", max_chars=3)


def test_safe_text_always_serialises():
    assert safe_text("x\ud800y").encode("utf-8") == "x?y".encode("utf-8")


def test_redaction_hides_server_paths_in_public_mode_only(public, tmp_path):
    visitor = public.visitor(TOKEN)
    text = f"Cannot write '{visitor.runs_root}/run/checkpoints' nor /etc/cron.d/job (see /root/.cache/x.lock)"
    assert public.redact(text, visitor) == "Cannot write 'run/checkpoints' nor job (see x.lock)"
    assert Policy(runs_root=tmp_path).redact(text) == text


@pytest.mark.parametrize("name,kept", [("../../etc/x.json", "x.json"), (".hidden.json", "hidden.json"),
                                       ("a b<c>.jsonl", "a-b-c-.jsonl"), ("数据.json", "数据.json")])
def test_upload_names_are_plain_file_names(name, kept):
    assert safe_file_name(name) == kept


def test_limits_table_defaults_are_sane():
    assert Limits().seed == 2**32 - 1 and PUBLIC_LIMITS.epochs == 10


# --- the Hub probe ----------------------------------------------------------------------------------
def test_the_hub_probe_answers_offline_at_once_when_the_operator_says_so():
    from ruozhi_ui.hub import HubStatus

    status = HubStatus(probe=lambda: pytest.fail("probed although HF_HUB_OFFLINE=1"), env={"HF_HUB_OFFLINE": "1"})
    assert status.online(wait_s=0) is False


def test_an_unreachable_hub_is_offline():
    from ruozhi_ui.hub import hub_reachable

    assert hub_reachable("http://127.0.0.1:9", timeout=0.5) is False  # nothing listens on the discard port


def test_a_hub_that_answers_is_online(monkeypatch):
    from ruozhi_ui import hub

    monkeypatch.setattr(hub, "use_offline_mode", lambda: pytest.fail("went offline"))
    assert hub.HubStatus(probe=lambda: True, env={}).online() is True


def test_offline_at_start_the_page_opens_with_demo_and_sample():
    from ruozhi_ui.hub import HubStatus
    from ruozhi_ui.ui import shell

    offline = HubStatus(env={"HF_HUB_OFFLINE": "1"})
    model, data, kind, notice, text = shell.offline_start(offline, "Qwen/Qwen2.5-0.5B-Instruct", "hfl/ruozhiba_gpt4", "en")
    assert (model, data, kind, notice["visible"]) == ("demo", "sample", "sample", True)
    assert text.startswith("**This machine cannot reach the Hugging Face Hub**")
