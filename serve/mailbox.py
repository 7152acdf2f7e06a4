"""Handing one request's deltas from the batching thread to the async generator that streams them out."""
from __future__ import annotations

import asyncio
import threading

from serve.sampling import Delta, merge


class Mailbox:
    """The batching thread ``put``s deltas; the replica's event loop ``get``s them. What arrives while the consumer
    is busy (sending the previous message) is merged into one pending delta, and the loop is woken only when that
    pending delta starts: so a loaded replica sends fewer, larger messages instead of one per emit and one
    cross-thread wake-up each, and an idle one still streams every emit at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: Delta | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, item: Delta | BaseException, wake: bool = True) -> bool:
        """From any thread. An error replaces what is pending: the request fails with it. Returns whether the
        consumer needs a wake-up; ``wake=False`` leaves setting ``ready`` (in the loop) to the caller."""
        with self.lock:
            wake_up = self.pending is None
            if isinstance(self.pending, BaseException):
                pass  # already failing: nothing after the error matters
            elif isinstance(item, BaseException) or self.pending is None:
                self.pending = item
            else:
                self.pending = merge(self.pending, item)
        if wake and wake_up:
            self.loop.call_soon_threadsafe(self.ready.set)
        return wake_up

    async def get(self) -> Delta | BaseException:
        await self.ready.wait()
        with self.lock:
            item, self.pending = self.pending, None
            self.ready.clear()
        return item
