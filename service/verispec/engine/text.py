"""Generated ids -> streamed text: incremental decoding that holds back partial characters and possible stop starts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes, so at most 4 byte tokens. Uncommitted ids beyond this that still decode
# to a trailing U+FFFD are invalid output rather than a character in progress: they are committed as they decode,
# which keeps the decoded window bounded (at most 2 * _MAX_PENDING ids).
_MAX_PENDING = 8


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
        # The output ids from the prefix offset on; older ids are never decoded again. The first _read of
        # them (prefix offset .. read offset) are already committed to _text and stay only as left context,
        # so the tokenizer decodes the ids after them as it would inside the whole output (a SentencePiece
        # tokenizer, for one, drops the leading space of a window's first token). The ids after _read are
        # not committed yet: their text may still end in half a character.
        self._window: list[int] = []
        self._read = 0
        self._text = ""  # committed text, appended to as ids commit
        self._emitted = 0  # characters of _text already handed out
        self._search_from = 0  # stop sequences may only start at or after this index

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int, stops_active: bool = True) -> tuple[str, str]:
        """Adds one token; returns (text now safe to emit, the stop sequence matched or '')."""
        self._window.append(token_id)
        self._commit(final=False)
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
        """Everything not yet emitted (at the end of generation), a trailing half character included."""
        self._commit(final=True)
        return self._take(len(self._text))

    def _commit(self, final: bool) -> None:
        """Appends the text of the uncommitted ids to _text, unless it may still end in half a character."""
        pending = len(self._window) - self._read
        if pending == 0:
            return
        prefix = self._decode(self._window[: self._read])
        new = self._decode(self._window)[len(prefix) :]
        if not final and pending < _MAX_PENDING and (not new or new.endswith(_REPLACEMENT)):
            return  # wait for the ids that complete the character
        self._text += new
        # Advance both offsets: the ids just committed become the next prefix, the earlier prefix is dropped.
        del self._window[: self._read]
        self._read = len(self._window)

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
