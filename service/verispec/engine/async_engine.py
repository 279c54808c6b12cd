"""The asyncio facade of the engine core: submit a request, stream its outputs, cancel on exit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from verispec.engine.core import EngineCore, EngineStats
from verispec.request import Request, StepOutput


class AsyncEngine:
    """Bridges the engine thread to coroutines; every output crosses with call_soon_threadsafe."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    async def generate(self, request: Request) -> AsyncIterator[StepOutput]:
        """Yields one output per engine step; the last has `finished` set.

        Leaving the iteration early (caller cancelled, disconnected, or stopped reading) aborts the
        request, and the engine frees its slot and cache at its next step.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()

        def sink(out: StepOutput) -> None:
            # A closed loop raises RuntimeError: nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.core.submit(request, sink)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.core.abort(request.request_id)

    def stats(self) -> EngineStats:
        return self.core.stats()
