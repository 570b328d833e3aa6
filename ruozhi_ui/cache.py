"""One small thread-safe LRU that loads each key once: loaded datasets, statistics, models.

Two callers asking for the same missing key at once: the second waits for the first
one's load instead of loading again (a model is a second of I/O and ~1 GB).
Values must be immutable (or treated so): they are shared across sessions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable


class LoadingLRU:
    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # guards _items and _key_locks
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, load: Callable[[], object]):
        """The value for `key`, calling `load()` only when it is not cached (once, whoever asks)."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            value = load()
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    # A caller still using an evicted value keeps its reference; memory goes when it is done.
                    old, _ = self._items.popitem(last=False)
                    self._key_locks.pop(old, None)
            return value

    def peek(self, key: Hashable):
        with self._lock:
            return self._items.get(key)

    def values(self) -> list:
        with self._lock:
            return list(self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
