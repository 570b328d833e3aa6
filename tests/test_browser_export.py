"""Export in a real browser: a person trains the demo run, opens Runs -> Export, downloads a zip that
loads with transformers, gets GGUF + Modelfile, and pushes with a model card (to a recording stand-in
for huggingface_hub.HfApi: no network). Local mode, one app and one headless Chromium page per module;
elements found by elem_id; every request that leaves 127.0.0.1 is aborted, and the last test checks
there were none."""

from __future__ import annotations

import zipfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from playwright.sync_api import expect

from browser_helpers import (fill_after_default, free_port, open_tab, opened_page, wait_progress)
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.models import load_model, load_tokenizer
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app
from ruozhi_ui.ui.train_tab import form_defaults

DEFAULTS = form_defaults()
RUN_NAME = "export-e2e"
MAX_STEPS = 4
SLOW = 120_000


class RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        RecordingHfApi.calls.append(("HfApi", token))

    def create_repo(self, **kwargs):
        RecordingHfApi.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        RecordingHfApi.calls.append(("upload_folder", sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                                                             if p.is_file()), (folder / "README.md").read_text()))


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_dir):
    runs = tmp_path_factory.mktemp("browser-export-runs")
    patch = pytest.MonkeyPatch()
    patch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    runner = JobRunner(runs_root=runs)
    demo = build_app(runner=runner, runs_root=runs)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    yield {"url": f"http://127.0.0.1:{port}/", "runner": runner, "runs": runs}
    runner.stop()
    runner.wait(60)
    demo.close()
    patch.undo()


@pytest.fixture(scope="module")
def browser_page(app):
    yield from opened_page(app["url"], "en-US", SLOW, accept_downloads=True)






def _export(page, fmt: str) -> None:
    page.locator(f"#export-format input[value='{fmt}']").check()
    page.locator("#export-start").click()
    expect(page.locator("#export-status")).to_contain_text("✅")


def test_a_person_trains_the_demo_run(browser_page):
    page, _ = browser_page
    box = page.locator("#app-model input")
    box.fill("demo")
    box.press("Enter")
    page.locator("#data-source-kind input[value='sample']").check()
    expect(page.locator("#app-data-source textarea")).to_have_value("sample")
    page.locator("#data-load").click()
    expect(page.locator("#data-histograms .js-plotly-plot")).to_have_count(1)
    open_tab(page, "train")
    page.locator("#tab-train button.label-wrap").click()
    fill_after_default(page, "#train-epochs input", DEFAULTS["epochs"], 1)
    fill_after_default(page, "#train-max-steps input", DEFAULTS["max_steps"], MAX_STEPS)
    fill_after_default(page, "#train-run-name textarea", DEFAULTS["run_name"], RUN_NAME)
    page.locator("#train-start").click()
    done = wait_progress(page, "p.status === 'finished'", SLOW)
    assert done["step"] == MAX_STEPS


def test_runs_export_offers_the_runs_final_checkpoint(browser_page):
    page, _ = browser_page
    open_tab(page, "runs")
    expect(page.locator("#runs-pick input")).to_have_value(RUN_NAME)
    page.locator("#export").locator("button").first.click()  # open the Export accordion
    expect(page.locator("#export-checkpoint input")).to_have_value(f"{RUN_NAME}/checkpoints/final")


def test_the_downloaded_zip_loads_with_transformers_and_answers_like_the_checkpoint(browser_page, app, tmp_path):
    page, _ = browser_page
    _export(page, "zip")
    link = page.locator(f"#export-files a[download='{RUN_NAME}-final.zip']")
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "download.zip"
    download.value.save_as(saved)
    zipfile.ZipFile(saved).extractall(tmp_path / "unzipped")
    ids = torch.tensor([[1, 85, 91, 2264, 71]])
    answers = []
    for folder in (tmp_path / "unzipped", app["runs"] / RUN_NAME / "checkpoints" / "final"):
        model = load_model(str(folder), torch.device("cpu"), torch.float32).eval()
        tokenizer = load_tokenizer(str(folder))
        with torch.no_grad():
            answers.append(model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                          pad_token_id=tokenizer.pad_token_id)[0].tolist())
    assert answers[0] == answers[1]


def test_gguf_export_offers_the_gguf_file_and_its_modelfile(browser_page):
    page, _ = browser_page
    _export(page, "gguf")
    for name in ("model-f16.gguf", "Modelfile"):
        expect(page.locator(f"#export-files a[download='{name}']")).to_have_count(1)


def test_push_sends_checkpoint_and_card_to_a_private_repo_and_links_it(browser_page):
    page, _ = browser_page
    RecordingHfApi.calls.clear()
    page.locator("#export-format input[value='hub']").check()
    page.locator("#export-repo textarea, #export-repo input").first.fill("me/demo-sft")
    page.locator("#export-start").click()
    expect(page.locator("#export-status")).to_contain_text("https://huggingface.co/me/demo-sft")
    (_, token), (_, create), (_, files, card) = RecordingHfApi.calls
    assert token is None and create == {"repo_id": "me/demo-sft", "repo_type": "model", "private": True,
                                        "exist_ok": True}
    assert {"README.md", "loss_curve.svg", "model.safetensors", "tokenizer.json"} <= set(files)
    assert "## English" in card and "## 中文说明" in card


def test_no_request_left_localhost(browser_page):
    _, guard = browser_page
    assert guard.seen and guard.outside == []
