"""ExLlamaV2's own converter driven from verispec: its fp16 input, its command lines, its processes, its output.

A model directory verispec made (float32 safetensors, config and tokenizer) is exported as the HF fp16
directory the converter reads. Its config.json also carries `rope_theta` at the top level: transformers 5
writes it under `rope_parameters`, where ExLlamaV2 0.3.2 does not look (it would rotate with its default
base of 10,000). The converter measures the export once (`-om measurement.json`) and compiles each point
from that measurement (`-m`), each run as `python -m exllamav2.conversion.convert_exl2` with its output in a
log of its own. What a work directory holds (export, measurement, compiled points) is reused, so a run cut
short resumes. Nothing here imports exllamav2: the converter's processes do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verispec.models import staged_directory

CONVERTER = "exllamav2.conversion.convert_exl2"
EXPORT_MARKER = ".verispec-fp16-export"
MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
STATUS = re.compile(r"\[STATUS\](.*)\[/STATUS\]")
CALIBRATION_PERPLEXITY = re.compile(r"calibration perplexity \(quant\): ([0-9.]+)")
# What the converter's processes run with besides the caller's environment. Without flash-attn or xformers,
# ExLlamaV2 0.3.2 attends through torch SDPA with a block-diagonal mask that is None outside paged batches,
# so its calibration forwards over whole rows would not be causal (the exl2 backend fixes the same in its own
# process, backends/exl2.py); EXLLAMA_NO_SDPA selects its matmul path, which builds the causal mask.
CONVERTER_ENV = {"PYTHONUNBUFFERED": "1", "EXLLAMA_NO_SDPA": "1"}

Progress = Callable[[str], None]


class ConversionError(RuntimeError):
    """A converter process failed or left no output."""


# -- the converter's input ----------------------------------------------------------------------------


def exl2_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json for the converter: fp16, unquantized, the rotary base and scaling where ExLlamaV2 reads them."""
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["torch_dtype"] = "float16"
    if "dtype" in out:
        out["dtype"] = "float16"
    rope = out.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", rope)
    return out


def export_fp16(model_dir: Path, out: Path) -> Path:
    """`model_dir`'s weights rounded to fp16, with its config and tokenizer; written once per source."""
    from safetensors.torch import load_file, save_file

    source = source_key(model_dir)
    marker = out / EXPORT_MARKER
    if marker.is_file() and marker.read_text().strip() == source:
        return out
    with staged_directory(out) as staging:
        tensors = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            for name, tensor in load_file(str(path)).items():
                tensors[name] = tensor.half() if tensor.is_floating_point() else tensor
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text())
        (staging / "config.json").write_text(json.dumps(exl2_config(config), indent=2) + "\n")
        for name in MODEL_FILES:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, staging / name)
        (staging / EXPORT_MARKER).write_text(source + "\n")
    return out


def source_key(model_dir: Path) -> str:
    """What identifies an export's source: verispec's conversion marker (the GGUF's sha256), else file sizes."""
    marker = model_dir / ".verispec-converted"
    if marker.is_file():
        return marker.read_text().strip()
    return ",".join(f"{p.name}:{p.stat().st_size}" for p in sorted(model_dir.glob("*.safetensors")))


# -- points and their command lines -------------------------------------------------------------------


def head_bits_for(bpw: float, head_bits: int = 0) -> int:
    """The head's bits: as given, else the usual choice for EXL2 releases (8 at 8 bpw and above, 6 below)."""
    return head_bits or (8 if bpw >= 8 else 6)


@dataclass(frozen=True)
class PointSpec:
    """One EXL2 point: the decoder's target bits per weight and the head's bits."""

    bpw: float
    head_bits: int

    @property
    def label(self) -> str:
        return f"exl2-{self.bpw:.1f}bpw-h{self.head_bits}"


@dataclass(frozen=True)
class Conversions:
    """A work directory's layout: the fp16 export, one measurement, a directory per point, a log per job."""

    work: Path
    calibration_length: int = 2048  # tokens per row of ExLlamaV2's built-in calibration set

    @property
    def fp16_dir(self) -> Path:
        return self.work / "fp16"

    @property
    def measurement(self) -> Path:
        return self.work / "measurement.json"

    def log(self, label: str) -> Path:
        return self.work / "logs" / f"{label}.log"

    def point_dir(self, point: PointSpec) -> Path:
        return self.work / point.label

    def measurement_command(self) -> list[str]:
        job = self.work / "jobs" / "measurement"
        return [*self._converter(job), "-om", str(self.measurement), "-ml", str(self.calibration_length)]

    def point_command(self, point: PointSpec) -> list[str]:
        job = self.work / "jobs" / point.label
        out = ["-cf", str(self.point_dir(point))]
        bits = ["-b", f"{point.bpw:g}", "-hb", str(point.head_bits), "-l", str(self.calibration_length)]
        return [*self._converter(job), "-m", str(self.measurement), *bits, *out]

    def _converter(self, job_dir: Path) -> list[str]:
        # -nr: a fresh job in its own directory; -so: machine-readable [STATUS] lines, for progress
        return [sys.executable, "-m", CONVERTER, "-i", str(self.fp16_dir), "-o", str(job_dir), "-nr", "-so"]

    def shown(self, command: Sequence[str]) -> str:
        """A command line as a report shows it: `python`, and paths under the work directory as <work>."""
        return " ".join(["python", *command[1:]]).replace(str(self.work), "<work>")

    def compiled(self, point: PointSpec) -> bool:
        """Whether the point's directory holds a finished conversion at its bits (the converter exits with 0 on
        some errors, so its output is what counts)."""
        config = self.point_dir(point) / "config.json"
        if not config.is_file() or not any(self.point_dir(point).glob("*.safetensors")):
            return False
        quantization = json.loads(config.read_text()).get("quantization_config") or {}
        return (
            quantization.get("quant_method") == "exl2"
            and float(quantization.get("bits", -1)) == point.bpw
            and int(quantization.get("head_bits", -1)) == point.head_bits
        )

    def ensure_measurement(self, progress: Progress) -> float | None:
        """The measurement pass, once per export; seconds taken, None when reused."""
        key = self.work / "measurement.key"
        source = (self.fp16_dir / EXPORT_MARKER).read_text()
        if self.measurement.is_file() and key.is_file() and key.read_text() == source:
            return None
        self.measurement.unlink(missing_ok=True)
        seconds = run_converter("measurement", self.measurement_command(), self.log("measurement"), progress)
        if not self.measurement.is_file():
            raise ConversionError(
                f"measurement: no {self.measurement.name}; its last lines:\n{tail(self.log('measurement'))}"
            )
        key.write_text(source)
        return seconds

    def ensure_point(self, point: PointSpec, progress: Progress) -> float | None:
        """One point compiled from the measurement; seconds taken, None when reused."""
        if self.compiled(point):
            return None
        seconds = run_converter(point.label, self.point_command(point), self.log(point.label), progress)
        if not self.compiled(point):
            raise ConversionError(f"{point.label}: no compiled model; its last lines:\n{tail(self.log(point.label))}")
        shutil.rmtree(self.work / "jobs" / point.label, ignore_errors=True)  # hidden states, per-tensor files
        return seconds


# -- running the converter ----------------------------------------------------------------------------


def run_converter(label: str, command: Sequence[str], log: Path, progress: Progress) -> float:
    """Runs one converter process with its output into `log`, reporting its stages as they advance; seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reported: dict[str, float] = {}
    env = {**os.environ, **CONVERTER_ENV}
    pipe = subprocess.PIPE
    with (
        log.open("w") as sink,
        subprocess.Popen(list(command), stdout=pipe, stderr=subprocess.STDOUT, text=True, env=env) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            sink.write(line)
            report = status_report(line, reported)
            if report:
                progress(f"{label}: {report}")
        code = process.wait()
    if code != 0:
        raise ConversionError(f"{label}: the converter exited with {code}; its last lines:\n{tail(log)}")
    return time.perf_counter() - started


def status_report(line: str, reported: dict[str, float]) -> str | None:
    """What to show of one converter line: each stage at its start, every further quarter and its end; and
    error lines. `reported` keeps the last completion shown per stage."""
    match = STATUS.search(line)
    if match is None:
        return line.strip() if line.startswith(" ## ") else None
    status = json.loads(match.group(1))
    stage, done = str(status["stage"]), float(status["completion"])
    last = reported.get(stage)
    if last is not None and (last >= 1.0 or (done < last + 0.25 and done < 1.0)):
        return None
    reported[stage] = done
    return f"{stage} {100 * done:.0f}%"


def calibration_perplexity(log: Path) -> float | None:
    """The perplexity the converter reports on its calibration set after quantizing the head (its own check)."""
    found = CALIBRATION_PERPLEXITY.findall(log.read_text(errors="replace")) if log.is_file() else []
    return float(found[-1]) if found else None


def tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- what a checkpoint weighs -------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, Any]:
    """The header of a .safetensors file: tensor name -> dtype, shape and data offsets."""
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header: dict[str, Any] = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def weight_stats(model_dir: Path) -> dict[str, Any]:
    """Stored bytes of every tensor, and the stored bits per weight of the EXL2 linears (codes, scales, group
    map and permutation over in x out weights), decoder and head apart; None where there are none."""
    sizes: dict[str, dict[str, tuple[int, list[int]]]] = {}  # linear or other key -> tensor suffix -> info
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        for name, info in safetensors_header(path).items():
            start, end = info["data_offsets"]
            total += end - start
            key, _, suffix = name.rpartition(".")
            sizes.setdefault(key, {})[suffix] = (end - start, list(info["shape"]))
    parts = {"decoder": [0, 0], "head": [0, 0]}  # [bytes, weights]
    for key, tensors in sizes.items():
        if "q_weight" in tensors:
            part = parts["head" if key.endswith("lm_head") else "decoder"]
            part[0] += sum(size for size, _ in tensors.values())
            part[1] += tensors["q_invperm"][1][0] * tensors["q_weight"][1][1]  # in x out
    stats: dict[str, Any] = {"weight_bytes": total}
    for name, (stored, weights) in parts.items():
        stats[f"{name}_bits_per_weight"] = round(8 * stored / weights, 4) if weights else None
    return stats
