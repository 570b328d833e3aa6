"""The CUDA fast path (ruozhi_ui/cuda/): its static padded blocks change no loss (CPU), and the graphed engine
trains (GPU only)."""

import dataclasses

import pytest
import torch

from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig
from ruozhi_ui.data import load_source
from ruozhi_ui.encoding import collate_padded, encode_record
from ruozhi_ui.encoding import IGNORE_INDEX
from ruozhi_ui.cuda.graph_step import bucket_length, pad_step
from ruozhi_ui.train.loss import batch_loss_sum, label_positions

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
    from ruozhi_ui.train import train
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


def test_head_chunk_gives_the_cross_entropy_and_its_logit_gradient():
    """The hand-derived softmax - one_hot gradient is autograd's, and ignored targets contribute nothing."""
    from ruozhi_ui.cuda.head_loss import head_chunk_loss_and_dlogits

    torch.manual_seed(0)
    h, weight = torch.randn(10, 8), torch.randn(50, 8)
    y = torch.randint(0, 50, (10,))
    y[[2, 7]] = IGNORE_INDEX
    scale = torch.tensor(1 / 8)
    loss, d_logits = head_chunk_loss_and_dlogits(h, y, weight, scale)
    logits = (h @ weight.T).requires_grad_()
    expected = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    (expected * scale).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(d_logits, logits.grad, atol=1e-6)
    assert d_logits[2].abs().max() == 0 and d_logits[7].abs().max() == 0


def test_head_loss_and_grads_chunk_by_chunk_equal_autograd_through_the_head():
    from ruozhi_ui.cuda.head_loss import head_loss_and_grads

    torch.manual_seed(1)
    hidden, weight = torch.randn(11, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (11,))
    targets[-3:] = IGNORE_INDEX  # bucket padding
    scale = torch.tensor(1 / 8)
    grad_weight = torch.zeros_like(weight)
    loss, grad_hidden = head_loss_and_grads(hidden, targets, weight, scale, grad_weight, chunk=4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(h @ w.T, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (expected * scale).backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad_hidden, h.grad, atol=1e-6) and torch.allclose(grad_weight, w.grad, atol=1e-6)


def test_long_blocks_split_into_micro_batches_and_label_slots_cover_the_worst_case():
    from ruozhi_ui.cuda.graph_step import LOSS_CHUNK, TOKEN_BUDGET, block_shape

    short = block_shape(rows=12, length=144, min_prompt=20, max_labels_per_row=152)
    long = block_shape(rows=12, length=224, min_prompt=20, max_labels_per_row=152)
    assert (short.micro_batches, short.micro_rows) == (1, 12)
    assert (long.micro_batches, long.micro_rows) == (2, 6)
    for shape in (short, long):
        assert shape.micro_rows * shape.length <= TOKEN_BUDGET
        assert shape.label_slots % LOSS_CHUNK == 0
    assert short.label_slots >= 12 * (144 - 20) and long.label_slots >= 6 * 152


def plain_and_graph_steppers(tokenizer, compile_regions: bool, fallbacks: list | None = None):
    """Two identical fp32 demo models on the CPU: one under EagerStep, one under CudaGraphStep. Plain SGD:
    the claim is about the gradients the steps make (AdamW would turn a 1e-9 difference of a near-zero
    gradient into a full-size update)."""
    from ruozhi_ui.cuda.graph_step import CudaGraphStep
    from ruozhi_ui.models import load_model
    from ruozhi_ui.train.precision import choose_precision
    from ruozhi_ui.train.step import EagerStep, plan_epoch

    cfg = dataclasses.replace(CFG, batch_size=4, max_grad_norm=1.0)
    train_ex = examples(tokenizer, 40)
    batches = plan_epoch([len(e) for e in train_ex], cfg, 0)
    models, optimizers = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(load_model("demo", device=torch.device("cpu"), dtype=torch.float32))
        optimizers.append(torch.optim.SGD(models[-1].parameters(), lr=1e-1))
    plain = EagerStep(models[0], optimizers[0], cfg, choose_precision(cfg, torch.device("cpu")), tokenizer.pad_token_id)
    on_fallback = (lambda description, reason: fallbacks.append((description, reason))) if fallbacks is not None \
        else (lambda description, reason: None)
    graphed = CudaGraphStep(models[1], optimizers[1], cfg, tokenizer.pad_token_id, torch.device("cpu"),
                            fast_layers=compile_regions, on_fallback=on_fallback)
    graphed.prepare_epoch(train_ex, batches)
    return plain, graphed, models, train_ex, batches


def test_first_step_of_each_block_shape_runs_eagerly_and_equals_the_plain_step(tokenizer, demo_dir, monkeypatch):
    """The graph stepper's padded, split blocks train exactly like the plain step (fp32, CPU: no capture)."""
    from ruozhi_ui.cuda import graph_step

    monkeypatch.setattr(graph_step, "TOKEN_BUDGET", 480)  # the demo's longer blocks split in two
    plain, graphed, models, train_ex, batches = plain_and_graph_steppers(tokenizer, compile_regions=False)
    firsts, seen = [], set()
    for i, step in enumerate(graphed.plan):
        if step.shape not in seen:  # only first steps of a shape: a repeat would capture a CUDA graph
            seen.add(step.shape)
            firsts.append(i)
    assert {graphed.plan[i].shape.micro_batches for i in firsts} == {1, 2}
    for i in firsts:
        batch = [train_ex[j] for j in batches[i]]
        plain_loss, plain_tokens = plain(i, batch, 1e-3)
        graph_loss, graph_tokens = graphed(i, batch, 1e-3)
        assert graph_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
        assert graph_tokens == plain_tokens
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_compiled_layer_forward_is_shared_by_every_layer_and_length_and_only_while_active(demo_model):
    """One compile serves all layers and buckets; outside `active()` the plain forward runs (CPU, aot_eager)."""
    from torch._dynamo.utils import counters

    from ruozhi_ui.cuda.layers import compiled_layer_forward, compiled_layers, use_causal_only_attention

    torch._dynamo.reset()
    compiled_layer_forward.cache_clear()
    counters.clear()
    use_causal_only_attention(demo_model)
    regions = compiled_layers(demo_model, backend="aot_eager")
    for length in (32, 48, 64):
        ids = torch.randint(0, 100, (3, length))
        plain = demo_model.model(input_ids=ids, use_cache=False).last_hidden_state
        with regions.active():
            compiled = demo_model.model(input_ids=ids, use_cache=False).last_hidden_state
        assert torch.allclose(plain, compiled, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    assert all("forward" not in vars(layer) for layer in demo_model.model.layers)


def test_a_failing_compile_falls_back_to_the_plain_forward_within_the_same_step_and_says_so(tokenizer, demo_dir):
    fallbacks = []
    plain, graphed, models, train_ex, batches = plain_and_graph_steppers(tokenizer, compile_regions=True,
                                                                          fallbacks=fallbacks)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("simulated: Failed to find C compiler")

    graphed.regions.forward = no_compiler
    batch = [train_ex[j] for j in batches[0]]
    graph_loss, _ = graphed(0, batch, 1e-3)
    plain_loss, _ = plain(0, batch, 1e-3)
    assert graphed.regions is None and "not used" in graphed.description and graphed.code == "graphs"
    assert fallbacks == [("CUDA graphs (torch.compile failed, so not used)",
                          "torch.compile: RuntimeError: simulated: Failed to find C compiler")]
    assert graph_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_pad_step_refuses_more_labels_than_slots(tokenizer):
    batch = examples(tokenizer, 2)
    with pytest.raises(ValueError, match="do not fit"):
        pad_step(batch, tokenizer.pad_token_id, rows=2, length=bucket_length(max(len(e) for e in batch)), max_labels=3)
