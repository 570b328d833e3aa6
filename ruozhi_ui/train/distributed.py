"""One run over several processes: what a torchrun rank needs beyond the one-process loop.

Every rank runs the same `train()`. The differences live here, each small:
- `Ranks` says who this process is; `start_ranks` joins the process group torchrun set up
  (NCCL on GPUs, gloo on the CPU) plus a gloo group for the few CPU-side agreements, so
  agreeing on a count or a stop never waits for the GPU.
- Each epoch is planned for the global batch (`batch_size` x ranks) exactly as one process
  plans it, and every rank takes a contiguous share of each global batch: the same number of
  steps everywhere, disjoint examples, similar lengths on every rank at each step.
- `DistributedStep` divides each rank's summed loss by the label count of the whole global
  step (summed over ranks), and scales by the number of ranks because DDP and FSDP2 average
  gradients: N ranks x batch B make exactly the update of one process with batch N x B. The number
  of micro-batches comes from the global step's size (summed with the counts), so every rank runs
  as many: a DDP sync then never waits for a rank that has finished its step.
- `wrap` puts the model under DDP, or FSDP2's `fully_shard` per decoder layer and once over
  the rest (embeddings, final norm and a tied LM head stay together in the root group). The
  wrapped module is `LabelLoss`, the model with our label-only loss as its forward, so the
  hooks of DDP and FSDP2 run around the whole step.
- Checkpoints: the full weights and optimizer state are gathered with
  `torch.distributed.checkpoint`'s state-dict helpers and rank 0 writes the same folder a
  one-process run writes, so a run resumes on any number of ranks, one included.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .loss import LabelLoss
from .step import EagerStep

DDP_MEMORY_SHARE = 0.5  # DDP when weights, grads and AdamW moments take at most this share of one GPU


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    shard: str = ""  # "ddp" | "fsdp" when distributed
    control: object = None  # a gloo group: CPU-side agreements that never wait for a GPU

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def start_ranks(device_type: str) -> Ranks:
    """Join torchrun's process group (once per process); one process alone is `SINGLE`."""
    if not launched_by_torchrun():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, control=control)


def choose_shard(requested: str, params: int, device: torch.device) -> str:
    """'ddp' when one device holds the fp32 weights, grads and two AdamW moments (16 bytes a parameter) with
    room for activations; else 'fsdp'. The CPU (tests) takes DDP unless asked."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "ddp"
    return "ddp" if params * 16 <= DDP_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory else "fsdp"


def share(batch: list[int], ranks: Ranks) -> list[int]:
    """This rank's contiguous, near-equal part of a global batch (sizes differ by at most one)."""
    base, extra = divmod(len(batch), ranks.world)
    start = ranks.rank * base + min(ranks.rank, extra)
    return batch[start:start + base + (ranks.rank < extra)]


def sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=ranks.control)
    return t.tolist()


def broadcast_text(text: str, ranks: Ranks) -> str:
    """Rank 0's string on every rank (the run folder it made)."""
    box = [text]
    dist.broadcast_object_list(box, src=0, group=ranks.control)
    return box[0]


class AgreedStop:
    """A stop switch every rank reads the same: any rank's request stops all of them at the same step.

    `is_set()` is a collective (one tiny all-reduce on the gloo group), and the loop calls it at the
    same points on every rank, so no rank is left waiting in a collective the others skipped."""

    def __init__(self, local, ranks: Ranks):
        self.local, self.ranks = local, ranks

    def set(self) -> None:
        self.local.set()

    def is_set(self) -> bool:
        flag = torch.tensor([1.0 if self.local.is_set() else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ranks.control)
        return bool(flag.item())


def decoder_layers(model) -> list[torch.nn.Module]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(inner.model.layers)


def wrap(model, ranks: Ranks, device: torch.device, autocast_dtype: torch.dtype | None):
    """The module a step calls: `LabelLoss(model)` under DDP, or sharded by FSDP2 (in place: then `model`'s
    parameters become shards, and the probes generate through the wrapper, whose `generate` gathers them)."""
    loss = LabelLoss(model)
    if ranks.shard == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(loss, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mixed = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32) if autocast_dtype else None
    kwargs = {"mp_policy": mixed} if mixed else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(loss, **kwargs)
    register_fsdp_forward_method(loss, "generate")
    return loss


class DistributedStep(EagerStep):
    """The eager step with the global label count, the ranks' gradients averaged back into a sum, the
    loss reported as the global mean, and gradient sync only on the last micro-batch."""

    def __init__(self, wrapped, model, optimizer, cfg, prec, pad_token_id: int, ranks: Ranks):
        super().__init__(wrapped, optimizer, cfg, prec, pad_token_id)
        self.ranks, self.params = ranks, [p for p in model.parameters() if p.requires_grad]
        self.code = "ddp" if ranks.shard == "ddp" else "fsdp"
        self.description = f"eager steps, {ranks.shard.upper()} over {ranks.world} processes"

    def step_counts(self, labels: int, num_tokens: int, n_examples: int) -> tuple[float, int, int]:
        labels, tokens, examples = sum_over_ranks([labels, num_tokens, n_examples], self.ranks)
        return labels, int(tokens), int(examples)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2
        if sync is not None:
            sync(last)
            (loss * self.ranks.world).backward()
        elif last:
            (loss * self.ranks.world).backward()
        else:
            with self.model.no_sync():  # DDP
                (loss * self.ranks.world).backward()

    def reduce_loss(self, total: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(total)  # every rank's share of the global mean: their sum is the step's loss
        return total

    def clip(self) -> None:  # over the trainable parameters: under FSDP2 their shards, the norm still global
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)


# --- checkpoints ---------------------------------------------------------------------------------------------

def full_weights(wrapped, model, ranks: Ranks) -> dict | None:
    """The whole model's state dict on rank 0 (None elsewhere); under FSDP2 every rank takes part."""
    if ranks.shard == "ddp":
        return None  # rank 0's own model holds every weight: save it as a one-process run does
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.is_main:
        return None
    # a tied weight (Qwen2.5-0.5B's LM head is its embedding) is gathered under both names: keep the first,
    # as save_pretrained does for a live model
    tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()})
    return {n: v for n, v in ((name.removeprefix("model."), value) for name, value in full.items()) if n not in tied}


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(wrapped, model, optimizer, ranks: Ranks) -> dict | None:
    """The optimizer state as a one-process run saves it (keyed by the trainable parameters' order), on rank 0."""
    if ranks.shard == "ddp":
        return optimizer.state_dict() if ranks.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(wrapped, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ranks.is_main:
        return None
    index = {("model." + name): i for i, name in enumerate(trainable_names(model))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(wrapped, model, optimizer, saved: dict, ranks: Ranks) -> None:
    """A saved optimizer state (from any number of ranks) into this rank's optimizer."""
    saved = with_step_counts(saved)
    if ranks.shard == "ddp":
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = ["model." + name for name in trainable_names(model)]
    keyed = {"state": {names[int(i)]: value for i, value in saved["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(wrapped, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


def with_step_counts(saved: dict) -> dict:
    """torch's AdamW keeps a step count per parameter; a one-GPU bf16 run keeps one (`step_t`) for all."""
    step = saved.get("step_t")
    if step is None:
        return saved
    state = {i: {"step": step.clone().float(), **value} for i, value in saved["state"].items()}
    return {k: v for k, v in saved.items() if k != "step_t"} | {"state": state}


def finish(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
