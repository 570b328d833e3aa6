"""The `@spaces.GPU` functions. Imported by the app before it launches: ZeroGPU registers them at launch.

Off a ZeroGPU Space `spaces.GPU` returns each function unchanged, so importing this is harmless
everywhere. On a Space each call runs in a forked GPU process for the duration it asks (a callable
of the call's own arguments), its argument and result (or each item it yields) pickled. `spaces`
passes only a `gr.Error` on with its message (any other exception arrives as its class name), so a
Compare or A/B refusal inside a lease is raised as one, in the page's language.
"""

from __future__ import annotations

from typing import Iterator

import spaces

from ..errors import RuozhiError
from .compare import (ABRequest, PairRequest, ab_duration, iter_batch_ab_in_lease, pair_duration,
                      stream_pair_in_lease)
from .lease import lease_duration, run_lease

gpu_lease = spaces.GPU(duration=lease_duration)(run_lease)  # one training lease: LeaseSpec -> LeaseResult


def _said_to_the_page(error: RuozhiError, lang: str) -> Exception:
    import gradio as gr

    return gr.Error(error.localized(lang))


def compare_pair(request: PairRequest) -> Iterator[tuple[str, str]]:
    try:
        yield from stream_pair_in_lease(request)
    except RuozhiError as e:
        raise _said_to_the_page(e, request.lang) from None


def compare_ab(request: ABRequest) -> Iterator[dict]:
    try:
        yield from iter_batch_ab_in_lease(request)
    except RuozhiError as e:
        raise _said_to_the_page(e, request.lang) from None


gpu_compare_pair = spaces.GPU(duration=pair_duration)(compare_pair)  # PairRequest -> (base_text, tuned_text)...
gpu_compare_ab = spaces.GPU(duration=ab_duration)(compare_ab)  # ABRequest -> rows as their batch finishes
