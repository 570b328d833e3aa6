"""Forward passes for decoding: prefill a batch of left-padded prompts, then one token per row per step.

Two runners with one interface (`prefill(ids, mask)`, `step(tokens)`, each returning
(B, V) fp32 logits of the last position):
- `EagerRunner`, the simple path (CPU, and CUDA until a captured step is ready):
  transformers' DynamicCache and one eager forward per token, as `generate()` runs them;
- `StaticRunner` over a `StaticSlot`: transformers' StaticCache of fixed rows x slots,
  and a decode step whose every tensor has a fixed address, captured once as a CUDA
  graph and replayed per token (on the CPU the same step runs eagerly, which is how
  the tests check it). Knows nothing of settings, text or threads.
"""

from __future__ import annotations

import inspect

import torch

SLOT_MIN_LENGTH = 256  # cache slots come in powers of two from here: few graphs, little wasted attention


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def supports_logits_to_keep(model) -> bool:
    """Whether the forward can compute only the last position's logits (a prefill's T x 151,936 spared)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def prefill_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) RoPE positions of left-padded rows, as generate() computes them: each row counts from 0 at
    its first real token (pads get 1; nothing attends to them)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def as_attention_mask(allowed: torch.Tensor, model) -> torch.Tensor:
    """A (B, 1, Q, K) bool "may attend" mask as the model's attention takes it: SDPA (and the training
    engine's causal-only SDPA) read bool masks, eager attention adds a float bias."""
    if getattr(model.config, "_attn_implementation", "sdpa") != "eager":
        return allowed
    dtype = model_dtype(model)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def causal_allowed(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, Q, K) bool from (B, K) real-token slots, the Q queries being the last Q slots filled."""
    k_len = valid.shape[1]
    q_slots = torch.arange(k_len - q_len, k_len, device=valid.device)
    causal = torch.arange(k_len, device=valid.device)[None, :] <= q_slots[:, None]  # (Q, K)
    return valid[:, None, None, :] & causal[None, None]


class EagerRunner:
    """The simple path: DynamicCache, an eager forward per token.

    Unpadded prompts get the plain 2D mask, so the model runs exactly what
    `generate()` runs (the CPU tests hold it to the same tokens). Left-padded
    batches get an explicit 4D mask instead: the training engine's causal-only
    attention drops 2D masks, and both paths then mask the same way.
    """

    def __init__(self, model, logits_to_keep: bool = True):
        self.model, self.logits_to_keep = model, logits_to_keep

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = (as_attention_mask(causal_allowed(self.valid, ids.shape[1]), self.model) if self.padded
                else self.valid.long())
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, **extra)
        return out.logits[:, -1].to(torch.float32, copy=True)  # (B, V)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.valid = mask.bool()  # (B, K) slots holding real tokens
        self.padded = not bool(self.valid.all())
        positions = prefill_positions(mask)
        self.next_positions = positions[:, -1:] + 1  # (B, 1)
        return self._forward(ids, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], 1)], dim=1)
        positions, self.next_positions = self.next_positions, self.next_positions + 1
        return self._forward(tokens[:, None], positions)

    def close(self) -> None:
        self.cache = None


def slot_length(num_tokens: int, max_positions: int | None) -> int:
    """Cache slots for a prompt plus its answer: the next power of two from SLOT_MIN_LENGTH, within the context."""
    length = SLOT_MIN_LENGTH
    while length < num_tokens:
        length *= 2
    return min(length, max_positions) if max_positions else length


class Unsupported(Exception):
    """The model's cache or forward cannot run as a static step; decode it on the simple path."""


class StaticSlot:
    """A StaticCache of `batch` rows x `length` slots and the one-token step over it.

    Every tensor the step reads or writes lives here at a fixed address: the token
    fed in, each row's next RoPE position, the (rows, slots) map of slots holding
    real tokens, the cache and its write position (transformers keeps that on the
    device, so each replay advances it), and the logits out. The step builds its
    attention mask from the map and the write position inside the graph, so a replay
    needs only the new tokens copied in. Dummy rows (a batch smaller than the slot)
    repeat row 0 and are ignored.
    """

    def __init__(self, model, batch: int, length: int, device: torch.device, capture: bool,
                 logits_to_keep: bool = True):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model, self.batch, self.length, self.device = model, batch, length, device
        self.logits_to_keep = logits_to_keep
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        if any(type(layer) is not StaticLayer for layer in self.cache.layers):
            raise Unsupported("sliding-window or hybrid cache layers keep their position on the host")
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.slot_ids = torch.arange(length, device=device)
        self.graph, self.logits = None, None
        # The first update allocates the cache tensors: do it now, outside any capture.
        self.prefill(torch.zeros(batch, 1, dtype=torch.long, device=device),
                     torch.ones(batch, 1, dtype=torch.long, device=device))
        if capture:
            self._capture()

    def _step_body(self) -> torch.Tensor:
        write_at = self.cache.layers[0].cumulative_length  # () slot this step writes, on the device
        self.valid |= self.slot_ids == write_at  # the new token is visible to itself and later steps
        mask = as_attention_mask(self.valid[:, None, None, :], self.model)  # (B, 1, 1, L)
        out = self.model(input_ids=self.tokens, attention_mask=mask, position_ids=self.positions,
                         past_key_values=self.cache, use_cache=True)
        self.positions += 1
        return out.logits[:, -1].to(torch.float32)  # (B, V)

    def _capture(self) -> None:
        """Warm up on a side stream (cuBLAS/SDPA pick their kernels), then record one step.

        On a stream of its own, and thread_local: the warm-up thread captures while
        other threads may be decoding eagerly on the same GPU (their work must not
        land in the graph, and only this thread's CUDA calls are restricted).
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step_body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._reset(1)  # the warm-up step advanced the cache: back to one prefilled slot
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            self.logits = self._step_body()
        self.graph = graph
        torch.cuda.current_stream(self.device).synchronize()  # set-up done before another stream uses the buffers
        side.synchronize()

    def _reset(self, num_filled: int) -> None:
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(num_filled)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts (b <= batch rows, T <= length) eagerly into the cache; (b, V) logits."""
        rows, q_len = ids.shape
        if q_len > self.length:
            raise ValueError(f"prompt of {q_len} tokens does not fit a cache of {self.length} slots")
        if rows < self.batch:  # dummy rows repeat row 0
            ids = torch.cat([ids, ids[:1].expand(self.batch - rows, -1)])
            mask = torch.cat([mask, mask[:1].expand(self.batch - rows, -1)])
        self._reset(0)
        self.valid.zero_()
        self.valid[:, :q_len] = mask.bool()
        positions = prefill_positions(mask)
        self.positions.copy_(positions[:, -1:] + 1)
        causal = self.slot_ids[None, :] <= torch.arange(q_len, device=self.device)[:, None]  # (T, L)
        allowed = self.valid[:, None, None, :] & causal  # (B, 1, T, L)
        extra = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.model(input_ids=ids, attention_mask=as_attention_mask(allowed, self.model), position_ids=positions,
                         past_key_values=self.cache, use_cache=True, **extra)
        return out.logits[:rows, -1].to(torch.float32, copy=True)

    def adopt(self, eager: EagerRunner) -> None:
        """Carry on a decoding the simple path began: its DynamicCache, real-token map and next positions
        copied into this slot (dummy rows copy row 0), so the next `step` continues it exactly."""
        rows, filled = eager.valid.shape
        if rows > self.batch or filled >= self.length:
            raise ValueError(f"{rows} rows of {filled} tokens do not fit a slot of {self.batch} x {self.length}")
        pad_rows = self.batch - rows
        for source, target in zip(eager.cache.layers, self.cache.layers):
            for src, dst in ((source.keys, target.keys), (source.values, target.values)):  # (rows, H, filled, D)
                dst[:rows, :, :filled].copy_(src)
                dst[rows:, :, :filled].copy_(src[:1].expand(pad_rows, -1, -1, -1))
            target.cumulative_length.fill_(filled)
        self.valid.zero_()
        self.valid[:, :filled] = torch.cat([eager.valid, eager.valid[:1].expand(pad_rows, -1)])
        self.positions.copy_(torch.cat([eager.next_positions, eager.next_positions[:1].expand(pad_rows, -1)]))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of the first b rows; (b, V) logits (a view: read it before the next step)."""
        rows = tokens.shape[0]
        self.tokens[:rows, 0].copy_(tokens)
        if self.graph is None:
            return self._step_body()[:rows]
        self.graph.replay()
        return self.logits[:rows]


class StaticRunner:
    """Decodes on a StaticSlot it has been lent; `close()` hands the slot back."""

    def __init__(self, slot: StaticSlot, release=None):
        self.slot, self._release = slot, release

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.slot.prefill(ids, mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.slot.step(tokens)

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
