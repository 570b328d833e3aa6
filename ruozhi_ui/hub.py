"""Can this machine reach the Hugging Face Hub? Asked once, in the background, answered within seconds.

Without this, the first Load on an offline machine waited 23-24 s through the Hub
clients' retries before it failed. `HubStatus` asks once at start-up (a HEAD request
with a 2 s timeout, or no request at all when the operator set HF_HUB_OFFLINE); when
the Hub is unreachable it switches the Hub libraries to their offline mode, so a
cached model or dataset still loads and an uncached one fails at once.
"""

from __future__ import annotations

import os
import threading

PROBE_TIMEOUT_S = 2.0
TRUTHY = ("1", "true", "yes", "on")


def offline_by_setting(env=None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(name, "").strip().lower() in TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when an HTTP request to the Hub gets any answer within `timeout` seconds."""
    import httpx

    url = url or os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(url, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError:
        return False
    return True


def use_offline_mode() -> None:
    """Tell the Hub libraries (already imported or not) to use their caches only."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
    except ImportError:  # datasets is not imported until a Hub dataset is loaded
        pass


class HubStatus:
    """The answer of one probe, started at once; `online()` waits for it (a few seconds at most)."""

    def __init__(self, probe=hub_reachable, env=None):
        self._online: bool | None = None if not offline_by_setting(env) else False
        self._done = threading.Event()
        if self._online is not None:
            self._done.set()
            return

        def run() -> None:
            self._online = bool(probe())
            if not self._online:
                use_offline_mode()
            self._done.set()

        threading.Thread(target=run, name="hub-probe", daemon=True).start()

    def online(self, wait_s: float = PROBE_TIMEOUT_S + 1.0) -> bool:
        """The probe's answer; still unknown after `wait_s`: treated as offline (it is at least that slow)."""
        self._done.wait(wait_s)
        return bool(self._online)
