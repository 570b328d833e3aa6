"""Evaluation during a run: the validation loss (the training objective, no grad) and the probe answers.

`mean_label_loss` is the one validation-loss loop: the engine calls it at each epoch end and the
Compare tab's batch A/B calls it for the base and the tuned model, so both report the same number
for the same weights and records.
"""

from __future__ import annotations

import contextlib

import torch

from ..config import GenConfig, TrainConfig
from ..data import Record
from ..encoding import collate_padded, pad_id, render_prompt
from .loss import LabelLoss, batch_loss_sum, label_positions

VAL_CHUNK = 512  # label positions per LM-head chunk: ~0.3 GB of fp32 logits at a time


@torch.no_grad()
def mean_label_loss(model, examples, pad_token_id: int, device, batch_size: int,
                    autocast=contextlib.nullcontext) -> float:
    """Mean cross-entropy over every label token of `examples`; padded batches of similar lengths, never
    packed (packing needs a per-example mask, which the CUDA path's causal-only attention drops)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    ordered = sorted(examples, key=len)
    for start in range(0, len(ordered), batch_size):
        batch = collate_padded(ordered[start:start + batch_size], pad_token_id)
        batch["positions"], batch["targets"] = label_positions(batch.pop("labels"))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            total += batch_loss_sum(model, batch, chunk_size=VAL_CHUNK)
        count += batch["targets"].numel()
    model.train(was_training)
    return (total / max(count, 1)).item()


def generate_probes(model, tokenizer, cfg: TrainConfig, device) -> tuple[tuple[str, str], ...]:
    """The probe prompts' answers, as one batch through Compare's decoding engine with the same settings
    (the model's own generation_config), so a probe answer is the answer Compare gives for those weights.
    The engine's simple path: a captured decode step would keep a static KV cache beside the training
    state. A model sharded by FSDP2 answers through its wrapper's `generate` (it gathers the shards)."""
    from ..decoding import Decoder, generate_batch

    gen = GenConfig(max_new_tokens=cfg.probe_max_new_tokens)
    if isinstance(model, LabelLoss):
        return sharded_probes(model, tokenizer, cfg, device)
    answers = generate_batch(model, tokenizer, cfg.probe_prompts, cfg.data.system_prompt, gen,
                             decoder=Decoder(model, static=False))
    return tuple(zip(cfg.probe_prompts, answers))


@torch.no_grad()
def sharded_probes(model, tokenizer, cfg: TrainConfig, device) -> tuple[tuple[str, str], ...]:
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
