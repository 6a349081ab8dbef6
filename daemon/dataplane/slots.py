"""The hand-over point between the daemon's threads: one slot holding the newest item.

A real-time pipeline must show the newest frame, not every frame: a queue between a fast
producer and a slow consumer only grows, and so does the latency. A slot keeps one item; a new
one replaces an unread one (counted in :attr:`LatestSlot.dropped`).
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Hand-over of the newest item between threads ("latest wins"); never a queue.

    For one consumer: :meth:`get` marks what it returns as read and then waits for a newer item.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        # Versions, not the item itself, say what is unread: None could be a legitimate item.
        self._version = 0
        self._read_version = 0
        self._dropped = 0
        self._closed = False

    def put(self, item: T) -> None:
        """Store ``item``, replacing (and counting as dropped) an item nobody read. Ignored once
        closed."""
        with self._cond:
            if self._closed:
                return
            if self._version != self._read_version:
                self._dropped += 1
            self._item = item
            self._version += 1
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> T | None:
        """The newest item not yet got, waiting up to ``timeout`` seconds (forever if None).

        Returns None on timeout or once the slot is closed.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or self._version != self._read_version, timeout
            )
            if self._closed or self._version == self._read_version:
                return None
            self._read_version = self._version
            return self._item

    def latest(self) -> T | None:
        """The most recent item, read or not, without waiting or marking it read."""
        with self._cond:
            return self._item

    def close(self) -> None:
        """Wake every waiting :meth:`get`; from now on it returns None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def puts(self) -> int:
        """Items stored so far (for rates)."""
        return self._version

    @property
    def dropped(self) -> int:
        """Items replaced before anyone got them."""
        return self._dropped

    @property
    def closed(self) -> bool:
        return self._closed
