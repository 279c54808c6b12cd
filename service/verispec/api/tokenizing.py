"""Tokenization off the event loop: small inputs on the default pool, large ones one at a time.

A large input (a long prompt to truncate, a document to count) costs seconds of CPU and hundreds of
MB while it is tokenized. Those run on their own thread, one at a time, behind a queue bounded in
characters (beyond it: RESOURCE_EXHAUSTED with a retry delay), and the heap is handed back to the
system after each, so memory returns to its level. Small inputs never wait behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from verispec.errors import OverloadedError, VerispecError

T = TypeVar("T")

SMALL_INPUT_CHARS = 16_384  # below this an input is tokenized on the default pool at once


def _find_malloc_trim() -> Any:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


_MALLOC_TRIM = _find_malloc_trim()


def trim_heap() -> None:
    """glibc's malloc_trim(0): freed heap pages go back to the system (a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class TokenizerLane:
    """Runs tokenization work off the loop, large inputs `workers` at a time within `max_queued_chars`."""

    def __init__(self, max_queued_chars: int, workers: int = 1) -> None:
        self.max_queued_chars = max_queued_chars
        self.workers = workers
        self._slots: asyncio.Semaphore | None = None
        self._queued_chars = 0
        self._job_seconds = 1.0  # how long the last large job took, for the retry delay
        self._trim_scheduled = False

    def release_memory_soon(self) -> None:
        """After a large input (served or refused): once its request is gone, freed heap goes back to
        the system (the request's own bytes, gRPC's buffers), on a thread, at most once a second."""
        if self._trim_scheduled:
            return
        self._trim_scheduled = True

        def trim() -> None:
            self._trim_scheduled = False
            threading.Thread(target=trim_heap, name="verispec-trim", daemon=True).start()

        asyncio.get_running_loop().call_later(1.0, trim)

    async def run(self, num_chars: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a worker thread; raises OverloadedError when too much large input waits."""
        if num_chars < SMALL_INPUT_CHARS:
            return await asyncio.to_thread(fn, *args)
        if self._queued_chars + num_chars > self.max_queued_chars:
            raise OverloadedError(
                f"{self._queued_chars} characters of large input are being tokenized or wait for it "
                f"(limit {self.max_queued_chars}); retry later or send less text",
                retry_after_s=self._job_seconds,
            )
        self._queued_chars += num_chars
        try:
            return await self._run_large(fn, args)
        finally:
            self._queued_chars -= num_chars
            self.release_memory_soon()  # what the answer or the error still holds is freed by then

    async def _run_large(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)  # made inside the loop that uses it
        slots = self._slots
        await slots.acquire()

        def work(result: asyncio.Future[T]) -> None:
            started = loop.time()
            try:
                value: T | None = fn(*args)
                error: BaseException | None = None
            except BaseException as exc:
                value, error = None, exc
                if isinstance(exc, VerispecError):
                    # A refusal's frames (holding the input) serve nobody, and this frame holding the
                    # error would keep them in a reference cycle until the collector's next full pass.
                    exc.__traceback__ = None
            trim_heap()

            def finish() -> None:
                self._job_seconds = max(loop.time() - started, 0.1)
                slots.release()  # only once the work is done: a caller that left keeps its slot till then
                if result.done():  # the caller left
                    return
                if error is not None:
                    result.set_exception(error)
                else:
                    result.set_result(value)  # type: ignore[arg-type]

            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(finish)

        result: asyncio.Future[T] = loop.create_future()
        # A daemon thread: a shutdown never waits for a tokenization nobody needs any more.
        threading.Thread(target=work, args=(result,), name="verispec-tokenize", daemon=True).start()
        try:
            return await result
        finally:
            # An error raised from the future holds this frame in its traceback, and this frame the
            # future that holds the error: a reference cycle (with the input in it) until the
            # collector's next full pass, unless the frame lets go of the future.
            del result
