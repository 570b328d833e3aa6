"""The decoding loop: a batch of prompts per model, and one Python loop that advances several at once.

`Decoder` belongs to one model (an app keeps it beside the loaded weights): on CUDA
it owns the captured decode steps, one `StaticSlot` per (rows, slots) shape, built by
a background warm-up when the model loads; while a slot is busy or not built yet, a
chat decodes on the simple path instead of waiting. `Batch` is one model decoding
left-padded prompts; `advance_together` steps every unfinished batch once per tick
(all launched before any is read, each model on its own CUDA stream, so two models'
steps overlap on the GPU) and yields which rows grew. No thread decodes: the
caller's loop does, so Stop and a closed generator end it at once.
A batch that started on the simple path moves onto its static slot as soon as the
warm-up has built it (`StaticSlot.adopt` copies the cache over). Works in token ids
only; text lives in `chat.py`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import warnings
from contextlib import nullcontext
from typing import Iterator

import torch

from ..capabilities import CAPTURE_LOCK  # one graph capture at a time in the process
from ..errors import first_line
from .runners import EagerRunner, StaticRunner, StaticSlot, slot_length, supports_logits_to_keep
from .settings import DecodeSettings, choose_next, sampling_warpers

GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64)  # rows of a static slot; a batch is padded up to the next one
WARM_UP_LENGTHS = (256, 512, 1024, 2048)  # one-row slots built when a model loads: chats of any usual length


def graph_rows(rows: int) -> int | None:
    return next((b for b in GRAPH_ROWS if b >= rows), None)


class Decoder:
    """Decoding for one model: the simple path always works; on CUDA, captured steps once built.

    One batch at a time uses the static slots (they share the model's static
    caches); a second concurrent request, or one arriving while the warm-up holds
    them, runs on the simple path. A shape that fails to build (an architecture
    whose forward cannot be recorded) turns the static path off for this model.
    `static=True` on the CPU runs the same slots without capturing (tests use it).
    """

    def __init__(self, model, static: bool | None = None):
        self.model = model
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.static = on_cuda if static is None else static
        self.capture = on_cuda  # CUDA graphs; elsewhere the static step runs eagerly
        self.logits_to_keep = supports_logits_to_keep(model)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None  # this model's steps, beside another's
        self.static_error: str | None = None  # why the static path is off, once it is
        self._slots: dict[tuple[int, int], StaticSlot] = {}
        self._lock = threading.Lock()  # held by the batch (or the warm-up) using the slots

    # ---------------------------------------------------------------- static slots

    def start_warm_up(self, shapes: tuple[tuple[int, int], ...] | None = None) -> None:
        """Queue the one-row chat slots (or `shapes`) for the background builder, unless built or queued
        already; a no-op without the static path."""
        if self.static and not self.static_error:
            WARM_UP.put(self, shapes or tuple((1, slot_length(n, self.max_positions)) for n in WARM_UP_LENGTHS))

    def wait_warm_up(self, timeout: float | None = None) -> bool:
        """True once none of this decoder's slots is queued or being built (tests and the benchmark wait;
        the app never does)."""
        return WARM_UP.wait(self, timeout)

    def _slot(self, shape: tuple[int, int]) -> StaticSlot | None:
        """The slot for `shape`, built (and captured) now if new; None once that has failed. Caller holds the lock."""
        slot = self._slots.get(shape)
        if slot is None and not self.static_error:
            try:
                with torch.no_grad(), CAPTURE_LOCK:
                    slot = StaticSlot(self.model, *shape, self.device, capture=self.capture,
                                      logits_to_keep=self.logits_to_keep)
            except Exception as e:  # an unsupported cache or an op that cannot be captured
                self.static_error = first_line(e)
                warnings.warn(f"static decoding is off for this model ({self.static_error}); "
                              "it decodes on the simple path", stacklevel=2)
                return None
            self._slots[shape] = slot
        return slot

    def shape_for(self, rows: int, num_tokens: int) -> tuple[int, int] | None:
        """The static slot shape for `rows` prompts needing `num_tokens` slots each; None when none fits."""
        shape = (graph_rows(rows), slot_length(num_tokens, self.max_positions))
        return None if shape[0] is None or shape[1] < num_tokens else shape

    def ready_runner(self, rows: int, num_tokens: int) -> StaticRunner | None:
        """A StaticRunner if the slot is built and free right now (never builds, never waits)."""
        shape = self.shape_for(rows, num_tokens) if self.static and not self.static_error else None
        if shape is None or shape not in self._slots or not self._lock.acquire(blocking=False):
            return None
        return StaticRunner(self._slots[shape], release=self._lock.release)

    def runner(self, rows: int, num_tokens: int, build_now: bool):
        """A runner for `rows` prompts needing `num_tokens` cache slots each.

        `build_now`: build a missing slot before answering (batches, which amortise
        it); otherwise (a chat) answer on the simple path and build it behind.
        """
        shape = self.shape_for(rows, num_tokens) if self.static and not self.static_error else None
        if shape is None or not self._lock.acquire(blocking=False):
            return EagerRunner(self.model, self.logits_to_keep)
        slot = self._slots.get(shape)
        if slot is None and build_now:
            slot = self._slot(shape)
        if slot is None:
            self._lock.release()
            if not build_now:
                self.start_warm_up((shape,))
            return EagerRunner(self.model, self.logits_to_keep)
        return StaticRunner(slot, release=self._lock.release)


class SlotBuilder:
    """One background thread builds every decoder's queued slots, shortest first across decoders, so after
    a load both Compare models get their common chat slot before either gets a rarer one. A decoder whose
    slots are in use is skipped for now and retried (its batch may run for a while)."""

    RETRY_S = 0.05  # wait before retrying when every queued decoder is busy

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list = []  # (slot length, rows, order, decoder, shape)
        self._order = itertools.count()
        self._building = None  # the decoder whose slot is being built now
        self._running = False

    def _queued(self, decoder) -> list:
        return [entry for entry in self._heap if entry[3] is decoder]

    def put(self, decoder: Decoder, shapes) -> None:
        with self._cond:
            queued = {entry[4] for entry in self._queued(decoder)}
            for shape in dict.fromkeys(shapes):
                if shape not in decoder._slots and shape not in queued:
                    heapq.heappush(self._heap, (shape[1], shape[0], next(self._order), decoder, shape))
            if self._heap and not self._running:
                self._running = True
                threading.Thread(target=self._run, name="ruozhi-decode-warm-up", daemon=True).start()

    def wait(self, decoder: Decoder, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._queued(decoder) and self._building is not decoder, timeout)

    def _next(self):
        """The first queued (decoder, shape) whose decoder is free, its lock taken; None when all are busy."""
        for entry in sorted(self._heap):
            decoder = entry[3]
            if decoder.static_error or decoder._lock.acquire(blocking=False):
                self._heap.remove(entry)
                heapq.heapify(self._heap)
                if decoder.static_error:
                    return self._next()
                return decoder, entry[4]
        return None

    def _run(self) -> None:
        try:
            self._build_until_empty()
        except BaseException:  # _slot turns build errors into static_error; this is only for the unforeseen
            with self._cond:
                self._running = False
                self._cond.notify_all()
            raise

    def _build_until_empty(self) -> None:
        while True:
            with self._cond:
                found = self._next()
                while found is None:
                    if not self._heap:  # the end check and the stop in one step: nothing put is left behind
                        self._running = False
                        self._cond.notify_all()
                        return
                    self._cond.wait(self.RETRY_S)
                    found = self._next()
                decoder, shape = found
                self._building = decoder
            try:
                decoder._slot(shape)
            finally:
                decoder._lock.release()
                with self._cond:
                    self._building = None
                    self._cond.notify_all()


WARM_UP = SlotBuilder()


class Batch:
    """One model decoding left-padded prompts: the prefill at the first `launch`, then a token per row per tick.

    `launch` queues the work (on the model's CUDA stream) and `collect` waits for
    the new tokens; between the two another model's step can be queued. A row ends
    at its first end id (not kept in `tokens`) or at max_new_tokens.
    """

    def __init__(self, decoder: Decoder, prompts: list[list[int]], settings: DecodeSettings, build_now: bool = True):
        if not prompts or any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        self.decoder, self.settings, self.prompts = decoder, settings, prompts
        rows = len(prompts)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]  # each row's answer so far
        self.alive = [settings.max_new_tokens > 0] * rows
        self.done = not any(self.alive)
        self.steps = 0
        self._eos = frozenset(settings.eos_token_ids)
        self._warpers = sampling_warpers(settings) if settings.do_sample else []
        self._seen = None  # (rows, V) bool: tokens each row has read or written, for the repetition penalty
        self._next = None  # (rows,) the tokens chosen last, on the device
        cuda = decoder.device.type == "cuda"
        self._host = torch.empty(rows, dtype=torch.long, pin_memory=cuda)
        self._ready = torch.cuda.Event() if cuda else None
        self._num_tokens = max(map(len, prompts)) + settings.max_new_tokens  # cache slots a row needs
        self.runner = None if self.done else decoder.runner(rows, self._num_tokens, build_now)
        self.switched_at: int | None = None  # the step at which the simple path handed over to a static slot

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, T) left-padded ids and their mask on the device."""
        width = max(map(len, self.prompts))
        ids = torch.full((len(self.prompts), width), self.settings.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(self.prompts), width), dtype=torch.long)
        for row, prompt in enumerate(self.prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.decoder.device), mask.to(self.decoder.device)

    def launch(self) -> None:
        stream = self.decoder.stream
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            if self.steps == 0:
                ids, mask = self._padded()
                logits = self.runner.prefill(ids, mask)  # (rows, V)
                if self.settings.repetition_penalty != 1.0:
                    self._seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
                    self._seen.scatter_(1, torch.where(mask.bool(), ids, ids[:, -1:]), True)  # pads are not seen
            else:
                self._take_ready_slot()
                logits = self.runner.step(self._next)
            self._next = choose_next(logits, self._seen, self.settings, self._warpers)  # (rows,)
            if self._seen is not None:
                self._seen.scatter_(1, self._next[:, None], True)
            self._host.copy_(self._next, non_blocking=self._ready is not None)
            if self._ready is not None:
                self._ready.record(stream)

    def _take_ready_slot(self) -> None:
        """Simple path -> static slot mid-answer, once the warm-up has built one and it is free: the first
        answer after a model loads starts at once on the simple path and finishes on the captured step."""
        if not isinstance(self.runner, EagerRunner):
            return
        static = self.decoder.ready_runner(len(self.prompts), self._num_tokens)
        if static is None:
            return
        static.slot.adopt(self.runner)
        self.runner.close()
        self.runner, self.switched_at = static, self.steps

    def collect(self) -> list[int]:
        """The rows whose answer grew by a token this tick."""
        if self._ready is not None:
            self._ready.synchronize()
        grew = []
        for row, token in enumerate(self._host.tolist()):
            if not self.alive[row]:
                continue
            if token in self._eos:
                self.alive[row] = False
            else:
                self.tokens[row].append(token)
                grew.append(row)
        self.steps += 1
        if self.steps >= self.settings.max_new_tokens or not any(self.alive):
            self.close()
        return grew

    def close(self) -> None:
        self.done = True
        if self.runner is not None:
            self.runner.close()


def advance_together(batches: list[Batch], cancel=None) -> Iterator[list[list[int]]]:
    """One loop for several batches (both Compare panes, both A/B models): each tick steps every
    unfinished batch once and yields, per batch, the rows that grew. Ends when all are done or
    `cancel` is set; closing the generator, or an error, releases every batch's slot."""
    try:
        while cancel is None or not cancel.is_set():
            live = [b for b in batches if not b.done]
            if not live:
                return
            for batch in live:
                batch.launch()
            yield [batch.collect() if batch in live else [] for batch in batches]
    finally:
        for batch in batches:
            batch.close()


def decode_ids(decoder: Decoder, prompts: list[list[int]], settings: DecodeSettings, cancel=None) -> list[list[int]]:
    """Every row's answer ids (end id excluded) for one batch, or the rows so far when cancelled."""
    batch = Batch(decoder, prompts, settings)
    for _ in advance_together([batch], cancel):
        pass
    return batch.tokens
