"""Compare's conversations, kept on the server: one per page session, plain text only, bounded.

The page's chat panes are a view of this store, never its source: a history the
browser sends is not read (a client copy could carry Gradio components, HTML or a
megabyte of turns). Each conversation is (user, base answer, tuned answer) turns of
plain strings; the store keeps at most `sessions` conversations (least recently used
dropped), each at most `turns` user turns and `chars` characters, checked before a
turn is added, so nothing unbounded is ever rendered or tokenised. Knows nothing of
Gradio.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .errors import PolicyError


@dataclass(frozen=True)
class Turn:
    user: str
    base: str | None = None  # None while the answer is still being written
    tuned: str | None = None


class ChatStore:
    """session -> list[Turn], least recently used sessions dropped beyond `sessions`."""

    def __init__(self, sessions: int, turns: int, chars: int):
        self.sessions, self.turns, self.chars = sessions, turns, chars
        self._chats: OrderedDict[str, list[Turn]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._chats)

    def turns_of(self, session: str) -> list[Turn]:
        with self._lock:
            return list(self._chats.get(session, ()))

    def add_user(self, session: str, text: str) -> list[Turn]:
        """Append a user turn (an unanswered one before it is dropped); PolicyError over the bounds."""
        with self._lock:
            turns = [t for t in self._chats.get(session, ()) if t.base is not None]
            if len(turns) + 1 > self.turns:
                raise PolicyError(key="err.chat.turns", max=self.turns)
            size = len(text) + sum(len(t.user) + len(t.base or "") + len(t.tuned or "") for t in turns)
            if size > self.chars:
                raise PolicyError(key="err.chat.chars", n=f"{size:,}", max=f"{self.chars:,}")
            turns.append(Turn(text))
            self._put(session, turns)
            return list(turns)

    def answer(self, session: str, base: str, tuned: str) -> None:
        """Record the answers of the session's pending turn (what the panes show, partial after a Stop)."""
        with self._lock:
            turns = self._chats.get(session)
            if turns and turns[-1].base is None:
                turns[-1] = Turn(turns[-1].user, base, tuned)

    def clear(self, session: str) -> None:
        with self._lock:
            self._chats.pop(session, None)

    def _put(self, session: str, turns: list[Turn]) -> None:
        self._chats[session] = turns
        self._chats.move_to_end(session)
        while len(self._chats) > self.sessions:
            self._chats.popitem(last=False)


def pending(turns: list[Turn]) -> str | None:
    """The user text still waiting for answers, or None."""
    return turns[-1].user if turns and turns[-1].base is None else None


def pairs(turns: list[Turn], side: str) -> list[tuple[str, str]]:
    """The answered turns as (user, answer) pairs of one side ('base' or 'tuned'), for the prompt."""
    return [(t.user, getattr(t, side)) for t in turns if t.base is not None]


def messages(turns: list[Turn], side: str, partial: str | None = None) -> list[dict]:
    """A pane's messages: plain-text {role, content} built here from the store, never from the page.
    `partial` is the pending turn's answer so far (None: no assistant bubble yet)."""
    out = []
    for t in turns:
        out.append({"role": "user", "content": t.user})
        answer = getattr(t, side)
        if answer is None:
            answer = partial
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
    return out
