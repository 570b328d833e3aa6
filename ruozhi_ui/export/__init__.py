"""Taking a trained checkpoint out of the app: a zip, a model card, a Hub push, GGUF + Ollama Modelfile.

Knows nothing of Gradio: the CLI (`python -m ruozhi_ui export`) and the Runs tab's Export panel both
call `run_export`; the panel runs it through `ExportRunner` for progress and cancel. Who may export
what (public visitors: their own checkpoints, a size limit, their own Hub token) is the policy's and
the caller's business, decided before a request is made.
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it. Loaded on first use (PEP 562): the app's context holds an
# ExportRunner from its first line, and the GGUF writer and the checkpoint reader bring torch and gguf,
# which the page need not wait for at start-up.
_HOME = {"QUANTS": "gguf_file", "Quant": "gguf_file", "choose_token": "hub_push", "Cancelled": "job",
         "ExportRunner": "job", "ExportSnapshot": "job", "FORMATS": "pipeline", "ExportRequest": "pipeline",
         "ExportResult": "pipeline", "Format": "pipeline", "run_export": "pipeline"}
__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
