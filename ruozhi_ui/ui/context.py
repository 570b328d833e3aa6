"""What the app shell hands to every tab's `build(ctx)`: shared services and components.

Plain attributes, no string-keyed registry. `app.py` makes one per Blocks app.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..jobs import JobRunner


@dataclass
class AppContext:
    runner: JobRunner  # the process's single training job
    runs_root: Path  # every run folder and checkpoint lives under here
    model_spec: gr.Dropdown  # top bar: Hub id / local folder / "demo" (value is the spec string)
    trust_remote_code: gr.Checkbox  # top bar: explicit opt-in, off by default
    data_source: gr.Textbox  # top bar / Data tab: "sample", a file path, or a Hub id
    lang: gr.Radio  # "zh" | "en": for text the handlers format themselves
