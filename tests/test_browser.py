"""The whole journey in a real browser: load data, search, train, reload mid-run, compare base vs tuned,
batch A/B, continue the run from the Runs tab, overlay two runs, switch the language.

One app per module on 127.0.0.1 (demo model, bundled sample, the real engine behind a
gate that parks the run after a few steps so the reload happens provably mid-run), one
headless Chromium page in zh-CN. The tests run in order and share the page, like a user
would. Elements are found by elem_id, never by text. Every request that leaves 127.0.0.1
is aborted and recorded; the last test asserts there were none. Screenshots of the tabs
are saved in both languages (see SCREENSHOTS) for the README.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser_helpers import (VIEWPORT, bot_texts, fill_after_default, free_port, GatedTrain, input_value, open_tab,
                             opened_page, plot_points, wait_plot_points, wait_progress)
from ruozhi_ui.config import REFERENCE_PROMPTS
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app
from ruozhi_ui.ui.train_tab import form_defaults

DEFAULTS = form_defaults()
# Screenshots land in a temp folder; to refresh the README's images after a UI change run
# `RUOZHI_SCREENSHOTS=docs/screenshots python -m pytest tests/test_browser.py`.
SCREENSHOTS = Path(os.environ.get("RUOZHI_SCREENSHOTS", Path(tempfile.gettempdir()) / "ruozhi-screenshots"))
RUN_NAME = "browser-e2e"
MAX_STEPS = 12  # under one epoch of the sample: a few seconds on CPU
HOLD_AT = 3  # the gate parks the run after this step
SLOW = 90_000  # ms: generous limits for a 2-core CI machine; conditions end the waits, not time


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_dir):
    runs = tmp_path_factory.mktemp("browser-runs")
    gate = GatedTrain(hold_at=HOLD_AT)
    runner = JobRunner(runs_root=runs, train_fn=gate)
    demo = build_app(runner=runner, runs_root=runs)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    yield {"url": f"http://127.0.0.1:{port}/", "runner": runner, "gate": gate, "runs": runs}
    gate.release.set()  # never leave the training thread parked
    runner.stop()
    runner.wait(60)
    demo.close()


@pytest.fixture(scope="module")
def browser_page(app):
    yield from opened_page(app["url"], "zh-CN", SLOW)




def _use_demo_model_and_sample(page) -> None:
    """The offline pair in the top bar (a reload puts the Hub defaults back); the Data tab must be shown."""
    box = page.locator("#app-model input")
    box.fill("demo")
    box.press("Enter")
    expect(box).to_have_value("demo")
    page.locator("#data-source-kind input[value='sample']").check()  # the radio fills the source box
    expect(page.locator("#app-data-source textarea")).to_have_value("sample")




def _shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


# --- 1. Data tab --------------------------------------------------------------------------
def test_loading_the_sample_with_the_demo_model_fills_preview_stats_and_histograms(browser_page):
    page, _ = browser_page
    _use_demo_model_and_sample(page)
    page.locator("#data-load").click()

    expect(page.locator("#data-histograms .js-plotly-plot")).to_have_count(1)
    # The tables are virtualised grids: aria-rowcount counts the header row too.
    expect(page.locator("#data-preview [role=grid]")).to_have_attribute("aria-rowcount", "11")  # 10 rows a page
    expect(page.locator("#data-preview [data-testid='cell-0-2']")).not_to_be_empty()  # an instruction
    expect(page.locator("#data-stats [role=grid]")).to_have_attribute("aria-rowcount", "5")  # 4 fields
    numbers = [page.locator(f"#data-stats [data-testid='cell-{r}-{c}']").inner_text().strip()
               for r in range(4) for c in range(1, 5)]  # min, max, mean, p95
    assert all(re.fullmatch(r"\d+(\.\d+)?", n) for n in numbers), numbers
    assert plot_points(page, "data-histograms") > 0
    _shot(page, "data.png")


def test_search_filters_the_preview_as_you_type(browser_page):
    page, _ = browser_page
    grid = page.locator("#data-preview [role=grid]")
    expect(grid).to_have_attribute("aria-rowcount", "11")
    instruction = page.locator("#data-preview [data-testid='cell-0-2']").inner_text().strip()
    box = page.locator("#data-search textarea")
    box.press_sequentially(instruction, delay=20)  # typed, no Enter
    page.wait_for_function("() => +document.querySelector('#data-preview [role=grid]').getAttribute("
                           "'aria-rowcount') < 11")
    expect(page.locator("#data-page-info")).not_to_contain_text("共 211 条")
    box.press("Control+a")
    box.press("Backspace")  # cleared by keys, no Enter: every row again
    expect(grid).to_have_attribute("aria-rowcount", "11")


def test_use_suggested_lengths_changes_the_train_forms_max_lengths(browser_page):
    page, _ = browser_page
    suggested = (input_value(page, "data-suggested-source"), input_value(page, "data-suggested-target"))
    open_tab(page, "train")  # a tab's inputs exist in the DOM once it has been shown
    before = (input_value(page, "train-max-source-length"), input_value(page, "train-max-target-length"))
    assert all(v.isdigit() for v in suggested) and suggested != before, (before, suggested)
    open_tab(page, "data")
    page.locator("#data-use-suggested").click()
    open_tab(page, "train")
    expect(page.locator("#train-max-source-length input")).to_have_value(suggested[0])
    expect(page.locator("#train-max-target-length input")).to_have_value(suggested[1])


# --- 2. Train tab -------------------------------------------------------------------------
def test_start_shows_the_run_progressing_with_loss_points(browser_page, app):
    page, _ = browser_page
    open_tab(page, "train")
    expect(page.locator("#train-loss-chart .js-plotly-plot")).to_have_count(1)
    assert plot_points(page, "train-loss-chart") == 0  # idle: a chart with a message and no trace
    advanced = page.locator("#tab-train button.label-wrap")  # the tab's one accordion ("Advanced")
    expect(advanced).to_have_count(1)
    advanced.click()
    fill_after_default(page, "#train-epochs input", DEFAULTS["epochs"], 1)
    fill_after_default(page, "#train-max-steps input", DEFAULTS["max_steps"], MAX_STEPS)
    fill_after_default(page, "#train-run-name textarea", DEFAULTS["run_name"], RUN_NAME)
    page.locator("#train-start").click()
    expect(page.locator("#train-action-status")).to_contain_text(RUN_NAME)
    config = app["runner"].snapshot().config
    assert (config["epochs"], config["max_steps"], config["run_name"]) == (1, MAX_STEPS, RUN_NAME), config

    first = wait_progress(page, "p.step >= 1", SLOW)
    assert first["status"] == "running" and first["num_steps"] == MAX_STEPS, first
    assert app["gate"].held.wait(SLOW / 1000), "the run never reached the gate"
    held = wait_progress(page, f"p.step === {HOLD_AT}")
    assert held["status"] == "running", held
    wait_plot_points(page, "train-loss-chart", HOLD_AT)


def test_a_reloaded_page_still_follows_the_running_job(browser_page, app):
    page, _ = browser_page
    page.reload()
    page.wait_for_selector("#data-load")
    expect(page.locator("#app-model input")).to_have_value("demo")  # the running job's settings, not the defaults
    _use_demo_model_and_sample(page)
    open_tab(page, "train")
    expect(page.locator("#train-run-name textarea")).to_have_value(RUN_NAME)
    after_reload = wait_progress(page, f"p.step === {HOLD_AT}")
    assert after_reload["status"] == "running"
    wait_plot_points(page, "train-loss-chart", HOLD_AT)  # the chart came back with the run's points
    app["gate"].release.set()
    moved = wait_progress(page, f"p.step > {HOLD_AT}")
    assert moved["status"] in ("running", "finished"), moved


def test_the_run_finishes_with_every_loss_point_and_a_final_checkpoint(browser_page):
    page, _ = browser_page
    done = wait_progress(page, "p.status === 'finished'", SLOW)
    assert done["step"] == done["num_steps"] == MAX_STEPS
    wait_plot_points(page, "train-loss-chart", MAX_STEPS)
    expect(page.locator("#train-checkpoints")).to_contain_text("final")
    expect(page.locator("#train-checkpoints")).to_contain_text(RUN_NAME)
    _shot(page, "train.png")


# --- 3. Compare tab -----------------------------------------------------------------------
def test_compare_answers_a_reference_prompt_in_both_labelled_panes(browser_page):
    page, _ = browser_page
    open_tab(page, "compare")
    # The run finished while the page was open: its final is picked, no refresh, no click.
    picker = page.locator("#compare-checkpoint input")
    expect(picker).to_have_value(f"{RUN_NAME}/checkpoints/final")
    expect(page.locator("#compare-base-label")).to_contain_text("demo")
    expect(page.locator("#compare-tuned-label")).to_contain_text(f"{RUN_NAME}/checkpoints/final")

    page.locator("#compare-input textarea").fill(REFERENCE_PROMPTS[0])
    page.locator("#compare-send").click()
    # Done = each pane holds one non-empty answer and its status tracker is hidden again (streaming over).
    page.wait_for_function("""() => ['compare-base-chat', 'compare-tuned-chat'].every(id => {
        const bots = document.querySelectorAll('#' + id + ' .message-row.bot-row');
        const tracker = document.querySelector('#' + id + ' [data-testid=status-tracker]');
        return bots.length === 1 && bots[0].innerText.trim().length > 0 && tracker.classList.contains('hide');
    })""", timeout=SLOW)
    for pane in ("compare-base-chat", "compare-tuned-chat"):
        assert [t for t in bot_texts(page, pane) if t], pane
    expect(page.locator("#compare-base-label")).to_contain_text("demo")
    expect(page.locator("#compare-tuned-label")).to_contain_text(f"{RUN_NAME}/checkpoints/final")
    _shot(page, "compare.png")


def test_batch_ab_scores_the_checkpoints_own_data_in_a_readable_table(browser_page):
    page, _ = browser_page
    page.locator("#app-data-source textarea").fill("hfl/ruozhiba_gpt4")  # the top bar no longer says "sample"
    page.locator("#compare-ab").locator("button").first.click()  # open the accordion
    fill_after_default(page, "#compare-ab-limit input", 50, 3)
    page.locator("#compare-ab-run").click()
    expect(page.locator("#compare-ab-table [role=grid]")).to_have_attribute("aria-rowcount", "4", timeout=SLOW)
    expect(page.locator("#compare-ab-loss")).to_contain_text("验证损失")  # the run's own validation split
    frame = page.locator("#compare-ab-table").bounding_box()
    for column in (2, 3):  # base and fine-tuned answers, side by side and on screen at 1280 px
        cell = page.locator(f"#compare-ab-table [data-testid='cell-0-{column}']").bounding_box()
        assert cell["x"] + cell["width"] <= frame["x"] + frame["width"] + 1 <= VIEWPORT["width"], (column, cell)
    _shot(page, "compare-ab.png")


# --- 4. Runs tab ----------------------------------------------------------------------------
def test_a_run_continued_from_the_runs_tab_goes_on_in_a_new_run_folder(browser_page, app):
    page, _ = browser_page
    open_tab(page, "runs")
    picker = page.locator("#runs-pick input")
    expect(picker).to_have_value(RUN_NAME)
    page.locator("#runs-resume").locator("button").first.click()  # open "continue training"
    expect(page.locator("#runs-settings")).to_contain_text('"run_name": "browser-e2e"')
    expect(page.locator("#runs-resume-epochs input")).to_have_value("2")
    page.locator("#runs-resume-button").click()
    expect(page.locator("#runs-status")).to_contain_text(f"{RUN_NAME}-cont")
    open_tab(page, "train")
    done = wait_progress(page, "p.status === 'finished' && p.step > " + str(MAX_STEPS), SLOW)
    assert done["num_steps"] > MAX_STEPS
    snap = app["runner"].snapshot()
    assert Path(snap.run_dir).name == f"{RUN_NAME}-cont" and snap.steps[0].step == MAX_STEPS + 1  # continued
    assert (app["runs"] / RUN_NAME / "checkpoints" / "final").is_dir()  # the original is still there


def test_two_runs_overlaid_on_one_chart(browser_page):
    page, _ = browser_page
    open_tab(page, "runs")
    page.locator("#runs-refresh").click()
    expect(page.locator("#runs-table [role=grid]")).to_have_attribute("aria-rowcount", "3")  # header + 2 runs
    for name in (RUN_NAME, f"{RUN_NAME}-cont"):
        box = page.locator("#runs-selected").get_by_label(name, exact=True)
        if not box.is_checked():
            box.check()
    page.wait_for_function("() => { const gd = document.querySelector('#runs-chart .js-plotly-plot');"
                           " return gd && gd.data && new Set(gd.data.map(t => t.line && t.line.color)).size >= 2; }")
    _shot(page, "runs.png")


# --- 5. Language -----------------------------------------------------------------------------
def test_one_switch_changes_every_label_and_a_reload_keeps_it(browser_page):
    page, _ = browser_page
    open_tab(page, "data")
    expect(page.locator("#data-load")).to_have_text("加载数据")
    page.locator("#app-lang label", has_text="English").click()
    expect(page.locator("#data-load")).to_have_text("Load data")
    expect(page.locator("#tab-train-button")).to_have_text("Train")
    expect(page.locator("#train-progress .rz-meta")).to_contain_text("Finished")  # server-made text too
    page.reload()
    page.wait_for_selector("#data-load")
    expect(page.locator("#data-load")).to_have_text("Load data")  # remembered in the browser
    for tab, plot in (("data", "data-histograms"), ("train", "train-loss-chart"), ("compare", None),
                      ("runs", "runs-chart")):
        open_tab(page, tab)
        if tab == "data":  # a reloaded page starts with no data (offline: demo and sample are picked)
            expect(page.locator("#app-data-source textarea")).to_have_value("sample")
            page.locator("#data-load").click()
        if plot:
            page.wait_for_function(f"() => {{ const gd = document.querySelector('#{plot} .js-plotly-plot');"
                                   " return gd && gd.data && gd.data.length > 0; }")
        _shot(page, f"{tab}-en.png")
    page.locator("#app-lang label", has_text="中文").click()
    expect(page.locator("#data-load")).to_have_text("加载数据")


# --- 6. Network -----------------------------------------------------------------------------
def test_markup_in_a_source_is_shown_as_text_and_fetches_nothing(browser_page):
    page, _ = browser_page
    hostile = "![x](http://example.invalid/x.png)<img src=http://example.invalid/y.png>"
    open_tab(page, "data")
    page.locator("#app-data-source textarea").fill(hostile)
    page.locator("#data-load").click()
    toast = page.locator(".toast-body").last
    expect(toast).to_contain_text("<img src=http://example.invalid/y.png>")  # the tag as text, not an image
    assert page.locator(".toast-body img").count() == 0


def test_no_request_left_localhost(browser_page):
    _, guard = browser_page
    assert guard.seen, "the route handler saw no requests at all"
    assert guard.outside == []
