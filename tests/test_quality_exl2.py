"""`bench quality-exl2` on a machine without CUDA: the converter's fp16 input, the measures through the
Backend protocol, the JSON and what travels to the GPU machine. The conversions and the exl2 backend
themselves run in tests/gpu/test_quality_exl2.py."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import BIN, Target
from verispec.backends.torch_ref import TorchRefBackend
from verispec.config import DEFAULT_MODEL, default_cache_dir
from verispec.errors import ModelLoadError
from verispec.models import SMOLLM2, resolve_model
from verispec.tokenizer import Tokenizer
from verispec.tools.bench_quality import windows
from verispec.tools.exl2_convert import (
    CONVERTER_ENV,
    EXPORT_MARKER,
    ConversionError,
    Conversions,
    PointSpec,
    calibration_perplexity,
    export_fp16,
    head_bits_for,
    run_converter,
    safetensors_header,
    status_report,
    weight_stats,
)
from verispec.tools.quality_exl2 import Plan, draft_config, measure
from verispec.tools.quality_exl2_carry import (
    CALL_LIMIT,
    MIB,
    device_commands,
    split_file,
    split_point,
    working_tree_bytes,
)
from verispec.tools.quality_exl2_report import merge_into, plot
from verispec.tools.quality_measures import decode_tokens_per_s, draft_bench, score
from verispec.tools.synth import SHAPES, linear_bytes, synth

ROOT = Path(__file__).resolve().parent.parent
CPU_CURVE = ROOT / "benchmarks" / "quality-cpu-51k.json"
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night."
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model exported for the converter, once for this module."""
    return export_fp16(resolve_model(DEFAULT_MODEL, default_cache_dir()), tmp_path_factory.mktemp("fp16"))


@pytest.fixture(scope="module")
def exported(export_dir: Path) -> TorchRefBackend:
    """The export loaded back by transformers on the CPU, computed in float32."""
    return TorchRefBackend(export_dir, "fp16-export", "cpu", "float32")


# -- the converter's input ------------------------------------------------------------------------


def test_the_export_is_fp16_with_the_rotary_base_where_exllamav2_reads_it(export_dir: Path) -> None:
    """config.json says fp16 and unquantized and repeats rope_parameters' base at the top level (transformers
    5 writes it only nested, and ExLlamaV2 0.3.2 would fall back to 10,000); every tensor of the source is
    there as F16, the tied head included only as the embedding; the tokenizer encodes as the source's."""
    source = resolve_model(DEFAULT_MODEL, default_cache_dir())
    config = json.loads((export_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float16"
    assert "quantization_config" not in config
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    exported = safetensors_header(export_dir / "model.safetensors")
    original = {n: i for p in source.glob("*.safetensors") for n, i in safetensors_header(p).items()}
    assert exported.keys() == original.keys() and "lm_head.weight" not in exported
    assert {info["dtype"] for info in exported.values()} == {"F16"}
    assert all(exported[n]["shape"] == original[n]["shape"] for n in original)
    assert Tokenizer(export_dir).encode(TEXT) == Tokenizer(source).encode(TEXT)
    stamp = (export_dir / "model.safetensors").stat().st_mtime_ns
    export_fp16(source, export_dir)
    assert (export_dir / "model.safetensors").stat().st_mtime_ns == stamp, (
        "a second export of the same source is a no-op"
    )


def test_transformers_loads_the_export_back_with_the_reference_logits_at_fp16_weights(export_dir: Path) -> None:
    """The export's logits are, bit for bit, those of the float32 reference with its weights rounded to fp16;
    against the unrounded reference they differ by a KL far below any quantization point's."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(DEFAULT_MODEL, default_cache_dir())
    model: Any = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    loaded: Any = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32)
    ids = torch.tensor([Tokenizer(export_dir).encode(TEXT)])
    with torch.inference_mode():
        original = model(input_ids=ids).logits[0]
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
        rounded = model(input_ids=ids).logits[0]
        mine = loaded(input_ids=ids).logits[0]
    assert torch.equal(mine, rounded)
    reference = torch.log_softmax(original.float(), -1)
    kl = float((reference.exp() * (reference - torch.log_softmax(mine.float(), -1))).sum(-1).mean())
    assert 0 < kl < 1e-3


# -- measures through the Backend protocol -------------------------------------------------------


def test_scores_are_the_direct_cross_entropy_and_zero_against_themselves(
    reference: Target, exported: TorchRefBackend
) -> None:
    """Perplexity over windows equals exp(cross-entropy) of the model's own logits window by window; a model
    scored against its own log-probabilities has KL 0 and agrees on every position; the fp16 export against
    the float32 reference has a small positive KL."""
    ids = reference.tokenizer.encode(TEXT)
    chunks = windows(ids, len(ids) // 2)
    totals, logprobs = score(reference.backend, chunks, None)
    model = reference.backend.model
    with torch.inference_mode():
        losses = [
            torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([c])).logits[0, :-1].float(), torch.tensor(c[1:]), reduction="sum"
            )
            for c in chunks
        ]
    direct = math.exp(float(sum(losses)) / sum(len(c) - 1 for c in chunks))
    assert totals.summary()["perplexity"] == pytest.approx(direct, rel=1e-4)
    assert len(logprobs) == len(chunks) and logprobs[0].shape == (len(chunks[0]) - 1, reference.backend.info.vocab_size)
    same, _ = score(reference.backend, chunks, logprobs)
    assert same.kl == pytest.approx(0.0, abs=1e-4) and same.top1 == same.count
    fp16, _ = score(exported, chunks, logprobs)
    summary = fp16.summary(totals.summary()["perplexity"])
    assert 0 < summary["kl_divergence"] < 1e-3 and summary["top1_agreement"] >= 0.97


def test_a_draft_of_the_same_weights_keeps_the_greedy_output_and_is_accepted(
    reference: Target, exported: TorchRefBackend
) -> None:
    """The fp16 export drafting for the float32 reference in the engine: OFF, fixed k and AUTO give the same
    greedy tokens, nearly every draft is accepted, and acceptance is reported per position 1..k."""
    prompt = reference.tokenizer.encode(TEXT)[:32]
    result = draft_bench(draft_config(3), reference.backend, reference.tokenizer, exported, [prompt], 12, "self")
    assert result["greedy_outputs_identical"] is True
    assert result["acceptance_rate"] >= 0.8
    assert set(result["acceptance_by_position"]) <= {"1", "2", "3"} and "1" in result["acceptance_by_position"]
    assert result["fixed_k3_speedup"] > 0 and result["auto_speedup"] > 0
    assert decode_tokens_per_s(reference.backend, prompt, 4) > 0


def test_weight_stats_count_every_stored_byte_of_an_exl2_checkpoint(tmp_path: Path) -> None:
    """On `verispec synth`'s tiny 4-bit checkpoint: all tensor bytes, and the linears' stored bits per weight
    as synth's own byte formula gives them (decoder and head apart)."""
    summary = synth("tiny", tmp_path, bits=4, seed=0)
    shape = SHAPES["tiny"]
    linears = [(i, o) for n in range(shape.layers) for _, i, o in shape.linears(n)]
    stats = weight_stats(tmp_path)
    assert stats["weight_bytes"] == summary["bytes"]
    decoder = 8 * sum(linear_bytes(i, o, 4) for i, o in linears) / sum(i * o for i, o in linears)
    assert stats["decoder_bits_per_weight"] == pytest.approx(decoder, abs=1e-4)
    head = 8 * linear_bytes(shape.hidden, shape.vocab, 4) / (shape.hidden * shape.vocab)
    assert stats["head_bits_per_weight"] == pytest.approx(head, abs=1e-4)
    assert 4 < stats["decoder_bits_per_weight"] < 4.5


# -- the converter's command lines and processes --------------------------------------------------


def test_every_point_is_compiled_from_the_one_measurement(tmp_path: Path) -> None:
    """One -om measurement; each point reads it (-m) in a job directory of its own and compiles a full model
    directory of its own, at its bits and head bits and the calibration length asked for."""
    conversions = Conversions(tmp_path, calibration_length=1024)
    measurement = conversions.measurement_command()
    assert measurement[1:3] == ["-m", "exllamav2.conversion.convert_exl2"]
    assert measurement[measurement.index("-om") + 1] == str(tmp_path / "measurement.json")
    points = [PointSpec(b, head_bits_for(b)) for b in (2.5, 6.0, 8.0)]
    assert [p.head_bits for p in points] == [6, 6, 8] and head_bits_for(4.0, 8) == 8
    commands = [conversions.point_command(p) for p in points]
    for point, command in zip(points, commands, strict=True):
        options = command[3:]  # after `python -m exllamav2.conversion.convert_exl2`
        value = {flag: options[options.index(flag) + 1] for flag in ("-m", "-b", "-hb", "-l", "-cf", "-o", "-i")}
        assert value["-m"] == str(conversions.measurement) and value["-i"] == str(conversions.fp16_dir)
        assert (float(value["-b"]), int(value["-hb"]), value["-l"]) == (point.bpw, point.head_bits, "1024")
        assert value["-cf"] == str(conversions.point_dir(point))
    assert len({c[c.index("-o") + 1] for c in [measurement, *commands]}) == 4, "a job directory each"
    assert str(tmp_path) not in conversions.shown(commands[0]) and conversions.shown(commands[0]).startswith(
        "python -m"
    )
    assert not conversions.compiled(points[0]), "an empty directory is no conversion"


def test_status_lines_are_reported_at_each_quarter_and_errors_always() -> None:
    """The converter's `-so` lines (exllamav2/conversion/bot_status.py's format) as progress: a stage when it
    starts, then every quarter of it, its end once; error lines always; other output never."""
    reported: dict[str, float] = {}
    lines = [
        f"[STATUS]{json.dumps({'stage': 'Quantizing', 'completion': c})}[/STATUS]\n"
        for c in (0, 0.1, 0.3, 0.5, 0.55, 1, 1)
    ]
    shown = [status_report(line, reported) for line in lines]
    assert shown == ["Quantizing 0%", None, "Quantizing 30%", None, "Quantizing 55%", "Quantizing 100%", None]
    assert status_report(" ## Error: something\n", reported) == "## Error: something"
    assert status_report(" -- Layer: model.layers.3 (MLP)\n", reported) is None


def test_the_converters_own_calibration_perplexity_is_read_from_its_log(tmp_path: Path) -> None:
    """quantize.py prints it once, after quantizing the head over the calibration set; the last one counts."""
    log = tmp_path / "point.log"
    assert calibration_perplexity(log) is None
    log.write_text(
        " -- Module quantized, rfn_error: 0.001234\n"
        " -- Module quantized, calibration perplexity (quant): 14.2031\n"
        " -- Module quantized, calibration perplexity (quant): 13.9876\n -- Compiling output file...\n"
    )
    assert calibration_perplexity(log) == 13.9876


@pytest.mark.skipif(importlib.util.find_spec("exllamav2") is not None, reason="exllamav2 is installed here")
def test_a_converter_that_cannot_run_raises_with_its_last_lines(tmp_path: Path) -> None:
    """Without exllamav2 the real converter command fails at once: the error carries its own message and the
    log holds everything it printed."""
    conversions = Conversions(tmp_path)
    log = conversions.log("measurement")
    with pytest.raises(ConversionError, match="exllamav2"):
        run_converter("measurement", conversions.measurement_command(), log, lambda _message: None)
    assert "No module named" in log.read_text()


def test_converter_processes_run_with_the_causal_attention_switch(tmp_path: Path) -> None:
    """run_converter starts its process with EXLLAMA_NO_SDPA, ExLlamaV2's own switch to the attention path that
    builds the causal mask (its SDPA path has none outside paged batches without flash-attn), and unbuffered."""
    log = tmp_path / "env.log"
    show = "import os; print(os.environ.get('EXLLAMA_NO_SDPA'), os.environ.get('PYTHONUNBUFFERED'))"
    run_converter("env", [sys.executable, "-c", show], log, lambda _message: None)
    assert log.read_text().split() == [CONVERTER_ENV["EXLLAMA_NO_SDPA"], "1"] == ["1", "1"]


# -- dry run, JSON and plot -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`verispec bench quality-exl2 --dry-run` as a user runs it, on the CPU curve's tokens."""
    work = tmp_path_factory.mktemp("work")
    command = [str(BIN / "verispec"), "bench", "quality-exl2", "--dry-run", "--work-dir", str(work)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    result: dict[str, Any] = json.loads(done.stdout)
    result["stderr"], result["work"] = done.stderr, work
    return result


def test_the_dry_run_exports_and_prints_every_converter_command(dry_run: dict[str, Any]) -> None:
    """Without CUDA or exllamav2: the export is written, the corpus read (>= 50k tokens in windows of 512),
    and the measurement and the six points' command lines printed in full and recorded in the JSON."""
    work = dry_run["work"]
    assert dry_run["status"] == "dry run" and dry_run["gguf_sha256"] == SMOLLM2.gguf_sha256
    assert (work / "fp16" / EXPORT_MARKER).is_file() and (work / "fp16" / "model.safetensors").is_file()
    assert dry_run["corpus"]["tokens_evaluated"] >= 50000 and dry_run["corpus"]["window"] == 512
    converter = dry_run["exl2"]["converter"]
    assert list(converter["point_commands"]) == [f"exl2-{b:.1f}bpw-h{8 if b == 8 else 6}" for b in (2.5, 3, 4, 5, 6, 8)]
    printed = [line for line in dry_run["stderr"].splitlines() if "convert_exl2" in line]
    assert len(printed) == 7 and all(str(work) in line for line in printed)
    assert all("<work>" in c and str(work) not in c for c in converter["point_commands"].values())
    assert dry_run["exl2"]["reference"]["weight_bytes"] == weight_stats(work / "fp16")["weight_bytes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_measuring_without_cuda_says_so_before_any_work(tmp_path: Path) -> None:
    """Past the dry run the command needs a GPU: it says so (the CLI exits 1 with it) and converts nothing."""
    plan = Plan(DEFAULT_MODEL, tmp_path, Conversions(tmp_path), [PointSpec(4.0, 6)])
    with pytest.raises(ModelLoadError, match="CUDA"):
        measure(plan, argparse.Namespace(jobs=0), {"exl2": {}}, lambda _message: None)
    assert list(tmp_path.iterdir()) == []


def test_the_module_imports_without_torch_or_exllamav2() -> None:
    """Building the CLI's parser imports the tool, and neither torch nor exllamav2 with it."""
    code = "import sys, verispec.tools.quality_exl2; print(sorted({'torch', 'exllamav2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_run_merges_into_the_cpu_curve_only_on_the_same_tokens(dry_run: dict[str, Any], tmp_path: Path) -> None:
    """The "exl2" section lands in a copy of the committed CPU curve, whose points stay as they were; a run
    over other tokens is refused with what differs."""
    curve = tmp_path / "quality.json"
    curve.write_text(CPU_CURVE.read_text())
    result = {k: v for k, v in dry_run.items() if k not in ("stderr", "work")}
    merge_into(curve, result)
    merged = json.loads(curve.read_text())
    assert merged["exl2"] == result["exl2"]
    assert merged["points"] == json.loads(CPU_CURVE.read_text())["points"]
    other = {**result, "corpus": {**result["corpus"], "tokens_evaluated": 4096}}
    with pytest.raises(ValueError, match="tokens_evaluated"):
        merge_into(curve, other)


def test_the_plot_draws_points_drafts_and_the_cpu_curve(dry_run: dict[str, Any], tmp_path: Path) -> None:
    """A PNG from a run's JSON: here rows carrying the CPU curve's own measured numbers, one of them with its
    draft run, beside the CPU curve itself."""
    cpu = json.loads(CPU_CURVE.read_text())
    rows = [{**p, "decoder_bits_per_weight": p["bits_per_weight"]} for p in cpu["points"] if p["group_size"] == 128]
    result = {**dry_run, "exl2": {**dry_run["exl2"], "points": rows}}
    result["exl2"]["reference"] = {**result["exl2"]["reference"], "perplexity": cpu["reference"]["perplexity"]}
    assert any("as_draft" in row for row in rows)
    path = tmp_path / "curve.png"
    plot(result, path, cpu)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- what travels to the GPU machine ------------------------------------------------------------------


def test_the_gguf_parts_join_to_the_file_and_each_call_fits(tmp_path: Path) -> None:
    """Split anywhere, the two parts concatenate to the original and the digest is the whole file's; the split
    point keeps both calls under the limit with the rest they carry, and says so when nothing can."""
    source = tmp_path / "model.gguf"
    source.write_bytes(os.urandom(3 * MIB + 12345))
    first, second = tmp_path / "a.part1", tmp_path / "b.part2"
    digest = split_file(source, MIB + 7, first, second)
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()
    assert first.stat().st_size == MIB + 7 and first.read_bytes() + second.read_bytes() == source.read_bytes()
    size, tree = SMOLLM2_GGUF_BYTES, working_tree_bytes(ROOT)
    assert 0 < tree < CALL_LIMIT // 4
    one, two = tree + 19 * MIB, tree + 2 * MIB  # wheels, extension and part 1; corpus and part 2
    cut = split_point(size, one, two)
    assert one + cut <= CALL_LIMIT - 2 * MIB and two + size - cut <= CALL_LIMIT - 2 * MIB
    assert abs((one + cut) - (two + size - cut)) <= 1
    with pytest.raises(ModelLoadError, match="do not fit"):
        split_point(size, 40 * MIB, 40 * MIB)


SMOLLM2_GGUF_BYTES = 98_362_432  # SmolLM2-135M-Instruct.Q4_1.gguf (sha256 in verispec.models.SMOLLM2)


def test_the_device_commands_fit_the_device_and_name_what_they_carry() -> None:
    """Each command is within the device tool's 2,000 characters, the first installs the carried wheels
    without an index, the second joins and checks the GGUF before the run, and neither names this checkout."""
    gguf = Path(SMOLLM2.member).name
    call1, call2 = device_commands(".gpu-quality/call1", ".gpu-quality/call2", gguf, SMOLLM2.gguf_sha256, "c.tar.gz")
    assert max(len(call1), len(call2)) <= 2000
    assert "--no-index --no-deps --target" in call1 and f".gpu-quality/call1/{gguf}.part1" in call1
    assert f".gpu-quality/call2/{gguf}.part2" in call2 and SMOLLM2.gguf_sha256 in call2
    assert call2.index("sha256sum -c") < call2.index("bench quality-exl2")
    assert str(ROOT) not in call1 + call2
