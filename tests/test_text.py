"""TextStream: streamed text never shows a stop sequence or half a character."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tests.conftest import Target
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


def test_runs_of_invalid_bytes_are_committed_within_a_bounded_window() -> None:
    calls: list[int] = []

    def recording(ids: Sequence[int]) -> str:
        calls.append(len(ids))
        return decode(ids)

    stream = TextStream(recording)
    ids = [0] + [6] * 40 + [8]  # lone lead bytes never complete: 40 replacement characters
    pieces = [stream.push(token_id)[0] for token_id in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == decode(ids) == stream.text
    assert max(calls) <= 16


# SentencePiece-style pieces: decoding drops the leading space of the first piece of whatever it is given.
SP_VOCAB = {0: "\u2581Hello", 1: "\u2581world", 2: ",", 3: "\u2581how", 4: "\u2581are", 5: "\u2581you"}


def sp_decode(ids: Sequence[int]) -> str:
    text = "".join(SP_VOCAB[i] for i in ids).replace("\u2581", " ")
    return text.removeprefix(" ")


def test_prefix_window_keeps_the_spaces_a_window_decode_drops() -> None:
    ids = [0, 1, 2, 3, 4, 5]
    stream = TextStream(sp_decode)
    pieces = [stream.push(token_id)[0] for token_id in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == "Hello world, how are you" == sp_decode(ids) == stream.text
    assert pieces[1] == " world", "decoded after its prefix token, not alone as 'world'"


# Real texts for the embedded model's byte-level tokenizer: CJK and emoji split into byte tokens.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m. -- isn't it?",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n - 1) + fib(n - 2)\n\n\n",
    "你好，世界！日本語のテキストと한국어 텍스트。",
    "Party 🎉👍🏽 family 👨‍👩‍👧 flags 🇯🇵 done 🚀",
    "  leading spaces, trailing spaces   ",
]


def stream_all(stream: TextStream, ids: Sequence[int]) -> list[str]:
    pieces = []
    for token_id in ids:
        piece, stop = stream.push(token_id)
        assert stop == ""
        pieces.append(piece)
    pieces.append(stream.flush())
    return pieces


@pytest.mark.parametrize("source", TEXTS)
def test_streamed_pieces_join_to_the_full_decode(target: Target, source: str) -> None:
    tokenizer = target.tokenizer
    ids = tokenizer.encode(source)
    stream = TextStream(tokenizer.decode)
    pieces = stream_all(stream, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == stream.text
    assert not any("\ufffd" in piece for piece in pieces), "no half character is ever emitted"


def test_cjk_and_emoji_really_split_into_byte_tokens(target: Target) -> None:
    tokenizer = target.tokenizer
    for source in TEXTS[2:4]:
        assert any(tokenizer.decode([i]).endswith("\ufffd") for i in tokenizer.encode(source))


def test_decode_only_ever_sees_a_bounded_window(target: Target) -> None:
    tokenizer = target.tokenizer
    ids = tokenizer.encode(" ".join(TEXTS * 20))[:500]
    assert len(ids) == 500
    calls: list[int] = []

    def recording(window: Sequence[int]) -> str:
        calls.append(len(window))
        return tokenizer.decode(window)

    stream = TextStream(recording)
    pieces = stream_all(stream, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == stream.text
    assert max(calls) <= 16
    assert len(calls) <= 2 * len(ids) + 2, "two short decodes per token at most"


def test_stop_sequence_across_byte_tokens(target: Target) -> None:
    tokenizer = target.tokenizer
    ids = tokenizer.encode("你好，世界！日本語")
    stream = TextStream(tokenizer.decode, ["世界"])
    pieces = []
    for token_id in ids:
        piece, stop = stream.push(token_id)
        pieces.append(piece)
        if stop:
            break
    assert stop == "世界"
    assert "".join(pieces) == "你好，" == stream.text
