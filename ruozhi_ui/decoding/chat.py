"""Chats in, answers out as text: what the probes, the Compare panes and the A/B table call.

A prompt is rendered by `encoding.render_prompt`, the renderer training uses, so
every answer here reads what training taught. `stream_texts` streams one prompt per
model through one loop; `answer_in_batches` runs many prompts per model in
length-sorted batches; `generate_batch` is the probes' one batch. Text grows token
by token through `IncrementalText`; a finished answer is the tokenizer's decode of
all its ids, exactly what a non-streamed answer is.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..config import GenConfig
from ..data import Record
from ..encoding import prompt_ids
from .engine import Batch, Decoder, advance_together, decode_ids
from .settings import DecodeSettings, resolve_settings

AB_BATCH_ROWS = 32  # prompts per A/B batch: rows reach the table a batch at a time


def chat_prompt_ids(tokenizer, message: str, history=(), system_prompt: str = "") -> list[int]:
    """The chat as training renders it (same renderer, same system prompt rule), as ids; control-token text
    the person typed stays text (`encoding.prompt_ids`)."""
    record = Record(instruction=message, output="", system=None,
                    history=tuple((str(u), str(a)) for u, a in (history or ())))
    return prompt_ids(tokenizer, record, system_prompt)


class IncrementalText:
    """An answer's text as its ids arrive; it only ever grows.

    Each new id decodes a short window of the latest ids instead of the whole answer
    (the incremental detokenizing of vLLM's `detokenize_incrementally`); a window
    ending in an incomplete UTF-8 character (U+FFFD) waits for the next id.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._prefix, self._read = 0, 0  # ids[_prefix:_read] were decoded into text's tail already

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        """Append one id; True when the text grew."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return False
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def finish(self) -> bool:
        """Make the text the decode of every id (what a non-streamed answer shows); True if it changed."""
        full = self._decode(self.ids)
        changed, self.text = full != self.text, full
        return changed


def open_batches(jobs: list[tuple[Decoder, list[list[int]], DecodeSettings]], build_now: bool) -> list[Batch]:
    """One Batch per (decoder, prompts, settings); if one cannot start, the ones started are closed."""
    batches: list[Batch] = []
    try:
        for decoder, prompts, settings in jobs:
            batches.append(Batch(decoder, prompts, settings, build_now))
    except BaseException:
        for batch in batches:
            batch.close()
        raise
    return batches


@torch.no_grad()
def stream_texts(jobs: list[tuple[Decoder, object, list[int], DecodeSettings]], cancel=None) -> Iterator[tuple[str, ...]]:
    """(decoder, tokenizer, prompt ids, settings) per model -> every model's text so far, yielded whenever
    one grew; all advance in one loop. The last yield holds the finished answers (unless cancelled).
    A missing captured step is built behind the answer, never before it."""
    batches = open_batches([(d, [ids], s) for d, _, ids, s in jobs], build_now=False)
    texts = [IncrementalText(tok) for _, tok, _, _ in jobs]
    for grown in advance_together(batches, cancel):
        changed = False
        for text, batch, rows in zip(texts, batches, grown):
            if rows:
                changed |= text.add(batch.tokens[0][-1])
        if changed:
            yield tuple(t.text for t in texts)
    if cancel is None or not cancel.is_set():
        if any([t.finish() for t in texts]):
            yield tuple(t.text for t in texts)


@torch.no_grad()
def answer_in_batches(jobs: list[tuple[Decoder, object, DecodeSettings]], prompt_ids: list[list[list[int]]],
                      cancel=None, batch_rows: int | None = None
                      ) -> Iterator[tuple[list[int], list[list[tuple[str, int]]]]]:
    """Answer every prompt with every model, `batch_rows` (AB_BATCH_ROWS) prompts at a time.

    `prompt_ids[m][i]` is prompt i as model m's tokenizer encodes it. Prompts are
    sorted by length (little padding) and each batch runs all models in one loop.
    Yields (prompt indices, per model [(answer text, answer tokens)] for them) as
    each batch finishes, indices ascending within a batch. Stops at `cancel`
    without yielding the unfinished batch.
    """
    batch_rows = batch_rows or AB_BATCH_ROWS
    order = sorted(range(len(prompt_ids[0])), key=lambda i: (len(prompt_ids[0][i]), i))
    for start in range(0, len(order), batch_rows):
        indices = sorted(order[start:start + batch_rows])
        batches = open_batches([(d, [prompt_ids[m][i] for i in indices], s) for m, (d, _, s) in enumerate(jobs)],
                               build_now=True)
        for _ in advance_together(batches, cancel):
            pass
        if cancel is not None and cancel.is_set():
            return
        yield indices, [[(tok.decode(ids, skip_special_tokens=True), len(ids)) for ids in batch.tokens]
                        for (_, tok, _), batch in zip(jobs, batches)]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], system_prompt: str, gen: GenConfig = GenConfig(),
                   *, decoder: Decoder | None = None, cancel=None) -> list[str]:
    """Answers to `prompts` (user messages, no history) as one batch: the probes at each epoch end.

    Rendered and decoded as Compare does (`gen`'s None fields = the model's own), so
    the same weights give the same answers in both places. Switches a training model
    to eval for the call. Keep one `decoder` across calls to reuse its captured steps
    (valid while the parameters keep their storage, as in-place optimizer updates do).
    """
    if not prompts:
        return []
    settings = resolve_settings(model, tokenizer, gen)
    ids = [chat_prompt_ids(tokenizer, p, (), system_prompt) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        answers = decode_ids(decoder or Decoder(model), ids, settings, cancel)
    finally:
        model.train(was_training)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
