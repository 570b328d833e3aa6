"""A run's set-up and book-keeping: data, model, optimizer and stepper; its folder, log and checkpoints.

`setup` does everything before the first step and raises a RuozhiError (before any folder exists)
for a bad path, spec or setting. A `Run` then carries what the loop needs and the small jobs
around it: emitting events into `metrics.jsonl` and TensorBoard, reporting steps in bursts (each
read of a GPU loss is a sync), the phase the run is in, and saving checkpoints (in the
background for full-parameter GPU runs). Knows nothing of Gradio or threads beyond `emit`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from .. import checkpoints as ckpt
from ..config import TrainConfig, load_config, save_config, validate
from ..data import load_source
from ..encoding import check_questions_kept, encode_records, pad_id
from ..errors import ConfigError
from ..events import (CheckpointSaved, EmitFn, JobFailed, JobFinished, PhaseChanged, PrecisionChanged, RunStarted,
                      StepLogged, event_to_json)
from ..models import load_model, load_tokenizer, pick_device
from . import distributed
from .checkpointing import (BackgroundSaver, TrainState, cpu_snapshot, prune_epoch_checkpoints,
                            restore_training_state, save_checkpoint, save_merged, training_state_blob)
from .precision import Precision, choose_precision, make_optimizer
from .distributed import SINGLE, Ranks
from .step import choose_stepper, graphs_unusable, plan_epoch, uses_fast_layers

RESUMABLE_OVERRIDES = ("epochs", "max_steps", "device", "cuda_graphs", "fast_layers", "keep_checkpoints",
                       "run_name", "log_every_steps", "save_resume_state", "gpus", "shard")


class StopRequested(Exception):
    """Raised inside the loop when the stop event is seen at a safe point."""


def resolve_resume(cfg: TrainConfig) -> TrainConfig:
    """A resumed run: the checkpoint's own config, with only what may change taken from `cfg` (more
    epochs, the run name of the new folder, device choices). The original run is never written to."""
    if not cfg.resume_from:
        return cfg
    path = Path(cfg.resume_from)
    ckpt.recover_checkpoints(path.parent)
    if not ckpt.is_resumable(path):
        raise ConfigError(f"resume_from: '{path}' is not a resumable checkpoint (no {ckpt.TRAINING_STATE}); "
                          "pick the newest checkpoint of a run")
    saved = load_config(path / ckpt.CHECKPOINT_CONFIG)
    resumed = dataclasses.replace(saved, resume_from=str(path), **{k: getattr(cfg, k) for k in RESUMABLE_OVERRIDES})
    if resumed.gpus == saved.gpus:
        return resumed
    # on another number of GPUs the run keeps its global batch (batch_size per GPU x GPUs), so it goes on
    # with the same updates it would have made
    global_batch = saved.batch_size * saved.gpus
    if global_batch % resumed.gpus or (global_batch // resumed.gpus) % resumed.grad_accum_steps:
        raise ConfigError(f"resume_from: the run's global batch of {global_batch} examples does not split over "
                          f"{resumed.gpus} GPU(s); resume on a number of GPUs that divides it")
    return dataclasses.replace(resumed, batch_size=global_batch // resumed.gpus)


def build_model(cfg: TrainConfig, device: torch.device, prec: Precision):
    """Base model (or resumed weights), wrapped with LoRA when asked."""
    resume = Path(cfg.resume_from) if cfg.resume_from else None
    if cfg.method == "full":
        return load_model(str(resume) if resume else cfg.model.spec, device, prec.weight_dtype,
                          trust_remote_code=cfg.model.trust_remote_code)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_model(cfg.model.spec, device, prec.weight_dtype, trust_remote_code=cfg.model.trust_remote_code)
    if resume:
        return PeftModel.from_pretrained(base, str(resume), is_trainable=True)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, lora)


def failure_hint(error: BaseException) -> str:
    """What to try next, chosen by the error's type (an out-of-memory on the CPU says so in its text)."""
    if isinstance(error, torch.OutOfMemoryError) or (
            isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)):
        return ("Out of memory: lower the batch size (with gradient accumulation to keep the effective batch), "
                "shorten max lengths, or use LoRA.")
    if isinstance(error, MemoryError):
        return "Out of memory: lower the batch size, shorten max lengths, or use LoRA."
    if isinstance(error, FloatingPointError):
        return "The loss became NaN/inf: lower the learning rate or turn on gradient clipping (max_grad_norm)."
    if isinstance(error, OSError):
        return "Could not write the checkpoint: check free disk space and that the runs folder is writable."
    return ""


def saves_in_background(device: torch.device, cfg: TrainConfig) -> bool:
    """Full-parameter one-GPU runs write epoch checkpoints on a thread; on the CPU (slow steps anyway), for
    LoRA (small adapters) and on several GPUs (gathering the weights is a collective) a plain save is simpler."""
    return device.type == "cuda" and cfg.method == "full" and cfg.gpus == 1


def tensorboard_writer(folder: Path):
    """TensorBoard event files (Loss/train, Loss/val, as the reference wrote); None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; a bare GPU box may lack it
        return None
    return SummaryWriter(str(folder))


@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    prec: Precision
    tokenizer: object
    train_ex: list
    val_ex: list
    model: object
    optimizer: object
    stepper: object
    steps_per_epoch: int
    num_steps: int
    state: TrainState
    run_dir: Path
    emit: EmitFn
    t0: float
    ranks: Ranks = SINGLE
    wrapped: object = None  # what a distributed step calls: DDP or FSDP2 around LabelLoss(model); else the model
    saver: BackgroundSaver | None = None
    writer: object = None
    metrics_file: object = None
    final: Path | None = None
    last_checkpoint: str = ""
    val_losses: list = dataclasses.field(default_factory=list)
    last_train_loss: float | None = None
    epoch_end_s: float = 0.0  # time spent in validation, probes and saves so far (the ETA counts it)
    epoch_ends: int = 0
    pending: list = dataclasses.field(default_factory=list)  # (step, lr, loss on device), read in bursts
    window: list = dataclasses.field(default_factory=lambda: [0, time.time(), 0])  # tokens, start, steps timed

    @property
    def device(self) -> torch.device:
        return self.prec.device

    @property
    def pad_token_id(self) -> int:
        return pad_id(self.tokenizer)

    @property
    def eval_model(self):
        """What validation and the probes run: the model, or under FSDP2 its wrapper (which gathers the shards)."""
        return self.wrapped if self.ranks.shard == "fsdp" else self.model

    # --- events ---------------------------------------------------------------------------
    def log(self, event) -> None:
        if not self.ranks.is_main:  # rank 0 speaks for a run on several processes
            return
        self.metrics_file.write(json.dumps(event_to_json(event), ensure_ascii=False) + "\n")
        self.metrics_file.flush()
        self.emit(event)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def phase(self, name: str) -> None:
        if name == "training":  # tok/s counts training time only: the window restarts after an epoch end
            self.window[0], self.window[1] = 0, time.time()
        self.log(PhaseChanged(step=self.state.step, phase=name))

    def fell_back(self, description: str, reason: str) -> None:
        self.log(PrecisionChanged(step=self.state.step, precision=f"{self.prec.description}; {description}",
                                  steps_code=self.stepper.code, reason=reason))

    def report_step(self, lr: float, loss: torch.Tensor, num_tokens: int, flush: bool) -> None:
        """Queue a step's loss; every `log_every_steps` (or at an epoch's end) read the queue back in one sync."""
        self.pending.append((self.state.step, lr, loss))
        self.window[0] += num_tokens
        every = self.cfg.log_every_steps or (10 if self.device.type == "cuda" else 1)  # a GPU runs ahead between reads
        if len(self.pending) < every and not flush:
            return
        losses = torch.stack([p[2] for p in self.pending]).tolist()
        now = time.time()
        tok_per_s = self.window[0] / max(now - self.window[1], 1e-9)
        self.window[2] += len(self.pending)
        step_s = (now - self.t0 - self.epoch_end_s) / self.window[2]
        epoch_ends_left = max(0, math.ceil(self.num_steps / self.steps_per_epoch) - self.epoch_ends)
        eta = step_s * (self.num_steps - self.state.step) + self.epoch_end_s_estimate(step_s) * epoch_ends_left
        for (step, step_lr, _), value in zip(self.pending, losses):
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {step}")
            self.scalar("Loss/train", value, step)
            self.log(StepLogged(step=step, epoch=step / self.steps_per_epoch, loss=value, lr=step_lr,
                                tok_per_s=tok_per_s, elapsed_s=now - self.t0, eta_s=eta,
                                mem_gib=self.prec.peak_memory_gib(), num_steps=self.num_steps))
        self.last_train_loss = losses[-1]
        self.collect_saves(block=False)
        self.pending, self.window[0], self.window[1] = [], 0, now

    def epoch_end_s_estimate(self, step_s: float) -> float:
        """Seconds one epoch end (validation, probes, save) takes: measured once one has run; before that,
        validation's forward passes priced at a third of a training step's batch (no backward, no optimizer
        step) plus the probes' answers as one forward per new token. Without it the first epoch's ETA was
        about half the truth."""
        if self.epoch_ends:
            return self.epoch_end_s / self.epoch_ends
        forward_s = step_s / 3
        val_batches = math.ceil(len(self.val_ex) / max(1, self.cfg.batch_size))
        probe_tokens = self.cfg.probe_max_new_tokens if self.cfg.probe_prompts else 0
        return forward_s * val_batches + forward_s / max(1, self.cfg.batch_size) * probe_tokens

    # --- checkpoints ----------------------------------------------------------------------
    def saved(self, path: Path, step: int, epoch: int, final: bool = False) -> None:
        self.last_checkpoint = str(path)
        self.log(CheckpointSaved(step=step, epoch=epoch, path=str(path), final=final))
        prune_epoch_checkpoints(self.run_dir, self.cfg.keep_checkpoints)

    def collect_saves(self, block: bool) -> None:
        for done in self.saver.finished(block) if self.saver else ():
            self.saved(*done)

    def checkpoint(self, name: str, final: bool = False) -> Path | None:
        """Save now (the final one always before it is reported) or, for an epoch of a GPU run, in the background."""
        s = self.state
        metrics = copy.deepcopy({"val_loss": self.val_losses, "train_loss_last": self.last_train_loss,
                                 "step": s.step, "epoch": s.epoch})  # a background write must not see later values
        if self.ranks.distributed:
            return self.checkpoint_from_ranks(name, metrics, final)
        blob = training_state_blob(self.optimizer.state_dict(), s) if self.cfg.save_resume_state else None
        if self.saver and not final:
            weights, blob = cpu_snapshot(self.model.state_dict()), cpu_snapshot(blob)
            write = lambda: save_checkpoint(self.model, self.tokenizer, self.cfg, self.run_dir, name, metrics,
                                            weights, blob)
            for done in self.saver.submit(write, s.step, s.epoch):
                self.saved(*done)
            return None
        self.collect_saves(block=True)
        path = save_checkpoint(self.model, self.tokenizer, self.cfg, self.run_dir, name, metrics, training_blob=blob)
        self.saved(path, s.step, s.epoch, final=final)
        return path

    def checkpoint_from_ranks(self, name: str, metrics: dict, final: bool) -> Path | None:
        """Every rank helps gather the weights and optimizer state (FSDP2); rank 0 writes them."""
        weights = distributed.full_weights(self.wrapped, self.model, self.ranks)
        blob = None
        if self.cfg.save_resume_state:
            optimizer_state = distributed.full_optimizer_state(self.wrapped, self.model, self.optimizer, self.ranks)
            blob = training_state_blob(optimizer_state, self.state) if self.ranks.is_main else None
        if not self.ranks.is_main:
            return None
        path = save_checkpoint(self.model, self.tokenizer, self.cfg, self.run_dir, name, metrics, weights, blob)
        self.saved(path, self.state.step, self.state.epoch, final=final)
        return path

    # --- ending ---------------------------------------------------------------------------
    def finish(self, status: str) -> None:
        self.phase("saving")
        self.final = self.checkpoint(ckpt.FINAL, final=True)
        if status == "finished" and self.cfg.method == "lora" and self.cfg.save_merged and self.ranks.is_main:
            save_merged(self.model, self.tokenizer, self.cfg, self.run_dir)
        self.log(JobFinished(status=status, run_dir=str(self.run_dir), final_checkpoint=str(self.final),
                             elapsed_s=time.time() - self.t0, finished_at=time.time()))

    def fail(self, error: Exception) -> None:
        try:
            self.collect_saves(block=True)
        except Exception:  # noqa: BLE001 - the training failure is the one to report
            pass
        self.log(JobFailed(error=f"{type(error).__name__}: {error}", hint=failure_hint(error),
                           run_dir=str(self.run_dir), last_checkpoint=self.last_checkpoint, finished_at=time.time()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()


def setup(cfg: TrainConfig, emit: EmitFn, runs_root: Path, continue_in: Path | None = None) -> Run:
    """Everything before the first step; the run folder is made last, once nothing can fail on bad input.
    A run with `gpus` > 1 is one torchrun rank of it (see distributed.py): rank 0 makes the folder."""
    t0 = time.time()
    cfg = resolve_resume(validate(cfg))
    root = Path(runs_root)
    device = pick_device(cfg.device)
    ranks = start_ranks(cfg, device)
    if ranks.distributed and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    prec = choose_precision(cfg, device)
    why_not = graphs_unusable(cfg, prec)
    if cfg.cuda_graphs == "on" and why_not:
        raise ConfigError(f"cuda_graphs='on': {why_not}; or use cuda_graphs='auto'")
    if cfg.cuda_graphs != "off" and not why_not:  # kernels build while data and model load
        from ..cuda.warm_up import start_warm_up

        start_warm_up(device, prec.weight_dtype, uses_fast_layers(cfg),
                      None if cfg.model.trust_remote_code else cfg.model.spec)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.spec, trust_remote_code=cfg.model.trust_remote_code)
    d = cfg.data
    splits = load_source(d.source, d.val_fraction, d.seed, uploads_dir=root / ckpt.UPLOADS_DIR, columns=d.columns,
                         subset=d.subset, train_split=d.train_split, val_split=d.val_split)
    encode = lambda records: encode_records(tokenizer, records, d.system_prompt, d.max_source_length,
                                            d.max_target_length, train_all_turns=d.train_all_turns,
                                            label_truncated_end=d.label_truncated_end)
    train_ex, val_ex = encode(splits.train), encode(splits.val)
    check_questions_kept(train_ex + val_ex, d.max_source_length)
    # several ranks load on the CPU first: FSDP2 moves only each rank's shard to its GPU
    model = build_model(cfg, torch.device("cpu") if ranks.distributed else device, prec)
    model.config.use_cache = False
    model.train()
    wrapped = model
    if ranks.distributed:
        ranks = dataclasses.replace(ranks, shard=distributed.choose_shard(
            cfg.shard, sum(p.numel() for p in model.parameters()), device))
        if ranks.shard == "fsdp" and cfg.method == "lora" and cfg.save_merged:
            raise ConfigError("save_merged needs the whole model in one process; with shard='fsdp' merge the "
                              "adapter afterwards (peft's merge_and_unload), or use shard='ddp'")
        if ranks.shard == "ddp":
            model.to(device)
        wrapped = distributed.wrap(model, ranks, device, prec.autocast_dtype)
    optimizer = make_optimizer(model, cfg, prec)
    steps_per_epoch = len(plan_epoch([len(e) for e in train_ex], cfg, 0))
    num_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs)
    load_optimizer = optimizer.load_state_dict
    if ranks.distributed:
        load_optimizer = lambda saved: distributed.load_optimizer_state(wrapped, model, optimizer, saved, ranks)
    state = restore_training_state(Path(cfg.resume_from), load_optimizer) if cfg.resume_from else TrainState()
    run_dir, metrics_file, writer = Path(), None, None
    if ranks.is_main:
        run_dir, metrics_file = make_run_folder(cfg, root) if continue_in is None else reopen_run_folder(root, continue_in)
        writer = tensorboard_writer(run_dir / ckpt.TENSORBOARD)
    if ranks.distributed:
        run_dir = Path(distributed.broadcast_text(str(run_dir), ranks))
    run = Run(cfg=cfg, prec=prec, tokenizer=tokenizer, train_ex=train_ex, val_ex=val_ex, model=model,
              optimizer=optimizer, stepper=None, steps_per_epoch=steps_per_epoch, num_steps=num_steps, state=state,
              run_dir=run_dir, emit=emit, t0=t0, metrics_file=metrics_file, writer=writer, ranks=ranks,
              wrapped=wrapped, saver=BackgroundSaver() if saves_in_background(device, cfg) else None)
    if ranks.distributed:
        run.stepper = distributed.DistributedStep(wrapped, model, optimizer, cfg, prec, run.pad_token_id, ranks)
    else:
        run.stepper = choose_stepper(model, optimizer, cfg, prec, run.pad_token_id, run.fell_back)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    where = f"{ranks.world} x {prec.device_name}" if ranks.distributed else prec.device_name
    run.log(RunStarted(run_dir=str(run_dir), num_steps=num_steps, steps_per_epoch=steps_per_epoch,
                       num_train=len(train_ex), num_val=len(val_ex), params_trained=trained,
                       params_total=sum(p.numel() for p in model.parameters()), device=where,
                       precision=f"{prec.description}; {run.stepper.description}", start_step=state.step,
                       precision_code=prec.code, steps_code=run.stepper.code, resumed_from=cfg.resume_from))
    return run


def start_ranks(cfg: TrainConfig, device: torch.device) -> Ranks:
    """This process's place in a run on several processes (`gpus` > 1, under torchrun); alone: SINGLE."""
    if cfg.gpus == 1:
        return SINGLE
    ranks = distributed.start_ranks(device.type)
    if ranks.world != cfg.gpus:
        raise ConfigError(f"gpus={cfg.gpus} runs under torchrun with {cfg.gpus} processes: start it with "
                          f"`python -m ruozhi_ui train --gpus {cfg.gpus}` or from the app")
    return ranks


def make_run_folder(cfg: TrainConfig, root: Path):
    """A new run folder with its config and metrics log (a crash mid-save of an earlier run is repaired first)."""
    for folder in root.glob(f"*/{ckpt.CHECKPOINTS}"):  # a crash mid-save of an earlier run: put `final` back
        ckpt.recover_checkpoints(folder)
    run_dir = ckpt.unique_run_dir(root, cfg.run_name)
    try:
        (run_dir / ckpt.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / ckpt.RUN_CONFIG)
        return run_dir, open(run_dir / ckpt.METRICS, "a", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"Cannot write the run folder '{run_dir}' ({e.strerror or e}); "
                          "check that the runs folder is writable and the disk has space") from None


def reopen_run_folder(root: Path, run_dir: Path):
    """A run's own folder, to go on in (the next GPU lease of the run): its metrics log reopened to append."""
    folder = ckpt.run_dir_for(root, Path(run_dir).name)
    if folder != Path(run_dir).resolve() or not (folder / ckpt.RUN_CONFIG).is_file():
        raise ConfigError(f"'{run_dir}' is not a run folder under the runs folder '{root}'")
    return folder, open(folder / ckpt.METRICS, "a", encoding="utf-8")
