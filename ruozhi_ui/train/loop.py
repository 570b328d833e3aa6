"""The SFT loop: one `train()` that reads top to bottom (setup -> epochs -> steps -> evaluate -> save).

Progress leaves only through `emit(event)` (see events.py); a `threading.Event` asks for a
graceful stop, seen between steps and between validation and probes. The set-up, the step
reporting and the checkpoints are small named jobs of `run.Run`; the step itself is the
run's `Stepper` (`step.py`, or CUDA graphs). Knows nothing of Gradio.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from pathlib import Path

from ..config import TrainConfig
from ..events import EmitFn, EvalDone, NullSink, SampleGenerated
from .evaluate import generate_probes, mean_label_loss
from .distributed import AgreedStop, share
from .run import Run, StopRequested, setup
from .step import lr_at, plan_epoch


def train(cfg: TrainConfig, emit: EmitFn | None = None, stop_event: threading.Event | None = None,
          runs_root: Path | None = None, continue_in: Path | None = None) -> Path | None:
    """Run one SFT job into a new folder under `runs_root` (or, for the next GPU lease of a run resumed
    from its own checkpoint, on in that run's folder `continue_in`). Bad settings, paths or data raise a
    RuozhiError before anything is written; a failure during the run emits JobFailed and returns None."""
    if runs_root is None:
        raise ValueError("train() needs the runs folder its run is written under")
    stop_event = stop_event or threading.Event()
    run = setup(cfg, emit or NullSink(), runs_root, continue_in)
    cfg, state = run.cfg, run.state  # cfg as resolved (a resumed run takes its checkpoint's settings)
    lengths = [len(e) for e in run.train_ex]
    if run.ranks.distributed:  # every rank stops at the same step, whichever was asked
        stop_event = AgreedStop(stop_event, run.ranks)
    try:
        with attention_backends(run.device):
            while state.epoch < cfg.epochs and state.step < run.num_steps:
                # ---- one epoch of steps ----------------------------------------------------------
                batches = plan_epoch(lengths, cfg, state.epoch)
                run.stepper.prepare_epoch(run.train_ex, batches)
                run.phase("training")
                for batch_no in range(state.step_in_epoch, len(batches)):
                    if stop_event.is_set():
                        raise StopRequested
                    lr = lr_at(state.step, cfg, run.num_steps)
                    mine = share(batches[batch_no], run.ranks)  # the whole batch in one process
                    loss, num_tokens = run.stepper(batch_no, [run.train_ex[i] for i in mine], lr)
                    state.step += 1
                    state.step_in_epoch += 1
                    last = state.step_in_epoch == len(batches) or state.step >= run.num_steps
                    run.report_step(lr, loss, num_tokens, flush=last)
                    if state.step >= run.num_steps:
                        break
                if state.step_in_epoch >= len(batches):
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                # ---- epoch end: validation, probes, checkpoint -------------------------------------
                started = time.time()
                evaluate(run, stop_event)
                if state.epoch < cfg.epochs and state.step < run.num_steps and cfg.save_every_epoch:
                    run.phase("saving")
                    run.checkpoint(f"epoch-{state.epoch}")
                run.epoch_end_s, run.epoch_ends = run.epoch_end_s + time.time() - started, run.epoch_ends + 1
        run.finish("finished")
    except StopRequested:
        run.finish("stopped")
    except Exception as e:  # reported to the UI; the process keeps serving
        run.fail(e)
        if run.ranks.distributed:  # a rank must exit non-zero, so torchrun stops the others
            raise
        return None
    finally:
        run.close()
    return run.final


def evaluate(run: Run, stop_event: threading.Event) -> None:
    """Validation loss, then (unless a stop came meanwhile) the probe answers, for the epoch that just ended
    (or is in progress, when max_steps ends a run mid-epoch: epochs are counted 1-based)."""
    state, cfg = run.state, run.cfg
    epoch = state.epoch if state.step_in_epoch == 0 else state.epoch + 1
    run.phase("validating")
    val_loss = mean_label_loss(run.eval_model, run.val_ex, run.pad_token_id, run.device, cfg.batch_size, run.prec.autocast)
    run.val_losses.append(val_loss)
    run.scalar("Loss/val", val_loss, epoch)
    run.log(EvalDone(step=state.step, epoch=epoch, val_loss=val_loss,
                     val_ppl=math.exp(val_loss) if val_loss < 50 else float("inf")))
    if stop_event.is_set() and state.step < run.num_steps:  # a stop after the last step still finishes the run
        raise StopRequested
    if cfg.probe_prompts:
        run.phase("probing")
        run.log(SampleGenerated(step=state.step, epoch=epoch, answers=generate_probes(run.eval_model, run.tokenizer, cfg,
                                                                                      run.device)))


def attention_backends(device):
    """On CUDA, PyTorch's attention without its cuDNN kernel (see cuda/layers.py); nothing elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from ..cuda.layers import attention_backends as cuda_backends

    return cuda_backends(device)
