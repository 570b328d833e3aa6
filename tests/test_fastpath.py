"""The CUDA fast path: its static padded blocks change no loss (CPU), and the graphed engine trains (GPU only)."""

import dataclasses

import pytest
import torch

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import load_source
from ruozhi_ui.encoding import collate_padded, encode_record
from ruozhi_ui.encoding import IGNORE_INDEX
from ruozhi_ui.fastpath import bucket_length, pad_step
from ruozhi_ui.loss import batch_loss_sum, label_positions

CFG = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3, probe_prompts=(),
                  run_name="fast")


def examples(tokenizer, n):
    d = CFG.data
    return [encode_record(tokenizer, r, d.system_prompt, d.max_source_length, d.max_target_length)
            for r in load_source("sample").train[:n]]


def test_bucket_length_rounds_up_to_the_bucket():
    assert [bucket_length(n, 16) for n in (1, 16, 17, 214)] == [16, 16, 32, 224]


def test_a_right_padded_block_without_attention_mask_has_the_loss_of_the_masked_batch(tokenizer, demo_model):
    """Causality alone hides right pads from real tokens: the fast path's mask-free block changes no loss."""
    demo_model.eval()
    batch = examples(tokenizer, 5)
    length = bucket_length(max(len(e) for e in batch))
    ids, positions, targets, count = pad_step(batch, tokenizer.pad_token_id, rows=6, length=length, max_labels=900)
    static = {"input_ids": torch.tensor(ids).view(6, length),
              "positions": torch.tensor(positions), "targets": torch.tensor(targets)}
    padded = collate_padded(batch, tokenizer.pad_token_id)  # with its attention mask
    padded["positions"], padded["targets"] = label_positions(padded.pop("labels"))
    with torch.no_grad():
        static_loss = batch_loss_sum(demo_model, static) / count
        padded_loss = batch_loss_sum(demo_model, padded) / padded["targets"].numel()
    assert count == padded["targets"].numel()
    assert len(positions) == 900 and targets[count:] == [IGNORE_INDEX] * (900 - count)
    assert abs(static_loss.item() - padded_loss.item()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_steps_match_eager_steps_and_the_loss_falls(tmp_path):
    from ruozhi_ui.engine import train
    from ruozhi_ui.events import ListSink, StepLogged

    losses = {}
    for mode in ("on", "off"):
        sink = ListSink()
        train(dataclasses.replace(CFG, cuda_graphs=mode, epochs=3, device="cuda", max_grad_norm=1.0),
              emit=sink, runs_root=tmp_path / mode)
        losses[mode] = [e.loss for e in sink.of(StepLogged)]
    assert losses["on"][-1] < losses["on"][0]
    assert losses["on"][0] == pytest.approx(losses["off"][0], rel=2e-2)  # same first step, up to bf16 rounding
    assert losses["on"][-1] == pytest.approx(losses["off"][-1], rel=5e-2)
