"""TextStream: streamed text never shows a stop sequence or half a character."""

from __future__ import annotations

from collections.abc import Sequence

from verispec.engine.text import TextStream

# A toy vocabulary: token id -> bytes, decoded together like a byte-level BPE.
VOCAB = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: b"\n", 5: b"\n", 6: b"\xc3", 7: b"\xa9", 8: b"!"}


def decode(ids: Sequence[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def run(ids: list[int], stops: Sequence[str] = (), include: bool = False) -> tuple[list[str], str, str]:
    stream = TextStream(decode, stops, include)
    pieces = []
    for token_id in ids:
        piece, stop = stream.push(token_id)
        pieces.append(piece)
        if stop:
            return pieces, stop, stream.text
    pieces.append(stream.flush())
    return pieces, "", stream.text


def test_plain_text_streams_whole() -> None:
    pieces, stop, text = run([0, 1, 2, 3])
    assert "".join(pieces) == "Hello world" == text
    assert stop == ""


def test_stop_sequence_spanning_tokens() -> None:
    pieces, stop, text = run([0, 1, 2, 3, 8], stops=["lo wo"])
    assert stop == "lo wo"
    assert "".join(pieces) == "Hel"
    assert text == "Hel"


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    pieces, stop, _ = run([0, 1, 2, 3], stops=["lo!"])
    assert stop == ""
    assert pieces[0] == "He", "'l' might start 'lo!': held back"
    assert pieces[0] + pieces[1] == "Hel", "'lo' might start 'lo!': held back"
    assert "".join(pieces) == "Hello world"


def test_include_stop_sequence() -> None:
    pieces, stop, text = run([0, 1, 4, 5, 2], stops=["\n\n"], include=True)
    assert stop == "\n\n"
    assert "".join(pieces) == "Hello\n\n" == text


def test_partial_utf8_is_held_back() -> None:
    pieces, _, text = run([0, 6, 7, 8])
    assert pieces[1] == "", "half of 'é' is not emitted"
    assert pieces[2] == "é"
    assert text == "Helé!"


def test_stops_inactive_before_min_tokens() -> None:
    stream = TextStream(decode, ["lo"])
    assert stream.push(0, stops_active=False) == ("Hel", "")
    assert stream.push(1, stops_active=False) == ("lo", "")
    assert stream.push(2) == (" wor", "")
