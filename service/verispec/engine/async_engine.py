"""The asyncio facade of the engine core: submit a request, stream its outputs, cancel on exit.

Each request's outputs cross from the engine thread into a buffer on the event loop. A reader that
falls behind (its HTTP/2 window closed, a client that stopped reading) fills the buffer; at
MAX_BUFFERED_OUTPUTS the engine parks the request (no more steps, its slot and KV pages freed) and
takes it up again once the reader has drained the buffer to RESUME_BUFFERED_OUTPUTS. A reader that
takes nothing for `stall_timeout_s` while holding an output it cannot send is stalled: the request
is cancelled in the engine and the task reading it is cancelled too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from verispec.engine.core import EngineCore, EngineStats
from verispec.request import Request, StepOutput

MAX_BUFFERED_OUTPUTS = 16  # outputs a slow reader may leave unread before its request is parked
RESUME_BUFFERED_OUTPUTS = 4  # a parked request resumes when its reader is down to this many


class OutputStream:
    """One request's outputs on the event loop: a bounded buffer, parking and the stall watchdog.

    The sink runs on the engine thread; everything else on the loop. `stalled` tells the reader's
    task, once cancelled, why.
    """

    def __init__(self, core: EngineCore, request: Request, stall_timeout_s: float) -> None:
        self.core = core
        self.request_id = request.request_id
        self.stall_timeout_s = stall_timeout_s
        self.stalled = False
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[StepOutput] = asyncio.Queue()
        self._delivered = 0  # written by the engine thread only
        self._taken = 0  # written by the loop only
        self._parked = False
        self._lock = threading.Lock()  # park/resume decisions, from either side
        self._reader: asyncio.Task[object] | None = None
        self._holding_since: float | None = None  # loop time the reader took its last output
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    def sink(self, out: StepOutput) -> None:
        """Engine thread: queue the output; park the request when its reader is too far behind."""
        self._delivered += 1
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        if out.finished or self._delivered - self._taken < MAX_BUFFERED_OUTPUTS:
            return
        with self._lock:
            if not self._parked and self._delivered - self._taken >= MAX_BUFFERED_OUTPUTS:
                self._parked = True
                self.core.park(self.request_id)

    def __aiter__(self) -> AsyncIterator[StepOutput]:
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            self._holding_since = None
            raise StopAsyncIteration
        if self._reader is None:
            self._reader = asyncio.current_task()
        self._holding_since = None  # back for more: whatever it held went out
        out = await self._queue.get()
        self._taken += 1
        if self._parked and self._delivered - self._taken <= RESUME_BUFFERED_OUTPUTS:
            with self._lock:
                if self._parked:
                    self._parked = False
                    self.core.resume(self.request_id)
        self.finished = out.finished
        self._holding_since = self._loop.time()
        self._arm()
        return out

    def _arm(self) -> None:
        if self.stall_timeout_s > 0 and self._watchdog is None and not self._closed:
            self._watchdog = self._loop.call_later(self.stall_timeout_s, self._check_stall)

    def _check_stall(self) -> None:
        self._watchdog = None
        if self._closed or self._holding_since is None:
            return
        waited = self._loop.time() - self._holding_since
        if waited < self.stall_timeout_s:
            self._watchdog = self._loop.call_later(self.stall_timeout_s - waited, self._check_stall)
            return
        # The reader has held one output for the whole timeout: it cannot send. Free the engine's
        # part now, and end the reader's task (a write blocked by flow control never returns).
        self.stalled = True
        if not self.finished:
            self.core.abort(self.request_id)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    async def aclose(self) -> None:
        """Ends the stream: an unfinished request is aborted (the engine frees it at its next step)."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if not self.finished:
            self.core.abort(self.request_id)


class AsyncEngine:
    """Bridges the engine thread to coroutines; every output crosses with call_soon_threadsafe."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def stream(self, request: Request, stall_timeout_s: float = 0.0) -> OutputStream:
        """Submits `request` (raising at once when refused) and returns its outputs' stream; the last
        output has `finished` set. Close it with aclose() (contextlib.aclosing) when done."""
        stream = OutputStream(self.core, request, stall_timeout_s)
        self.core.submit(request, stream.sink)
        return stream

    def stats(self) -> EngineStats:
        return self.core.stats()
