"""Taking a trained checkpoint out of the app: a zip, a model card, a Hub push, GGUF + Ollama Modelfile.

Knows nothing of Gradio: the CLI (`python -m ruozhi_ui export`) and the Runs tab's Export panel both
call `run_export`; the panel runs it through `ExportRunner` for progress and cancel. Who may export
what (public visitors: their own checkpoints, a size limit, their own Hub token) is the policy's and
the caller's business, decided before a request is made.
"""

from .gguf_file import QUANTS, Quant
from .hub_push import choose_token
from .job import Cancelled, ExportRunner, ExportSnapshot
from .pipeline import FORMATS, ExportRequest, ExportResult, Format, run_export

__all__ = ["QUANTS", "Quant", "FORMATS", "Format", "ExportRequest", "ExportResult", "run_export", "ExportRunner",
           "ExportSnapshot", "Cancelled", "choose_token"]
