"""Compare's two streaming answers and the batch A/B table, as lease bodies: what gpu.py decorates.

Each body takes one small frozen request (strings, tuples, a GenConfig: the platform pickles it) and
yields what `generation.stream_pair` / `generation.iter_batch_ab` yield, so the Compare tab shows a
lease's stream exactly as it shows a local one. The models load inside the lease, through a cache
of the lease process's own: ZeroGPU keeps an idle worker process for the next call, so a second
question to the same pair finds them loaded. The app process never holds them.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Iterator

from ..config import GenConfig

LOAD_S = 15  # two 0.5B models from the disk cache onto the GPU, decoders ready
DECODE_TOK_S = 100  # tokens per second per pane, at least (benchmarks/RESULTS.md: ~200 on an H200)
AB_PROMPT_S = 0.05  # one A/B prompt of 151 tokens, both models, in batches (122 prompts: ~5 s)


@dataclass(frozen=True)
class PairRequest:
    base_spec: str
    tuned_path: str
    base_trust_remote_code: bool
    tuned_trust_remote_code: bool
    message: str
    history_base: tuple[tuple[str, str], ...]  # (user, assistant) turns
    history_tuned: tuple[tuple[str, str], ...]
    system_prompt: str
    gen: GenConfig
    lang: str = "zh"  # the page's: a refusal inside the lease is said in it


@dataclass(frozen=True)
class ABRequest:
    base_spec: str
    tuned_path: str
    base_trust_remote_code: bool
    tuned_trust_remote_code: bool
    prompts: tuple[str, ...]
    references: tuple[str, ...] | None
    system_prompt: str
    gen: GenConfig
    lang: str = "zh"


_lease_models = None  # the lease process's ModelCache (see the module docstring); never built in the app process


def _pair(request):
    global _lease_models
    from ..generation import ModelCache

    if _lease_models is None:
        _lease_models = ModelCache()
    return (_lease_models.get(request.base_spec, trust_remote_code=request.base_trust_remote_code),
            _lease_models.get(request.tuned_path, trust_remote_code=request.tuned_trust_remote_code))


def stream_pair_in_lease(request: PairRequest) -> Iterator[tuple[str, str]]:
    """(base_text, tuned_text) as either grows; the platform closing the stream (the visitor's Stop) stops decoding."""
    from ..generation import stream_pair

    base, tuned = _pair(request)
    yield from stream_pair(base, tuned, request.message, request.history_base, request.history_tuned,
                           request.system_prompt, request.gen, threading.Event())


def iter_batch_ab_in_lease(request: ABRequest) -> Iterator[dict]:
    """The A/B rows as their batch finishes, as `generation.iter_batch_ab` yields them."""
    from ..generation import iter_batch_ab

    base, tuned = _pair(request)
    references = list(request.references) if request.references is not None else None
    yield from iter_batch_ab(base, tuned, list(request.prompts), references, request.system_prompt, request.gen,
                             threading.Event())


def pair_duration(request: PairRequest) -> int:
    """Seconds a Compare answer asks for: loading the pair, then max_new_tokens at the slowest pane's pace."""
    return math.ceil(LOAD_S + request.gen.max_new_tokens / DECODE_TOK_S + 5)


def ab_duration(request: ABRequest) -> int:
    """Seconds an A/B table asks for: loading the pair, then its prompts in batches."""
    tokens_scale = request.gen.max_new_tokens / 151
    return math.ceil(LOAD_S + len(request.prompts) * AB_PROMPT_S * tokens_scale + 5)
