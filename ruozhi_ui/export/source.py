"""What an export reads from one checkpoint: its files, its run, its training config, its merged model.

A checkpoint is a `save_pretrained` folder (full model, or a LoRA adapter) inside a run folder
(checkpoints.py describes the layout); everything about the run is read through runs.py and
generation.py, never by file names of our own. `load_merged` gives the plain transformers model an
export writes as GGUF or pushes as "merged": a LoRA adapter is merged into its base with peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..checkpoints import ADAPTER_CONFIG, METRICS, RUN_CONFIG, TRAINING_STATE, is_checkpoint, read_events
from ..config import TrainConfig
from ..errors import ConfigError
from ..events import SampleGenerated
from ..generation import checkpoint_config
from ..runs import RunRecord, read_run


@dataclass(frozen=True)
class ExportSource:
    path: Path  # the checkpoint folder
    kind: Literal["full", "lora"]
    config: TrainConfig | None  # what the run trained with (None: a plain model folder)
    run_dir: Path | None  # the run folder the checkpoint belongs to
    record: RunRecord | None  # the run as the Runs tab lists it (losses, status)

    @property
    def name(self) -> str:
        return f"{self.run_dir.name}-{self.path.name}" if self.run_dir else self.path.name

    def run_files(self) -> list[tuple[Path, str]]:
        """The run's own config and metrics log, with the names they get in an export (`run/...`)."""
        if self.run_dir is None:
            return []
        return [(self.run_dir / f, f"run/{f}") for f in (RUN_CONFIG, METRICS) if (self.run_dir / f).is_file()]

    def probes(self) -> list[SampleGenerated]:
        """The probe answers the run recorded at each epoch end, oldest first."""
        if self.run_dir is None:
            return []
        return [e for e in read_events(self.run_dir) if isinstance(e, SampleGenerated)]


def describe(path: Path) -> ExportSource:
    """The checkpoint at `path` (already resolved by the policy) and its run."""
    path = Path(path)
    if not path.is_dir() or not is_checkpoint(path):
        raise ConfigError(key="err.export.not_checkpoint", path=path.name)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    record = read_run(run_dir) if run_dir is not None else None
    return ExportSource(path=path, kind="lora" if (path / ADAPTER_CONFIG).is_file() else "full",
                        config=checkpoint_config(path), run_dir=run_dir if record else None, record=record)


def checkpoint_files(path: Path) -> list[Path]:
    """What an export carries of a checkpoint: every file but the (large, private) resume state and the
    hidden ones, in a stable order."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != TRAINING_STATE
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def files_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


def load_merged(source: ExportSource):
    """(model, tokenizer) on the CPU in fp32, a LoRA adapter merged into its base (never remote code)."""
    from ..models import load_model, load_tokenizer
    import torch

    tokenizer = load_tokenizer(str(source.path))
    if source.kind == "full":
        return load_model(str(source.path), torch.device("cpu"), torch.float32).eval(), tokenizer
    if source.config is None:
        raise ConfigError(key="err.export.no_base", path=source.path.name)
    from peft import PeftModel

    base = load_model(source.config.model.spec, torch.device("cpu"), torch.float32)
    return PeftModel.from_pretrained(base, str(source.path)).merge_and_unload().eval(), tokenizer
