"""Helpers for the real-browser test: Chromium launch, the local-only network guard, the training gate, DOM reads.

Kept out of test_browser.py so the test reads as the user's journey. The browser is
Debian's Chromium driven by Playwright's sync API (no `playwright install`); every
request that is not for 127.0.0.1/localhost is aborted and recorded. Plotly figures
and the progress bar are read through the DOM (`gd.data`, `data-step`), never by text.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
LOCAL_HOSTS = ("127.0.0.1", "localhost")
VIEWPORT = {"width": 1280, "height": 900}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_chromium() -> str:
    """The browser path, or a failure that says how to install it (the suite must not be skipped)."""
    if not CHROMIUM.exists():
        raise AssertionError(f"{CHROMIUM} is missing: install Debian's browser with "
                             "`apt-get install -y chromium` (the README's test command does this)")
    return str(CHROMIUM)


class LocalOnly:
    """Routes a browser context: local requests go through, every other one is aborted and recorded."""

    def __init__(self):
        self.seen: list[str] = []
        self.outside: list[str] = []

    def install(self, context) -> "LocalOnly":
        context.route("**/*", self.on_request)
        context.route_web_socket(lambda url: True, self.on_websocket)  # page.route does not see WebSockets
        return self

    def _allowed(self, url: str) -> bool:
        self.seen.append(url)
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname in LOCAL_HOSTS:
            return True
        self.outside.append(url)
        return False

    def on_request(self, route) -> None:
        if self._allowed(route.request.url):
            route.continue_()
        else:
            route.abort()

    def on_websocket(self, ws) -> None:
        if self._allowed(ws.url):
            ws.connect_to_server()  # no handlers: messages pass through unchanged
        else:
            ws.close()


class GatedTrain:
    """A JobRunner train_fn: the real engine, parked after step `hold_at` until `release` is set.

    It makes "reload the page while training runs" independent of machine speed: the
    test reloads while the job is provably mid-run, then lets it finish.
    """

    def __init__(self, hold_at: int = 3, max_hold_s: float = 120.0):
        self.hold_at, self.max_hold_s = hold_at, max_hold_s
        self.held, self.release = threading.Event(), threading.Event()

    def __call__(self, cfg, emit, stop_event, runs_root):
        from ruozhi_ui.train import train
        from ruozhi_ui.events import StepLogged

        def gated_emit(event) -> None:
            emit(event)
            if isinstance(event, StepLogged) and event.step == self.hold_at and not self.release.is_set():
                self.held.set()
                self.release.wait(self.max_hold_s)  # bounded: a failed test must not hang the suite

        return train(cfg, emit=gated_emit, stop_event=stop_event, runs_root=runs_root)


# --- DOM reads (JavaScript run in the page) -----------------------------------------------
PLOT_POINTS_JS = """(id) => {
    const gd = document.querySelector('#' + id + ' .js-plotly-plot');
    if (!gd || !gd.data || !gd.data.length || !gd.data[0].x) return 0;
    return gd.data[0].x.length;
}"""

PROGRESS_JS = """() => {
    const el = document.querySelector('#train-progress .rz-progress');
    return el ? {status: el.dataset.status, step: +el.dataset.step, num_steps: +el.dataset.numSteps} : null;
}"""

BOT_TEXTS_JS = """(id) => [...document.querySelectorAll('#' + id + ' .message-row.bot-row')]
    .map(row => row.innerText.trim())"""


def plot_points(page, elem_id: str) -> int:
    """Points of the first trace of the Plotly figure inside `#elem_id` (0 when none)."""
    return page.evaluate(PLOT_POINTS_JS, elem_id)


def wait_plot_points(page, elem_id: str, n: int, timeout_ms: int = 60_000) -> None:
    """Wait until the figure in `#elem_id` shows exactly `n` points in its first trace."""
    page.wait_for_function(f"(id) => ({PLOT_POINTS_JS})(id) === {int(n)}", arg=elem_id, timeout=timeout_ms)


def progress(page) -> dict | None:
    """{'status', 'step', 'num_steps'} from the Train tab's progress bar."""
    return page.evaluate(PROGRESS_JS)


def wait_progress(page, condition_js: str, timeout_ms: int = 60_000) -> dict:
    """Wait until `condition_js` (an expression over `p` = the progress data) holds; return the progress."""
    page.wait_for_function(f"() => {{ const p = ({PROGRESS_JS})(); return !!p && ({condition_js}); }}",
                           timeout=timeout_ms)
    return progress(page)


def bot_texts(page, elem_id: str) -> list[str]:
    return page.evaluate(BOT_TEXTS_JS, elem_id)


def input_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


def open_tab(page, tab_id: str) -> None:
    from playwright.sync_api import expect

    page.locator(f"#tab-{tab_id}-button").click()
    expect(page.locator(f"#tab-{tab_id}-button")).to_have_attribute("aria-selected", "true")


def fill_field(page, selector: str, value) -> None:
    """Type a value and leave the field (a Number commits its value on blur), once more if a component still
    re-rendering from an earlier event put its old value back."""
    from playwright.sync_api import expect

    box = page.locator(selector)
    for _ in range(3):
        box.fill(str(value))
        box.press("Tab")
        try:
            expect(box).to_have_value(str(value), timeout=5_000)
            return
        except AssertionError:
            continue
    expect(box).to_have_value(str(value))


def fill_after_default(page, selector: str, default, value) -> None:
    """`fill_field` once the field shows its default: a freshly mounted input may still be syncing it."""
    from playwright.sync_api import expect

    expect(page.locator(selector)).to_have_value(str(default))
    fill_field(page, selector, value)


def opened_page(url: str, locale: str, timeout_ms: int, **context_kwargs):
    """A module fixture's body: Chromium on `url` in `locale` (only local requests allowed), once the Data tab
    is there; yields (page, guard) and closes the browser afterwards."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=require_chromium(), headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(locale=locale, viewport=VIEWPORT, **context_kwargs)
        guard = LocalOnly().install(context)
        page = context.new_page()
        page.set_default_timeout(timeout_ms)
        expect.set_options(timeout=timeout_ms)
        page.goto(url)
        page.wait_for_selector("#data-load")
        yield page, guard
        context.close()
        browser.close()
