"""The CUDA fast path: its packed static rows change no loss (CPU), and the graphed engine trains (GPU only)."""

import dataclasses

import pytest
import torch

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import load_source
from ruozhi_ui.encoding import collate_padded, encode_record
from ruozhi_ui.fastpath import bucket_length, pack_step
from ruozhi_ui.loss import batch_loss_sum, label_positions

CFG = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample"), lr=1e-3, probe_prompts=(),
                  run_name="fast")


def examples(tokenizer, n):
    d = CFG.data
    return [encode_record(tokenizer, r, d.system_prompt, d.max_source_length, d.max_target_length)
            for r in load_source("sample").train[:n]]


def test_bucket_length_rounds_up_to_the_bucket():
    assert [bucket_length(n, 128) for n in (1, 128, 129, 1700)] == [128, 128, 256, 1792]


def test_a_packed_padded_static_row_has_the_loss_of_the_padded_batch(tokenizer, demo_model):
    demo_model.eval()
    batch = examples(tokenizer, 5)
    n = sum(len(e) for e in batch)
    ids, pos, positions, targets, count = pack_step(batch, tokenizer.pad_token_id, bucket_length(n), max_labels=800)
    static = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
              "positions": torch.tensor(positions), "targets": torch.tensor(targets)}
    padded = collate_padded(batch, tokenizer.pad_token_id)
    padded["positions"], padded["targets"] = label_positions(padded.pop("labels"))
    with torch.no_grad():
        packed_loss = batch_loss_sum(demo_model, static) / count
        padded_loss = batch_loss_sum(demo_model, padded) / padded["targets"].numel()
    assert count == padded["targets"].numel()
    assert len(ids) == len(pos) == bucket_length(n) and len(positions) == 800
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5


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
