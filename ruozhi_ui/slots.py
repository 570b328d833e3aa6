"""Long work held one at a time per visitor: `VisitorSlots.hold(visitor)` around an A/B table or a chat answer.

Gradio's queue bounds how many such events run at once for everyone (each event's
`concurrency_limit`); this bounds one visitor to one, so two of their calls cannot
take both workers while another visitor waits. Knows nothing of Gradio.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from .errors import PolicyError


class VisitorSlots:
    def __init__(self):
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, visitor: str):
        """One slot for `visitor` for the block's duration; PolicyError when theirs is taken."""
        with self._lock:
            if visitor in self._busy:
                raise PolicyError(key="err.policy.one_at_a_time")
            self._busy.add(visitor)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(visitor)

    def busy(self, visitor: str) -> bool:
        with self._lock:
            return visitor in self._busy
