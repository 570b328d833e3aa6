"""The headless command line: `python -m ruozhi_ui stats|train|export ...`.

`stats` prints the token-length table for a dataset (tokenizer only, never
weights); `train` builds a TrainConfig from the flags given, validates it and
runs the same `engine.train` the app uses, printing progress to stderr.
Defaults come from config.py's dataclasses: a flag left out keeps the field's
default. User errors print one "error: ..." line and exit 2; a failed job exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .errors import ConfigError, RuozhiError

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every user error is one line."""

    def error(self, message):
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def _quiet_transformers() -> None:
    """No download bars or warnings between our progress lines."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    # Every option defaults to None: only flags the user gave override the dataclasses.
    parser = _Parser(prog="python -m ruozhi_ui", description="ruozhi-sft studio, headless")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p):
        p.add_argument("--data", dest="source",
                       help="'sample', a .json/.jsonl/.csv/.tsv/.parquet file, or a Hub dataset id")
        p.add_argument("--columns", help="which field is which, e.g. instruction=question,output=answer or "
                                         "format=sharegpt,user_tag=human (default: detected; see docs/datasets.md)")
        p.add_argument("--subset", help="a Hub dataset's config (default: its default, or the first)")
        p.add_argument("--train-split", help="the Hub split to train on (default: train, or the first)")
        p.add_argument("--val-split", help="the Hub split to validate on (default: validation/valid/val/test, "
                                           "else a held-out share)")
        p.add_argument("--model", dest="spec", help="Hub id, local folder, or 'demo'")
        p.add_argument("--trust-remote-code", action="store_true", default=None,
                       help="run code shipped with the model (off unless given)")
        p.add_argument("--system-prompt")
        p.add_argument("--max-source-length", type=int)
        p.add_argument("--max-target-length", type=int)

    s = sub.add_parser("stats", help="token-length statistics of a dataset (loads the tokenizer only)")
    common(s)
    s.add_argument("--split", default="all", choices=["train", "val", "all"],
                   help="all (default: the whole source, as the Data tab and the reference's table), train or val")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    t = sub.add_parser("train", help="fine-tune headlessly with the app's engine")
    common(t)
    t.add_argument("--output", help="run name under the runs folder, or a path like runs/my-run")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum-steps", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--lr-schedule", help="constant or cosine")
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--method", help="full or lora")
    t.add_argument("--lora-rank", type=int)
    t.add_argument("--lora-alpha", type=int)
    t.add_argument("--lora-dropout", type=float)
    t.add_argument("--packing", action="store_true", default=None)
    t.add_argument("--save-merged", action="store_true", default=None)
    t.add_argument("--resume", dest="resume_from", metavar="CKPT", help="checkpoint folder to continue from")
    t.add_argument("--seed", type=int)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--device", help="auto, cpu or cuda")
    t.add_argument("--gpus", type=int, help="train on N GPUs under torchrun (default 1: in this process)")
    t.add_argument("--shard", help="with --gpus: ddp, fsdp (FSDP2 shards the model) or auto")
    add_export_parser(sub)
    return parser


def add_export_parser(sub) -> None:
    from .export import FORMATS, QUANTS

    e = sub.add_parser("export", help="a checkpoint as a zip, GGUF files + Ollama Modelfile, or a Hub model repo")
    e.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/my-run/checkpoints/final")
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--output", help="zip: the .zip file; gguf: a folder; hub: a folder to stage the upload in "
                                    "(default: a temporary one)")
    e.add_argument("--quant", default="f16", choices=QUANTS, help="GGUF type (gguf, or hub with --with-gguf)")
    e.add_argument("--repo-id", default="", help="hub: OWNER/NAME")
    e.add_argument("--private", dest="private", action="store_true", default=True, help="hub: a private repo (default)")
    e.add_argument("--public", dest="private", action="store_false", help="hub: a public repo")
    e.add_argument("--merged", action="store_true", help="LoRA, hub: push base+adapter merged instead of the adapter")
    e.add_argument("--with-gguf", action="store_true", help="hub: also push a GGUF file and Modelfile")


def _given(args: argparse.Namespace, cls, exclude: tuple[str, ...] = ()) -> dict:
    """The flags the user gave that are fields of `cls` (None means 'keep the default')."""
    names = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# --seed is the run's seed (TrainConfig.seed); the hold-out split keeps DataConfig's own.
_NOT_DATA = ("seed",)


def build_train_config(args: argparse.Namespace, run_name: str | None = None):
    from .config import DataConfig, ModelConfig, TrainConfig, validate

    fields = _given(args, TrainConfig)
    if run_name is not None:
        fields["run_name"] = run_name
    cfg = TrainConfig(model=ModelConfig(**_given(args, ModelConfig)),
                      data=DataConfig(**_given(args, DataConfig, exclude=_NOT_DATA)), **fields)
    return validate(cfg)


def resume_config(args: argparse.Namespace, run_name: str | None):
    """`--resume CKPT`: the checkpoint's own settings, continued into a new run folder (`--output`, or
    `<run>-cont`). Flags that would change what the checkpoint was trained with are refused, all named in
    one line; only how long and where it runs may change."""
    from .checkpoints import CHECKPOINT_CONFIG
    from .config import DataConfig, ModelConfig, TrainConfig, load_config, validate
    from .train.run import RESUMABLE_OVERRIDES

    path = Path(args.resume_from)
    if not (path / CHECKPOINT_CONFIG).is_file():
        raise ConfigError(f"--resume: '{path}' is not a checkpoint of a run (no {CHECKPOINT_CONFIG})")
    saved = load_config(path / CHECKPOINT_CONFIG)
    conflicts = [f"--{name.replace('_', '-')}" for name, value in
                 [*_given(args, TrainConfig).items(), *_given(args, ModelConfig).items(),
                  *_given(args, DataConfig, exclude=_NOT_DATA).items()]
                 if name not in RESUMABLE_OVERRIDES + ("resume_from",)
                 and value != getattr(saved.model if name in ("spec", "trust_remote_code") else
                                      saved.data if name in {f.name for f in dataclasses.fields(DataConfig)} else saved,
                                      name)]
    if conflicts:
        raise ConfigError(f"--resume continues the checkpoint with its own settings; these flags would change them: "
                          f"{', '.join(sorted(conflicts))} (leave them out, or start a new run)")
    overrides = {k: v for k, v in _given(args, TrainConfig).items() if k in RESUMABLE_OVERRIDES}
    name = run_name or f"{path.parent.parent.name}-cont"
    return validate(dataclasses.replace(saved, resume_from=str(path), run_name=name, **overrides))


def split_output(output: str | None, default_root: Path) -> tuple[Path, str | None]:
    """`--output name` -> (runs root, name); `--output some/dir/name` -> (some/dir, name)."""
    if not output:
        return default_root, None
    if os.sep in output or (os.altsep and os.altsep in output):
        path = Path(output).expanduser()
        return path.parent.resolve(), path.name
    return default_root, output


def _load_split(cfg_data, split: str):
    from .data import load_source

    splits = load_source(cfg_data.source, cfg_data.val_fraction, cfg_data.seed, columns=cfg_data.columns,
                         subset=cfg_data.subset, train_split=cfg_data.train_split, val_split=cfg_data.val_split)
    records = {"train": splits.train, "val": splits.val, "all": splits.train + splits.val}[split]
    return splits, records


def cmd_stats(args: argparse.Namespace) -> int:
    from .config import DataConfig, ModelConfig
    from .models import load_tokenizer
    from .stats import compute_stats, format_table, stats_to_dict

    data_cfg = DataConfig(**_given(args, DataConfig, exclude=_NOT_DATA))
    model_cfg = ModelConfig(**_given(args, ModelConfig))
    if data_cfg.max_source_length < 1 or data_cfg.max_target_length < 1:
        raise ConfigError("max_source_length and max_target_length must be at least 1 token")
    splits, records = _load_split(data_cfg, args.split)
    tokenizer = load_tokenizer(model_cfg.spec, trust_remote_code=model_cfg.trust_remote_code)
    stats = compute_stats(records, tokenizer, data_cfg.system_prompt, data_cfg.max_source_length,
                          data_cfg.max_target_length)
    if args.json:
        print(json.dumps(stats_to_dict(stats), ensure_ascii=False))
    else:
        print(f"data: {splits.origin}, split {args.split}; read as {splits.detected}"
              f"{' (guessed from column names: check it, or set --columns)' if splits.guessed else ''}; "
              f"tokenizer: {model_cfg.spec}")
        for note in splits.notes:
            print(f"note: {note}")
        print(format_table(stats))
    return EXIT_OK


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Printer:
    """The CLI's emit: one stderr line per event; remembers how the job ended."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.failed = None  # the JobFailed event, if any
        self.finished = None  # the JobFinished event, if any

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __call__(self, event) -> None:
        from . import events as ev

        if isinstance(event, ev.RunStarted):
            resumed = f", resuming at step {event.start_step}" if event.start_step else ""
            self._say(f"run {event.run_dir}: {event.num_steps} steps ({event.steps_per_epoch}/epoch), "
                      f"{event.num_train} train / {event.num_val} val examples, "
                      f"{event.params_trained:,} of {event.params_total:,} params trained, "
                      f"{event.device}, {event.precision}{resumed}")
        elif isinstance(event, ev.StepLogged):
            self._say(f"step {event.step}/{event.num_steps}  epoch {event.epoch:.2f}  loss {event.loss:.4f}  "
                      f"lr {event.lr:.2e}  {event.tok_per_s:,.0f} tok/s  ETA {_duration(event.eta_s)}")
        elif isinstance(event, ev.EvalDone):
            self._say(f"epoch {event.epoch}: val loss {event.val_loss:.4f} (ppl {event.val_ppl:.2f}) at step {event.step}")
        elif isinstance(event, ev.SampleGenerated):
            for prompt, answer in event.answers:
                one_line = " ".join(answer.split())
                self._say(f"  probe: {prompt}\n  -> {one_line[:200]}")
        elif isinstance(event, ev.CheckpointSaved):
            self._say(f"{'final ' if event.final else ''}checkpoint saved: {event.path}")
        elif isinstance(event, ev.JobFinished):
            self.finished = event
            self._say(f"{event.status} after {_duration(event.elapsed_s)}; final checkpoint: {event.final_checkpoint}")
        elif isinstance(event, ev.JobFailed):
            self.failed = event
            hint = f" ({event.hint})" if event.hint else ""
            self._say(f"error: training failed: {event.error}{hint}")


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoints import runs_root

    from .policy import policy_from_env

    root, run_name = split_output(args.output, runs_root())
    # The person at the shell is the machine's operator: local mode, with the operator's limits.
    policy = policy_from_env(root, mode="local")
    cfg = resume_config(args, run_name) if args.resume_from else build_train_config(args, run_name)
    cfg = policy.check_train_config(cfg, policy.visitor())
    # The engine loads the tokenizer and the data before the model and raises a
    # RuozhiError for a bad path or spec, so those fail in seconds, as one line (main).
    from .launcher import train  # in this process, or on --gpus processes under torchrun

    printer, stop_event = Printer(), threading.Event()

    def on_interrupt(signum, frame):
        # First Ctrl-C: finish the step and save; a second one aborts at once.
        printer._say("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
        stop_event.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main_thread else None
    try:
        final = train(cfg, printer, stop_event, root)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    if printer.failed is not None:
        return EXIT_JOB_FAILED
    if final is not None:
        print(final)  # stdout carries only the checkpoint path, for scripts
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Export one checkpoint; progress on stderr, the written paths (and the repo URL) on stdout."""
    import tempfile

    from .export import ExportRequest, run_export
    from .i18n import t

    path = Path(args.checkpoint).expanduser().resolve()
    if args.format != "hub" and not args.output:
        raise ConfigError(f"--output is needed for --format {args.format}")
    output = Path(args.output or tempfile.mkdtemp(prefix="ruozhi-push-")).expanduser().resolve()
    shown = {"stage": ""}

    def progress(stage: str, done: float) -> None:
        if stage != shown["stage"]:
            shown["stage"] = stage
            print(f"{t(stage, 'en')}...", file=sys.stderr)

    result = run_export(ExportRequest(checkpoint=path, format=args.format, output=output, quant=args.quant,
                                      repo_id=args.repo_id, private=args.private, merged=args.merged,
                                      with_gguf=args.with_gguf), progress)
    print("\n".join([*result.files, *([result.url] if result.url else [])]))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _quiet_transformers()
        return {"stats": cmd_stats, "train": cmd_train, "export": cmd_export}[args.command](args)
    except RuozhiError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help and friends
        return e.code if isinstance(e.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
