"""The newest value of something, awaited by coroutines on the server's event loop.

A producer (the output thread publishing frames, the status sampler) replaces the value; each
consumer (a stream client, a page's event stream) asks for a version newer than the one it has
and gets the newest, so a slow consumer skips values instead of queueing them. ``set`` may be
called from any thread and never waits: it swaps a reference under a lock held for a few
instructions and, only when a coroutine is waiting, schedules a wake-up on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Latest(Generic[T]):
    """A value and its version (0: nothing set yet)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None
        self._version = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()  # touched on the loop, counted under lock

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """The loop whose coroutines wait (None: the server stopped; ``set`` then only stores)."""
        with self._lock:
            self._loop = loop
            self._closed = loop is None

    def set(self, value: T) -> None:
        """Make ``value`` the newest; from any thread, never blocks on the loop or a consumer."""
        with self._lock:
            self._value = value
            self._version += 1
            loop = self._loop if self._waiters else None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(self._wake)

    def get(self) -> tuple[int, T | None]:
        with self._lock:
            return self._version, self._value

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake every waiter with None (the server stops)."""
        with self._lock:
            self._closed = True
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake)

    async def newer(self, version: int, timeout: float) -> tuple[int, T] | None:
        """The newest (version, value) after ``version``; None on timeout or when closed.
        Call on the bound loop."""
        waiter = asyncio.get_running_loop().create_future()
        with self._lock:
            # Registered under the lock that ``set`` takes: either this sees the new version,
            # or ``set`` sees a waiter and wakes it. No wake-up is lost between the two.
            if self._closed:
                return None
            if self._version > version:
                return self._version, self._value  # type: ignore[return-value]
            self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            with self._lock:
                self._waiters.discard(waiter)
        with self._lock:
            if self._closed or self._version <= version:
                return None
            return self._version, self._value  # type: ignore[return-value]

    def _wake(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
