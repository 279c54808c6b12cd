"""Generated ids -> streamed text: holds back partial characters and possible stop-sequence starts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"


class TextStream:
    """Decodes a request's output incrementally and finds stop sequences across token boundaries."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stop_sequences: Sequence[str] = (),
        include_stop_sequence: bool = False,
    ) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stop_sequences if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._include_stop = include_stop_sequence
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0  # characters of _text already handed out
        self._search_from = 0  # stop sequences may only start at or after this index

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int, stops_active: bool = True) -> tuple[str, str]:
        """Adds one token; returns (text now safe to emit, the stop sequence matched or '')."""
        self._ids.append(token_id)
        self._text = self._decode(self._ids)
        if not stops_active:
            self._search_from = len(self._text)
        elif self._stops:
            match = self._find_stop()
            if match is not None:
                index, stop = match
                end = index + len(stop) if self._include_stop else index
                self._text = self._text[:end]
                return self._take(end), stop
        return self._take(self._safe_end(hold_stop_prefix=stops_active)), ""

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation)."""
        return self._take(len(self._text))

    def _find_stop(self) -> tuple[int, str] | None:
        start = max(self._search_from, self._emitted - self._longest)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = self._text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _safe_end(self, hold_stop_prefix: bool) -> int:
        end = len(self._text)
        # A trailing replacement character is usually half of a multi-byte character: wait.
        while end > self._emitted and self._text[end - 1] == _REPLACEMENT:
            end -= 1
        if not hold_stop_prefix:  # stops cannot start before _search_from: nothing to wait for
            return end
        # Hold back a tail that could still grow into a stop sequence.
        for length in range(min(self._longest - 1, end - self._emitted), 0, -1):
            tail = self._text[end - length : end]
            if any(stop.startswith(tail) for stop in self._stops):
                return end - length
        return end

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        piece = self._text[self._emitted : end]
        self._emitted = end
        return piece
