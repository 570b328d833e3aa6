"""The SFT loop: plain PyTorch, one `train()` that reads top to bottom.

setup (data -> encoded examples, model, optimizer) -> per epoch: length-grouped
batches -> per step: lr_at(step), micro-batches, clip, step -> at epoch end:
validation loss, probe answers, checkpoint. Progress leaves only through
`emit(event)` (see events.py); a `threading.Event` asks for a graceful stop.
It knows nothing of Gradio or threads beyond that event. Speed techniques for
CUDA live in small named helpers (fastpath.py); the CPU path stays plain.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import checkpoints as ckpt
from .config import TrainConfig, load_config, save_config, validate
from .data import Record, load_source
from .encoding import collate_packed, collate_padded, encode_records, length_grouped_batches, pad_id, render_prompt
from .errors import ConfigError
from .events import (CheckpointSaved, EmitFn, EvalDone, JobFailed, JobFinished, NullSink, RunStarted,
                     SampleGenerated, StepLogged)
from .loss import batch_loss_sum, label_positions
from .models import load_model, load_tokenizer, pick_device
from .precision import Precision, choose_precision, make_optimizer, set_lr


class StopRequested(Exception):
    """Raised inside the loop when the stop event is seen at a safe point."""


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimiser steps done
    epoch: int = 0  # epochs fully done
    step_in_epoch: int = 0  # steps done within the current epoch


def cosine_lr_with_warmup(step: int, cfg: TrainConfig, num_steps: int) -> float:
    # 1) linear warmup from lr/warmup to lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    # 2) constant (the reference) stays at lr
    if cfg.lr_schedule == "constant":
        return cfg.lr
    # 3) cosine from lr down to 10% of lr at the last step
    progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def plan_epoch(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The epoch's batches: a pure function of (seed, epoch), so a resumed run replays it exactly."""
    return length_grouped_batches(lengths, cfg.batch_size, seed=cfg.seed * 1000 + epoch)


def make_micro_batches(examples, cfg: TrainConfig, pad_token_id: int, device: torch.device) -> list[dict]:
    """Split one step's examples into grad_accum_steps micro-batches, collated and on `device`."""
    per_micro = math.ceil(len(examples) / cfg.grad_accum_steps)
    micro = []
    for start in range(0, len(examples), per_micro):
        group = examples[start:start + per_micro]
        batch = collate_packed(group) if cfg.packing else collate_padded(group, pad_token_id)
        batch["positions"], batch["targets"] = label_positions(batch.pop("labels"))
        batch["num_tokens"] = sum(len(e) for e in group)
        micro.append({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()})
    return micro


class EagerStep:
    """One optimiser step the plain way: forward/backward per micro-batch, clip, AdamW step, zero grads.

    Called as (batch_no, examples, lr) -> (mean loss of the step as a device tensor, input tokens).
    fastpath.CudaGraphStep has the same shape and replays the whole step as a CUDA graph.
    """

    description = "eager steps"

    def __init__(self, model, optimizer, cfg: TrainConfig, prec: Precision, pad_token_id: int):
        self.model, self.optimizer, self.cfg, self.prec, self.pad_token_id = model, optimizer, cfg, prec, pad_token_id
        self.step_fn = prec.wrap_step(model, batch_loss_sum)

    def prepare_epoch(self, train_examples, batches) -> None:
        pass  # batches are collated step by step

    def __call__(self, batch_no: int, examples, lr: float) -> tuple[torch.Tensor, int]:
        set_lr(self.optimizer, lr)
        micro = make_micro_batches(examples, self.cfg, self.pad_token_id, self.prec.device)
        loss = self.step_fn(micro, sum(mb["targets"].numel() for mb in micro))
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, sum(mb["num_tokens"] for mb in micro)


def uses_cuda_graphs(cfg: TrainConfig, prec: Precision) -> bool:
    """CUDA graphs for full-parameter bf16 steps on CUDA (one micro-batch per step); eager otherwise."""
    return (prec.device.type == "cuda" and cfg.cuda_graphs != "off" and prec.stochastic_bf16_optimizer
            and cfg.grad_accum_steps == 1)


def uses_fast_layers(cfg: TrainConfig) -> bool:
    """Inside the CUDA graphs, decoder layers with fused kernels (Qwen2) or compiled (others): both need Triton."""
    from .fastpath import triton_available

    return cfg.torch_compile == "auto" and triton_available()


def choose_stepper(model, optimizer, cfg: TrainConfig, prec: Precision, pad_token_id: int):
    if uses_cuda_graphs(cfg, prec):
        from .fastpath import CudaGraphStep

        return CudaGraphStep(model, optimizer, cfg, pad_token_id, prec.device, uses_fast_layers(cfg))
    return EagerStep(model, optimizer, cfg, prec, pad_token_id)


def attention_backends(device: torch.device):
    """On CUDA, PyTorch's attention without its cuDNN kernel: cuDNN builds a plan for every new shape
    (~0.2 s each, and training buckets plus validation batches make dozens), flash attention needs
    none and runs these steps as fast."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def count_trainable(model) -> tuple[int, int]:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trained, sum(p.numel() for p in model.parameters())


@torch.no_grad()
def estimate_val_loss(model, examples, cfg: TrainConfig, pad_token_id: int, device, prec: Precision) -> float:
    """Mean loss over every validation label token (the training objective, no grad)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    for start in range(0, len(order), cfg.batch_size):
        group = [examples[i] for i in order[start:start + cfg.batch_size]]
        # Padded, never packed: packing needs a per-example mask, which the CUDA path's causal-only attention drops.
        plain = dataclasses.replace(cfg, grad_accum_steps=1, packing=False)
        for mb in make_micro_batches(group, plain, pad_token_id, device):
            with prec.autocast():
                total += batch_loss_sum(model, mb, chunk_size=512)  # ~0.8 GB of fp32 logits at a time
            count += mb["targets"].numel()
    model.train(was_training)
    return (total / max(count, 1)).item()


@torch.no_grad()
def generate_probes(model, tokenizer, cfg: TrainConfig, device) -> tuple[tuple[str, str], ...]:
    """Greedy answers to the probe prompts, rendered exactly as training renders prompts."""
    was_training = model.training
    model.eval()
    answers = []
    for prompt in cfg.probe_prompts:
        text = render_prompt(tokenizer, Record(instruction=prompt, output=""), cfg.data.system_prompt)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.probe_max_new_tokens,
                             do_sample=False, pad_token_id=pad_id(tokenizer))
        answers.append((prompt, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    model.train(was_training)
    return tuple(answers)


def training_state_blob(optimizer, state: TrainState) -> dict:
    """What resuming needs besides the weights: optimizer moments, position in the data, RNGs."""
    return {
        "state": dataclasses.asdict(state),
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.random.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": random.getstate(),
    }


def cpu_snapshot(obj, memo: dict | None = None):
    """A CPU copy of every tensor in nested dicts/lists/tuples; tensors shared before (tied weights) stay shared."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        key = (obj.data_ptr(), obj.dtype, tuple(obj.shape), obj.device)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v, memo) for v in obj)
    return obj


def save_checkpoint(model, tokenizer, cfg: TrainConfig, run_dir: Path, name: str, metrics: dict,
                    weights: dict | None = None, training_blob: dict | None = None) -> Path:
    """Write a loadable checkpoint folder atomically (temp folder, then rename).

    `weights` is a state dict to write instead of the model's live one (a snapshot
    taken for a background save); `training_blob` (see training_state_blob) makes
    the checkpoint resumable.
    """
    final_path = run_dir / "checkpoints" / name
    tmp = ckpt.begin_checkpoint(final_path)
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "run_config.json")
        (tmp / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
        if training_blob is not None:
            torch.save(training_blob, tmp / ckpt.TRAINING_STATE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder must never look like a checkpoint
        raise
    path = ckpt.commit_checkpoint(tmp, final_path)
    # Only the newest checkpoint keeps the (large) optimizer state needed to resume.
    for other in (run_dir / "checkpoints").iterdir():
        if other != path and (other / ckpt.TRAINING_STATE).exists():
            (other / ckpt.TRAINING_STATE).unlink()
    return path


def saves_in_background(device: torch.device, cfg: TrainConfig) -> bool:
    """Full-parameter GPU runs write epoch checkpoints on a thread; on the CPU (slow steps anyway)
    and for LoRA (small adapters) a plain synchronous save is simpler."""
    return device.type == "cuda" and cfg.method == "full"


class BackgroundSaver:
    """Writes one checkpoint at a time on a thread while training goes on.

    Writing a 0.5B model takes about a second, mostly file I/O that releases the
    GIL, so the GPU keeps stepping meanwhile. The caller hands over a CPU snapshot,
    so later steps cannot change what is written. Finished saves are handed back
    on the training thread by `finished()`, which also re-raises a failed save.
    """

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.outcome: tuple = ()

    def submit(self, write: Callable[[], Path], *info) -> list[tuple]:
        """Start `write` after any previous save; returns that previous save's (path, *info), if any."""
        done = self.finished(block=True)

        def run() -> None:
            try:
                self.outcome = (write(), *info)
            except BaseException as e:  # handed to the training thread
                self.outcome = (e, *info)

        self.thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self.thread.start()
        return done

    def finished(self, block: bool = False) -> list[tuple]:
        if self.thread is None or (self.thread.is_alive() and not block):
            return []
        self.thread.join()
        self.thread = None
        if isinstance(self.outcome[0], BaseException):
            raise self.outcome[0]
        return [self.outcome]


def restore_training_state(path: Path, optimizer) -> TrainState:
    blob = torch.load(path / ckpt.TRAINING_STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    torch.random.set_rng_state(blob["rng_torch"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    random.setstate(blob["rng_python"])
    return TrainState(**blob["state"])


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


def resolve_resume(cfg: TrainConfig) -> tuple[TrainConfig, Path | None]:
    """For a resumed run, the original run's config (epochs may be raised) and folder."""
    if not cfg.resume_from:
        return cfg, None
    path = Path(cfg.resume_from)
    if not (path / ckpt.TRAINING_STATE).is_file() or not (path / "run_config.json").is_file():
        raise ConfigError(f"resume_from: '{path}' is not a resumable checkpoint (no {ckpt.TRAINING_STATE}); "
                          "pick the newest checkpoint of a run")
    saved = load_config(path / "run_config.json")
    merged = dataclasses.replace(saved, resume_from=str(path), epochs=max(cfg.epochs, saved.epochs),
                                 max_steps=cfg.max_steps, device=cfg.device, cuda_graphs=cfg.cuda_graphs,
                                 torch_compile=cfg.torch_compile)
    return merged, path.parent.parent


class _NoWriter:
    def add_scalar(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(folder: Path):
    """TensorBoard event files (Loss/train, Loss/val, as the reference wrote); a no-op without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is in requirements.txt; a bare GPU box may lack it
        return _NoWriter()
    return SummaryWriter(str(folder))


def failure_hint(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".lower()
    if "out of memory" in text or isinstance(error, torch.cuda.OutOfMemoryError):
        return "Out of memory: lower the batch size (with gradient accumulation to keep the effective batch), shorten max lengths, or use LoRA."
    if "nan" in text or "inf" in text:
        return "The loss became NaN/inf: lower the learning rate or turn on gradient clipping (max_grad_norm)."
    if isinstance(error, OSError):
        return "Could not write the checkpoint: check free disk space and that the runs folder is writable."
    return ""


def train(cfg: TrainConfig, emit: EmitFn | None = None, stop_event: threading.Event | None = None,
          runs_root: Path | None = None) -> Path | None:
    """Run one SFT job. Setup errors raise RuozhiError; failures during the run emit JobFailed."""
    emit = emit or NullSink()
    stop_event = stop_event or threading.Event()
    t0 = time.time()
    # ---- setup -------------------------------------------------------------------------
    cfg, resumed_run_dir = resolve_resume(validate(cfg))
    root = Path(runs_root) if runs_root else ckpt.runs_root()
    device = pick_device(cfg.device)
    prec = choose_precision(cfg, device)
    if uses_cuda_graphs(cfg, prec):  # kernels build while the data and model load
        from .fastpath import start_warm_up

        start_warm_up(device, prec.weight_dtype, uses_fast_layers(cfg),
                      None if cfg.model.trust_remote_code else cfg.model.spec)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.spec, trust_remote_code=cfg.model.trust_remote_code)
    splits = load_source(cfg.data.source, cfg.data.val_fraction, cfg.data.seed, uploads_dir=root / ckpt.UPLOADS_DIR)
    d = cfg.data
    encode = lambda rs: encode_records(tokenizer, rs, d.system_prompt, d.max_source_length, d.max_target_length)
    train_ex, val_ex = encode(splits.train), encode(splits.val)
    lengths = [len(e) for e in train_ex]
    pad_token_id = pad_id(tokenizer)
    model = build_model(cfg, device, prec)
    model.config.use_cache = False
    model.train()
    optimizer = make_optimizer(model, cfg, prec)
    steps_per_epoch = len(plan_epoch(lengths, cfg, 0))
    num_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        num_steps = min(num_steps, cfg.max_steps)
    state = restore_training_state(Path(cfg.resume_from), optimizer) if cfg.resume_from else TrainState()
    run_dir = resumed_run_dir or ckpt.unique_run_dir(root, cfg.run_name)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    except OSError as e:
        raise ConfigError(f"Cannot write the run folder '{run_dir}' ({e.strerror or e}); "
                          "check that the runs folder is writable and the disk has space") from None
    stepper = choose_stepper(model, optimizer, cfg, prec, pad_token_id)

    writer = tensorboard_writer(run_dir / "tb")
    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(event) -> None:
        metrics_file.write(json.dumps({"event": type(event).__name__, **dataclasses.asdict(event)}, ensure_ascii=False) + "\n")
        metrics_file.flush()
        emit(event)

    trained, total = count_trainable(model)
    log(RunStarted(run_dir=str(run_dir), num_steps=num_steps, steps_per_epoch=steps_per_epoch, num_train=len(train_ex),
                   num_val=len(val_ex), params_trained=trained, params_total=total, device=prec.device_name,
                   precision=f"{prec.description}; {stepper.description}", start_step=state.step))
    summary = {"val_loss": [], "train_loss_last": None}
    last_ckpt = ""
    saver = BackgroundSaver() if saves_in_background(device, cfg) else None

    def saved(path: Path, step: int, epoch: int, final: bool = False) -> None:
        nonlocal last_ckpt
        last_ckpt = str(path)
        log(CheckpointSaved(step=step, epoch=epoch, path=str(path), final=final))

    def collect_background_saves(block: bool) -> None:
        for done in saver.finished(block) if saver else ():
            saved(*done)

    def checkpoint(name: str, final: bool) -> Path | None:
        metrics = copy.deepcopy({**summary, "step": state.step, "epoch": state.epoch})  # a background write must
        # not see the next epoch's values appended to these lists
        blob = training_state_blob(optimizer, state) if cfg.save_resume_state else None
        if saver and not final:
            weights, blob = cpu_snapshot(model.state_dict()), cpu_snapshot(blob)
            write = lambda: save_checkpoint(model, tokenizer, cfg, run_dir, name, metrics, weights, blob)
            for done in saver.submit(write, state.step, state.epoch):
                saved(*done)
            return None
        collect_background_saves(block=True)
        path = save_checkpoint(model, tokenizer, cfg, run_dir, name, metrics, training_blob=blob)
        saved(path, state.step, state.epoch, final=final)
        return path

    # ---- loop --------------------------------------------------------------------------
    with attention_backends(device):
        try:
            try:
                pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss on device): read in bursts
                log_every = cfg.log_every_steps or (10 if device.type == "cuda" else 1)  # a GPU runs ahead between reads
                window_tokens, window_t0, steps_timed = 0, time.time(), 0
                while state.epoch < cfg.epochs and state.step < num_steps:
                    batches = plan_epoch(lengths, cfg, state.epoch)
                    stepper.prepare_epoch(train_ex, batches)
                    for batch_no in range(state.step_in_epoch, len(batches)):
                        if stop_event.is_set():
                            raise StopRequested
                        lr = cosine_lr_with_warmup(state.step, cfg, num_steps)
                        step_loss, num_tokens = stepper(batch_no, [train_ex[i] for i in batches[batch_no]], lr)
                        state.step += 1
                        state.step_in_epoch += 1
                        window_tokens += num_tokens
                        pending.append((state.step, lr, step_loss))
                        if len(pending) >= log_every or state.step_in_epoch == len(batches) or state.step >= num_steps:
                            losses = torch.stack([p[2] for p in pending]).tolist()  # one host sync per burst
                            now = time.time()
                            tok_per_s = window_tokens / max(now - window_t0, 1e-9)
                            steps_timed += len(pending)
                            eta = (now - t0) / steps_timed * (num_steps - state.step) if steps_timed else 0.0
                            for (step, step_lr, _), loss in zip(pending, losses):
                                if not math.isfinite(loss):
                                    raise FloatingPointError(f"loss is {loss} at step {step}")
                                writer.add_scalar("Loss/train", loss, step)
                                log(StepLogged(step=step, epoch=step / steps_per_epoch, loss=loss, lr=step_lr,
                                               tok_per_s=tok_per_s, elapsed_s=now - t0, eta_s=eta,
                                               mem_gib=prec.peak_memory_gib(), num_steps=num_steps))
                            summary["train_loss_last"] = losses[-1]
                            collect_background_saves(block=False)
                            pending, window_tokens, window_t0 = [], 0, now
                        if state.step >= num_steps:
                            break
                    # ---- epoch end: validation, probes, checkpoint ---------------------------------
                    epoch_done = state.step_in_epoch >= len(batches)
                    if epoch_done:
                        state.epoch += 1
                        state.step_in_epoch = 0
                    epoch_label = state.epoch if epoch_done else state.epoch + 1  # 1-based; max_steps may end mid-epoch
                    val_loss = estimate_val_loss(model, val_ex, cfg, pad_token_id, device, prec)
                    summary["val_loss"].append(val_loss)
                    writer.add_scalar("Loss/val", val_loss, epoch_label)
                    log(EvalDone(step=state.step, epoch=epoch_label, val_loss=val_loss,
                                 val_ppl=math.exp(val_loss) if val_loss < 50 else float("inf")))
                    if stop_event.is_set():
                        raise StopRequested
                    if cfg.probe_prompts:
                        answers = generate_probes(model, tokenizer, cfg, device)
                        log(SampleGenerated(step=state.step, epoch=epoch_label, answers=answers))
                    finished = state.epoch >= cfg.epochs or state.step >= num_steps
                    if finished:
                        break
                    if cfg.save_every_epoch:
                        checkpoint(f"epoch-{state.epoch}", final=False)
                final = checkpoint("final", final=True)
                if cfg.method == "lora" and cfg.save_merged:
                    save_merged(model, tokenizer, cfg, run_dir)
                status = "finished"
            except StopRequested:
                final = checkpoint("final", final=True)
                status = "stopped"
        except Exception as e:  # reported to the UI; the process keeps serving
            try:
                collect_background_saves(block=True)
            except Exception:
                pass  # the training failure is the one to report
            log(JobFailed(error=f"{type(e).__name__}: {e}", hint=failure_hint(e), run_dir=str(run_dir),
                          last_checkpoint=last_ckpt))
            writer.close()
            metrics_file.close()
            return None
        log(JobFinished(status=status, run_dir=str(run_dir), final_checkpoint=str(final), elapsed_s=time.time() - t0))
        writer.close()
        metrics_file.close()
        return final


def save_merged(model, tokenizer, cfg: TrainConfig, run_dir: Path) -> Path:
    """LoRA: base + adapter merged into a plain transformers model folder."""
    final_path = run_dir / "checkpoints" / "final-merged"
    tmp = ckpt.begin_checkpoint(final_path)
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp / "run_config.json")
    return ckpt.commit_checkpoint(tmp, final_path)
