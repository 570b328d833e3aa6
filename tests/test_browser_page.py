"""The page as a person meets it (issue 24), in a real browser, in Chinese and in English, and at phone width.

One app on 127.0.0.1 whose Hub probe answers "offline" (so the page opens with the demo model and the
bundled sample, as on a machine without network), the real engine behind a gate that parks a run after a
few steps. Each test opens its own page in the language it checks (`zh` or `en`, a fresh browser context),
so the languages never share state. Elements are found by elem_id; expected texts come from i18n.t, never
restated. Every request leaving 127.0.0.1 is aborted and recorded; the last test asserts there were none.
"""

from __future__ import annotations

import math
import re

import pytest
from playwright.sync_api import expect, sync_playwright

from browser_helpers import (CHROMIUM_ARGS, VIEWPORT, fill_field, free_port, GatedTrain, LocalOnly, open_tab,
                             require_chromium, wait_progress)
from page_walk import leftovers, visible_texts
from ruozhi_ui.hub import HubStatus
from ruozhi_ui.i18n import t
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app
from ruozhi_ui.ui.train_tab import form_defaults

DEFAULTS = form_defaults()
LOCALES = {"zh": "zh-CN", "en": "en-US"}
PHONE = {"width": 390, "height": 844}
SLOW = 90_000
HOLD_AT = 2
N_SAMPLE_TRAIN = 183  # assets/sample: 211 records, 28 of them validation
# Words of the other script a tab may still show, per language and tab: none since every tab went through i18n.
TAB_LEFTOVERS = {"zh": {}, "en": {}}


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_dir):
    runs = tmp_path_factory.mktemp("page-runs")
    gate = GatedTrain(hold_at=HOLD_AT)
    runner = JobRunner(runs_root=runs, train_fn=gate)
    demo = build_app(runner=runner, runs_root=runs, hub=HubStatus(probe=lambda: False))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    yield {"url": f"http://127.0.0.1:{port}/", "runner": runner, "gate": gate}
    gate.release.set()
    runner.stop()
    runner.wait(60)
    demo.close()


@pytest.fixture(scope="module")
def browser():
    executable = require_chromium()
    guard = LocalOnly()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield chromium, guard
        chromium.close()


@pytest.fixture
def open_page(app, browser):
    """open_page(lang, viewport=VIEWPORT) -> a loaded page in a browser whose locale is that language."""
    chromium, guard = browser
    contexts = []

    def opener(lang: str, viewport=VIEWPORT):
        context = chromium.new_context(locale=LOCALES[lang], viewport=viewport)
        guard.install(context)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(SLOW)
        expect.set_options(timeout=SLOW)
        page.goto(app["url"])
        page.wait_for_selector("#data-load")
        expect(page.locator("#app-offline-text")).to_contain_text(t("app.offline_start", lang).split("**")[1])
        return page

    yield opener
    for context in contexts:
        context.close()




def _load_sample(page) -> None:
    expect(page.locator("#app-data-source textarea")).to_have_value("sample")  # the offline start picked it
    page.locator("#data-load").click()
    expect(page.locator("#data-histograms .js-plotly-plot")).to_have_count(1)




# --- one language, everywhere ---------------------------------------------------------------
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_every_tab_shows_only_the_pages_language(open_page, lang):
    page = open_page(lang)
    _load_sample(page)
    found = {}
    for tab in ("data", "train", "compare", "runs"):
        open_tab(page, tab)
        page.wait_for_timeout(500)  # the tab's charts draw their SVG text
        allowed = TAB_LEFTOVERS[lang].get(tab, set())
        found[tab] = leftovers(visible_texts(page), lang, allowed)
    assert found == {"data": [], "train": [], "compare": [], "runs": []}


def test_a_switch_to_english_rerenders_the_texts_handlers_made(open_page):
    page = open_page("zh")
    page.locator("#app-lang label", has_text="English").click()
    expect(page.locator("#data-load")).to_have_text(t("data.load", "en"))
    expect(page.locator("#app-offline-text")).to_contain_text(t("app.offline_start", "en").split("**")[1])
    expect(page.locator("#app-model-note")).to_contain_text(t("app.demo_note", "en")[:30])
    assert page.evaluate("() => document.documentElement.lang") == "en"
    open_tab(page, "train")
    expect(page.locator("#train-estimate")).to_contain_text(re.compile("Parameters trained"))
    assert leftovers(visible_texts(page), "en") == []


@pytest.mark.parametrize("attempt", range(3))
def test_an_english_browser_gets_the_offline_notice_in_english_on_every_load(open_page, attempt):
    page = open_page("en")  # the fixture waits for the notice's English words
    assert leftovers([page.locator("#app-offline-text").inner_text()], "en") == []


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_an_error_toast_is_titled_in_the_pages_language_with_the_raw_cause_folded(open_page, lang):
    page = open_page(lang)
    page.locator("#app-data-source textarea").fill("someone/missing-dataset")
    page.locator("#data-load").click()
    toast = page.locator(".toast-body").last
    expect(toast).to_contain_text(t("errors.load_failed", lang, error="")[:4])
    title = page.evaluate("() => getComputedStyle(document.querySelector('.toast-title'), '::before').content")
    assert title == f'"{t("errors.toast_error", lang)}"'
    expect(toast.locator("details summary")).to_have_text(t("errors.details", lang))
    expect(toast.locator("details code")).not_to_be_visible()  # the library's own words only when opened
    words = {"someone", "missing", "dataset"}  # the id the user typed, quoted back
    assert leftovers([toast.locator("[data-testid=toast-text]").inner_text()], lang, words) == []


# --- errors beside the field, before the click ------------------------------------------------
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_epochs_0_is_named_beside_start_and_start_waits(open_page, lang):
    page = open_page(lang)
    open_tab(page, "train")
    fill_field(page, "#train-epochs input", 0)
    expect(page.locator("#train-check")).to_contain_text(
        t("err.form.min", lang, name=t("train.epochs", lang), low=1, value=0))
    expect(page.locator("#train-start")).to_be_disabled()
    assert page.locator(".toast-body").count() == 0  # no Gradio toast naming no field
    fill_field(page, "#train-epochs input", 1)
    expect(page.locator("#train-start")).to_be_enabled()
    expect(page.locator("#train-check")).to_have_text("")


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_a_max_target_length_that_cuts_most_answers_warns_before_start(open_page, lang):
    page = open_page(lang)
    _load_sample(page)
    open_tab(page, "train")
    fill_field(page, "#train-max-target-length input", 1)
    said = t("train.warn_truncation", lang, share=1.0, tgt=1, p95=0).split("%")[0] + "%"  # up to "100%"
    expect(page.locator("#train-check")).to_contain_text(said)
    expect(page.locator("#train-start")).to_be_enabled()  # a warning, not a refusal


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_estimate_follows_every_form_change(open_page, lang):
    page = open_page(lang)
    _load_sample(page)
    open_tab(page, "train")
    per_epoch = math.ceil(N_SAMPLE_TRAIN / DEFAULTS["batch_size"])
    steps = {"zh": "步数", "en": "Steps"}[lang]  # the estimate's own words (i18n "train.estimate")
    estimate = page.locator("#train-estimate")
    expect(estimate).to_contain_text(re.compile(rf"{steps}\s+{DEFAULTS['epochs'] * per_epoch}\s"))
    fill_field(page, "#train-epochs input", 1)
    expect(estimate).to_contain_text(re.compile(rf"{steps}\s+{per_epoch}\s"))


# --- the run in sight -------------------------------------------------------------------------
def test_stop_is_disabled_while_nothing_runs(open_page):
    page = open_page("en")
    open_tab(page, "train")
    expect(page.locator("#train-stop")).to_be_disabled()


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_start_brings_the_progress_into_view_and_stop_says_stopping_until_stopped(open_page, app, lang):
    gate = app["gate"]
    gate.held.clear()
    gate.release.clear()
    page = open_page(lang)
    _load_sample(page)
    open_tab(page, "train")
    page.locator("#tab-train button.label-wrap").click()  # "Advanced": max_steps
    fill_field(page, "#train-max-steps input", 6)
    fill_field(page, "#train-run-name textarea", f"page-{lang}")
    expect(page.locator("#train-start")).to_be_enabled()
    page.locator("#train-start").click()
    expect(page.locator("#train-action-status")).to_contain_text(f"page-{lang}")
    wait_progress(page, f"p.status === 'running' && p.step >= {HOLD_AT}")
    top = page.evaluate("() => document.querySelector('#train-progress').getBoundingClientRect().top")
    assert 0 <= top < page.viewport_size["height"] / 2, top  # the progress line (and the chart under it) in sight
    expect(page.locator("#train-stop")).to_be_enabled()
    assert gate.held.wait(SLOW / 1000)
    page.locator("#train-stop").click()
    expect(page.locator("#train-progress .rz-meta")).to_contain_text(t("train.status_stopping", lang))
    gate.release.set()
    wait_progress(page, "p.status === 'stopped'")
    expect(page.locator("#train-stop")).to_be_disabled()


# --- phone width ------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_at_phone_width_the_top_bar_stacks_and_nothing_is_wider_than_the_screen(open_page, lang):
    page = open_page(lang, PHONE)
    _load_sample(page)
    model = page.locator("#app-model").bounding_box()
    source = page.locator("#app-data-source").bounding_box()
    assert model["y"] + model["height"] <= source["y"], (model, source)  # one field a line
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_at_phone_width_the_preview_headers_are_readable(open_page, lang):
    page = open_page(lang, PHONE)
    _load_sample(page)
    widths = page.evaluate("""() => [...document.querySelectorAll('#data-preview thead th')]
        .map(th => th.getBoundingClientRect().width)""")
    assert widths and min(widths) >= 40, widths  # not cut to one character


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_at_phone_width_no_plotly_toolbar_covers_the_chart(open_page, lang):
    page = open_page(lang, PHONE)
    open_tab(page, "train")
    expect(page.locator("#train-loss-chart .js-plotly-plot")).to_have_count(1)
    expect(page.locator("#train-loss-chart .modebar-container")).to_be_hidden()


# --- smaller items ----------------------------------------------------------------------------
def test_the_offline_box_offers_no_button_once_both_fallbacks_are_applied(open_page):
    page = open_page("en")
    expect(page.locator("#app-use-demo")).to_be_hidden()
    expect(page.locator("#app-use-sample")).to_be_hidden()
    page.locator("#app-data-source textarea").fill("someone/another")
    page.locator("#app-data-source textarea").press("Tab")
    expect(page.locator("#app-use-sample")).to_be_visible()  # the data is a Hub id again: the offer is back
    expect(page.locator("#app-use-demo")).to_be_hidden()


def test_no_request_left_localhost(browser):
    _, guard = browser
    assert guard.seen, "the route handler saw no requests at all"
    assert guard.outside == []
