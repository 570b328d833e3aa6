"""The SFT objective: cross-entropy on label positions only, in vocabulary chunks.

Qwen's vocabulary is 151,936 wide, so full logits for a 12x214 batch are ~1.5 GB
in fp32 plus their gradient. We gather the hidden states of the positions that
have a label (answer tokens and <|im_end|>), and project them through the LM
head a chunk at a time under activation checkpointing, so at most one chunk of
logits exists at once. The label-position indices are computed on the CPU when
the batch is built, so the GPU never has to sync to find them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..anatomy import decoder_and_head
from ..encoding import IGNORE_INDEX


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into hidden[:, :-1] whose next token is labelled, and those targets.

    Position t predicts token t+1, so the target of position t is labels[:, t+1].
    """
    shifted = labels[:, 1:]  # (B, T-1)
    flat = shifted.reshape(-1)
    positions = torch.nonzero(flat != IGNORE_INDEX, as_tuple=False).squeeze(1)  # (N,)
    return positions, flat[positions]


def _chunk_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # (chunk, V), fp32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_ce_sum(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module,
                   chunk_size: int = 2048) -> torch.Tensor:
    """Sum of token cross-entropies; logits are rebuilt chunk by chunk in backward."""
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported")
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, h, y, lm_head.weight, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, y, lm_head.weight)
    return total


def batch_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int = 2048) -> torch.Tensor:
    """Summed label-token loss of one micro-batch (padded or packed); divide by the step's label count.

    `batch` holds input_ids and either attention_mask (padded) or position_ids
    (packed: attention_mask must stay None so examples do not see each other),
    plus `positions`/`targets` from `label_positions`. `model` may be a distributed run's
    `LabelLoss` (under DDP or FSDP2): then the loss goes through its forward, where their hooks run.
    """
    if isinstance(model, LabelLoss) or isinstance(getattr(model, "module", None), LabelLoss):
        return model(batch, chunk_size)
    return label_loss_sum(model, batch, chunk_size)


class LabelLoss(torch.nn.Module):
    """A model with the label-only loss as its forward. DDP and FSDP2 act around a module's forward
    (gradient sync, gathering shards), and our loss reads the decoder and the LM head's weight
    directly, so a distributed run wraps this module, not the model. `generate` passes through (FSDP2
    registers it as a forward, so a sharded model's probes gather its weights too)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], chunk_size: int = 2048) -> torch.Tensor:
        return label_loss_sum(self.model, batch, chunk_size)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


def label_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int) -> torch.Tensor:
    decoder, lm_head = decoder_and_head(model)
    out = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,  # with a cache transformers ignores packed position_ids boundaries
    )
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["positions"])  # (N, H)
    return chunked_ce_sum(hidden, batch["targets"], lm_head, chunk_size)
