"""What the app shell hands to every tab's `build(ctx)`: the app's services, caches and shared components.

Plain attributes, no string-keyed registry. `build_app` makes one per Blocks app, so
two apps in one process (tests) share no cache. `visitor_of` is how every handler
learns whose request it serves (public mode) before it touches runs or uploads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr

from ..cache import LoadingLRU
from ..chats import ChatStore
from ..export import ExportRunner
from ..hub import HubStatus
from ..jobs import JobRunner
from ..policy import Policy, Visitor
from ..slots import VisitorSlots
from .boundary import LastErrors

if TYPE_CHECKING:
    from ..generation import ModelCache

DATA_CACHE_SIZE = 4  # loaded datasets (with their tokenizer) kept per app


def _model_cache() -> ModelCache:
    from ..generation import ModelCache  # imported late for start-up time: generation loads torch

    return ModelCache()


@dataclass
class AppContext:
    policy: Policy  # local or public: what each request may do, and each visitor's folders
    runner: JobRunner  # the machine's single training job
    # The shell's shared components (None in handler tests, which call handlers with plain values):
    visitor: gr.BrowserState | None = None  # the browser's visitor token; API clients fall back to their session
    model_spec: gr.Dropdown | None = None  # top bar: Hub id / local folder / "demo" (value is the spec string)
    trust_remote_code: gr.Checkbox | gr.State | None = None  # top bar opt-in (local); public: a State nobody sets
    data_source: gr.Textbox | None = None  # "sample", "upload:<name>", a Hub id, or (local) a file path
    lang: gr.Radio | None = None  # "zh" | "en"
    data_options: gr.State | None = None  # the Data tab's loaded columns/subset/splits (DataConfig fields), for runs
    models: ModelCache = field(default_factory=_model_cache)  # Compare's loaded models
    data: LoadingLRU = field(default_factory=lambda: LoadingLRU(DATA_CACHE_SIZE))  # loaded datasets + tokenizer
    stats: LoadingLRU = field(default_factory=lambda: LoadingLRU(DATA_CACHE_SIZE * 4))  # statistics per limits
    errors: LastErrors = field(default_factory=LastErrors)  # each session's last user error, shown beside its action
    hub: HubStatus | None = None  # whether the Hugging Face Hub answers (asked once at start-up)
    chats: ChatStore | None = None  # Compare's conversations, per session, on the server (made from the policy)
    long_work: VisitorSlots = field(default_factory=VisitorSlots)  # one A/B or chat answer at a time per visitor

    def __post_init__(self):
        if self.chats is None:
            lim = self.policy.limits
            self.chats = ChatStore(lim.sessions, lim.chat_turns, lim.chat_chars)
    exports: ExportRunner = field(default_factory=ExportRunner)  # the Runs tab's export jobs, one per visitor

    def visitor_of(self, token: str | None, request: gr.Request | None) -> Visitor:
        return self.policy.visitor(token, getattr(request, "session_hash", None) or "")
