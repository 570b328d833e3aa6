"""Export in public mode, attacked over the real HTTP API on 127.0.0.1 as another visitor would: nobody
exports, downloads or pushes a run that is not theirs, nobody pushes without their own Hugging Face
sign-in (the Space's HF_TOKEN never used), and a visitor's export stays in their folder and limits."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import httpx
import pytest

from browser_helpers import free_port
from client_helpers import fn_index, raw_call, wait_until
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.policy import PUBLIC_LIMITS, Policy
from ruozhi_ui.train import loop
from ruozhi_ui.ui import export_panel
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app

ALICE, MALLORY = "a" * 32, "b" * 32  # visitor tokens (each browser's secret)


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("public-export")
    policy = Policy(mode="public", runs_root=root, limits=PUBLIC_LIMITS)
    alice = policy.visitor(ALICE)
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), max_steps=2, epochs=1,
                      probe_max_new_tokens=2, device="cpu", run_name="alice-run")
    loop.train(cfg, emit=lambda e: None, stop_event=None, runs_root=alice.runs_root)
    demo = build_app(runner=JobRunner(root), policy=policy)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    yield dataclasses.make_dataclass("App", ["demo", "url", "root", "policy", "alice"])(
        demo, f"http://127.0.0.1:{port}/", root, policy, alice)
    demo.close()


def start(app, visitor: str, checkpoint: str, fmt: str = "zip", repo_id: str = "", session: str = "s") -> dict:
    data = [checkpoint, fmt, "f16", repo_id, True, False, False, "", "en", visitor]
    return raw_call(app.url, fn_index(app.demo, export_panel.on_start), data, session)


def alice_exports(app) -> Path:
    return app.alice.runs_root / ".exports"


def test_a_visitor_exports_their_own_checkpoint_as_a_zip_inside_their_folder(app):
    answer = start(app, ALICE, "alice-run/checkpoints/final", session="alice")
    assert answer["success"], answer["error"]
    zipped = alice_exports(app) / "alice-run-final.zip"
    wait_until(lambda: zipped.is_file(), 120, "alice's zip")
    assert "model.safetensors" in zipfile.ZipFile(zipped).namelist()


@pytest.mark.parametrize("fmt", ["zip", "gguf", "hub"])
def test_another_visitor_cannot_export_someone_elses_run_by_its_name(app, fmt):
    answer = start(app, MALLORY, "alice-run/checkpoints/final", fmt, repo_id="mallory/stolen", session="mallory")
    assert not answer["success"] and "is not one of your checkpoints" in answer["error"]
    assert not (app.policy.visitor(MALLORY).runs_root / ".exports").exists()


@pytest.mark.parametrize("path", ["{abs}", "../{alice}/alice-run/checkpoints/final", "{abs}/../final"])
def test_another_visitor_cannot_name_someone_elses_checkpoint_by_a_path(app, path):
    target = path.format(abs=str(app.alice.runs_root / "alice-run" / "checkpoints" / "final"), alice=app.alice.id)
    answer = start(app, MALLORY, target, session="mallory")
    assert not answer["success"] and "is not one of your checkpoints" in answer["error"]
    assert not (app.policy.visitor(MALLORY).runs_root / ".exports").exists()


def test_another_visitor_cannot_download_someone_elses_export_by_its_server_path(app):
    zipped = alice_exports(app) / "alice-run-final.zip"
    wait_until(lambda: zipped.is_file(), 120, "alice's zip")
    answer = httpx.get(f"{app.url}gradio_api/file={zipped}")
    assert answer.status_code == 403 and b"PK" not in answer.content[:2]


def test_push_without_the_visitors_own_sign_in_is_refused_and_hf_token_is_not_used(app, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_space_secret")
    answer = start(app, ALICE, "alice-run/checkpoints/final", "hub", repo_id="alice/model", session="alice-push")
    assert not answer["success"] and "Sign in with your own Hugging Face account" in answer["error"]


def test_the_sign_in_token_counts_only_from_a_real_space_sign_in(monkeypatch):
    class Token:
        token = "hf_from_login_button"

    policy = Policy(mode="public")
    monkeypatch.delenv("OAUTH_CLIENT_ID", raising=False)  # off a Space Gradio signs in with the server's token
    assert export_panel.oauth_token_of(policy, Token()) is None
    monkeypatch.setenv("OAUTH_CLIENT_ID", "space-oauth-app")
    assert export_panel.oauth_token_of(policy, Token()) == "hf_from_login_button"


def test_an_export_over_the_size_limit_is_refused_before_it_starts(app, monkeypatch):
    small = dataclasses.replace(app.policy, limits=dataclasses.replace(PUBLIC_LIMITS, export_mb=1))
    from ruozhi_ui.errors import PolicyError

    with pytest.raises(PolicyError) as e:
        small.check_export(app.alice, 3 * 2**20)
    assert e.value.key == "err.export.too_big"


def test_an_export_that_would_overflow_the_visitors_quota_is_refused(app):
    tight = dataclasses.replace(app.policy, limits=dataclasses.replace(PUBLIC_LIMITS, session_disk_mb=1))
    from ruozhi_ui.errors import PolicyError

    with pytest.raises(PolicyError) as e:
        tight.check_export(app.alice, 1)
    assert e.value.key == "err.policy.quota"
