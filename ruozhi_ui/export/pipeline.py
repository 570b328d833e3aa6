"""One export, start to end: a zip, GGUF files (+ Modelfile), or a Hub push, from one checkpoint.

`run_export(request, progress)` is what the CLI calls directly and the Runs tab's job runs in its
thread. `progress(stage_key, fraction)` reports (an i18n key and 0..1) and may raise to cancel; every
step writes under a temporary name first, so a cancel leaves no half-written file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from .archive import write_zip
from .card import write_card
from .gguf_file import MODELFILE, Quant, check_quant, gguf_name, modelfile_text, stop_tokens, write_gguf
from .hub_push import check_repo_id, push_folder
from .source import ExportSource, checkpoint_files, describe, load_merged

Format = Literal["zip", "gguf", "hub"]
FORMATS: tuple[Format, ...] = ("zip", "gguf", "hub")
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path  # a checkpoint folder, already resolved by the policy
    format: Format
    output: Path  # zip: the .zip file; gguf: a folder; hub: a folder to stage the upload in
    quant: Quant = "f16"
    repo_id: str = ""  # hub: owner/name
    private: bool = True
    merged: bool = False  # LoRA: the merged model instead of the adapter (always merged for GGUF)
    with_gguf: bool = False  # hub: also upload a GGUF file and Modelfile
    token: str | None = field(default=None, repr=False)  # hub: from hub_push.choose_token; never logged
    uploads_dir: Path | None = None  # where the run's uploaded data file lives (the card's data table)


@dataclass(frozen=True)
class ExportResult:
    files: tuple[str, ...]  # what was written (absolute paths)
    url: str = ""  # hub: the repo


def _gguf_into(source: ExportSource, folder: Path, quant: Quant, progress: Progress, loaded=None) -> list[Path]:
    progress("export.stage_load", 0.0)
    model, tokenizer = loaded or load_merged(source)
    name = gguf_name(quant)
    progress("export.stage_gguf", 0.05)
    path = write_gguf(model, tokenizer, source.path, folder / name, quant, source.name,
                      progress=lambda done: progress("export.stage_gguf", 0.05 + 0.9 * done))
    system = source.config.data.system_prompt if source.config else ""
    (folder / MODELFILE).write_text(modelfile_text(name, system, stop_tokens(tokenizer)), encoding="utf-8")
    return [path, folder / MODELFILE]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same disk: no second copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def run_export(req: ExportRequest, progress: Progress = lambda key, done: None,
               api_factory: Callable | None = None) -> ExportResult:
    source = describe(req.checkpoint)
    output = Path(req.output)
    if req.format == "zip":
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".card-", dir=output.parent) as tmp:
            progress("export.stage_card", 0.0)
            card = write_card(source, Path(tmp), uploads_dir=req.uploads_dir)
            entries = [(p, str(p.relative_to(source.path))) for p in checkpoint_files(source.path)]
            entries += source.run_files() + [(p, p.name) for p in card]
            write_zip(entries, output, progress=lambda done: progress("export.stage_zip", done))
        return ExportResult(files=(str(output),))
    if req.format == "gguf":
        quant = check_quant(req.quant)
        output.mkdir(parents=True, exist_ok=True)
        files = _gguf_into(source, output, quant, progress)
        return ExportResult(files=tuple(str(p) for p in files))
    if req.format == "hub":
        repo_id = check_repo_id(req.repo_id)
        quant = check_quant(req.quant)
        if output.exists():
            shutil.rmtree(output)
        output.mkdir(parents=True)
        merged = req.merged and source.kind == "lora"
        loaded = None
        if merged:
            progress("export.stage_merge", 0.0)
            loaded = load_merged(source)
            loaded[0].save_pretrained(output, safe_serialization=True)
            loaded[1].save_pretrained(output)
        else:
            for p in checkpoint_files(source.path):
                _link_or_copy(p, output / p.relative_to(source.path))
        for path, name in source.run_files():
            _link_or_copy(path, output / name)
        gguf_files = _gguf_into(source, output, quant, progress, loaded) if req.with_gguf else []
        progress("export.stage_card", 0.0)
        (output / "README.md").unlink(missing_ok=True)  # peft's stub card, replaced by ours
        write_card(source, output, repo_id=repo_id, gguf_files=[p.name for p in gguf_files[:1]], merged=merged,
                   uploads_dir=req.uploads_dir)
        url = push_folder(output, repo_id, req.private, req.token, api_factory,
                          stage=lambda key: progress(key, 0.0))
        progress("export.stage_upload", 1.0)
        return ExportResult(files=tuple(sorted(str(p) for p in output.rglob("*") if p.is_file())), url=url)
    raise ValueError(f"unknown export format {req.format!r}")
