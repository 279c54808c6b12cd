"""`verispec bench batch`: the load sweep through the real server, its latency arithmetic and its flags."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import _STARTUP_SCRIPT, HEAVY, HEAVY_OURS
from verispec.tools.bench_batch import POLICIES
from verispec.tools.bench_batch_clients import PASS_LOG, BatchCounts, StreamResult, pass_summary, token_latencies
from verispec.tools.bench_batch_probe import long_prompt_started, passes_to_first_token

BENCH = [sys.executable, "-m", "verispec", "bench", "batch"]


def test_a_gap_is_shared_by_the_tokens_of_the_message_that_ends_it() -> None:
    """TTFT is the first message that carries tokens; a 3-token message after a 0.3 s gap is 3 x 0.1 s."""
    ttft, samples = token_latencies([0.05, 0.2, 0.3, 0.6, 0.6], [0, 1, 1, 3, 0])
    assert ttft == 0.2
    assert [round(s, 6) for s in samples] == [0.1, 0.1, 0.1, 0.1]
    assert token_latencies([0.1], [0]) == (None, [])


def test_the_pass_log_keeps_the_last_passes_in_order_and_summarises_a_window() -> None:
    counts = BatchCounts()
    for i in range(PASS_LOG + 3):
        counts.on_batch(8, 8 + i, 0.001 * (i + 1))
    assert counts.snapshot() == (PASS_LOG + 3, 8 * (PASS_LOG + 3))
    assert len(counts.passes(0)) == PASS_LOG  # older passes are overwritten
    assert counts.passes(PASS_LOG + 1) == [(8, 8 + PASS_LOG + 1, PASS_LOG + 2.0), (8, 8 + PASS_LOG + 2, PASS_LOG + 3.0)]
    summary = pass_summary(counts.passes(PASS_LOG))
    assert summary["passes"] == 3 and summary["tokens"] == {
        "median": 8 + PASS_LOG + 1,
        "min": 8 + PASS_LOG,
        "max": 8 + PASS_LOG + 2,
    }
    assert pass_summary([]) == {"passes": 0}


def test_a_probe_counts_the_passes_that_ended_between_its_call_and_its_first_token() -> None:
    """Pass ends are logged on the clock the client reads: a probe called at 1.0 s whose first token came at
    1.1 s saw the passes that ended at 1.02 and 1.09 (the one in flight and its own), not those around them;
    a probe with no first token is left out."""
    counts = BatchCounts()
    before = time.perf_counter()
    counts.on_batch(8, 8, 0.02)
    ends = counts.pass_ends(0)
    assert len(ends) == 1 and before <= ends[0] <= time.perf_counter()
    probe = StreamResult(ttft_s=0.1, first_token_at=1.1)
    assert passes_to_first_token([probe, StreamResult()], [0.95, 1.02, 1.09, 1.13]) == [2]


def test_the_long_prompt_is_seen_starting_by_its_sequence_however_small_its_chunk() -> None:
    """Behind 8 decoding streams, the long prompt's first chunk is the first pass of 9 sequences, even of
    one token (a pass that looks like a decode), or a pass of more tokens than sequences."""
    decodes = [(8, 8, 20.0)] * 3
    assert not long_prompt_started(decodes, background=8)
    assert long_prompt_started([*decodes, (9, 9, 21.0)], background=8)
    assert long_prompt_started([*decodes, (9, 24, 38.0)], background=8)
    assert long_prompt_started([(1, 16, 5.0)], background=0)
    assert not long_prompt_started([], background=8)


def test_help_imports_nothing_heavy() -> None:
    """`bench batch --help` builds its parser without torch, grpc or the engine."""
    script = _STARTUP_SCRIPT.format(argvs=[["bench", "batch", "--help"]])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--concurrency" in result.stdout and "--long-prompt-tokens" in result.stdout
    loaded = json.loads(result.stdout.splitlines()[-1])
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY + HEAVY_OURS)]
    assert heavy == [] and not [m for m in loaded if m.startswith("verispec.tools.bench_batch")], heavy


def test_bad_flags_are_refused_before_loading() -> None:
    for flags, named in ((["--repeats", "0"], "--repeats"), (["--concurrency", "1,x"], "--concurrency")):
        result = subprocess.run([*BENCH, *flags], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2 and named in result.stderr, result.stderr[-500:]


def test_sweep_measures_every_point_and_every_stream_gets_exactly_its_tokens(tmp_path: Path) -> None:
    """A tiny sweep through the real gRPC server on the embedded model: 2 policies x 2 modes x 2
    concurrencies, the TTFT probe with a short long prompt, JSON on stdout and in --output, a PNG."""
    output, plot = tmp_path / "batch.json", tmp_path / "batch.png"
    flags = ["--concurrency", "1,2", "--max-new-tokens", "8", "--repeats", "1", "--long-prompt-tokens", "600"]
    flags += ["--probe-samples", "2"]
    result = subprocess.run(
        [*BENCH, *flags, "--output", str(output), "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[bench] " in result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(output.read_text())
    assert report["every_stream_exact"], report["stream_problems"]
    assert report["raw_batch"] is None, "the raw ExLlamaV2 ceiling is measured on exl2 only"
    points = {(p["policy"], p["mode"], p["concurrency"]): p for p in report["points"]}
    assert set(points) == {(p, m, c) for p in POLICIES for m in ("off", "auto") for c in (1, 2)}
    for point in points.values():
        assert point["tokens_per_s"]["min"] <= point["tokens_per_s"]["median"] <= point["tokens_per_s"]["max"]
        assert point["tokens_per_s"]["median"] > 0 and point["ttft_ms_p50"]["median"] > 0
        assert point["itl_ms_p50"]["median"] <= point["itl_ms_p99"]["median"]
    assert points[("round_robin", "off", 2)]["mean_batch_size"]["median"] == 1.0, "round robin: one per pass"
    ratios = report["ratios"]
    assert ratios["batched_8_over_1"] == {"off": None, "auto": None}, "no 8-stream point in this sweep"
    for table in (ratios["batched_over_round_robin"], ratios["auto_over_off"]):
        assert all(isinstance(value, float) for row in table.values() for value in row.values())
    probe = report["ttft_probe"]
    assert probe["streams_not_exact"] == 0
    assert probe["under_load_runs"][0]["background_decoding_at_last_probe_token"] == 8
    assert probe["idle_ttft_ms"]["samples"] == probe["under_load_ttft_ms"]["samples"] == 2
    assert probe["long_prefill_runs"][0]["long_prompt_tokens"] >= 550
    # A short request overtakes the long prefill: its first token comes while the long prompt is pending.
    assert probe["long_prefill_ttft_ms"]["samples"] >= 1, probe["long_prefill_runs"]
    for name in ("under_load", "long_prefill"):
        assert ratios[f"ttft_{name}_p99_over_idle"] >= ratios[f"ttft_{name}_p50_over_idle"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_a_run_that_fails_part_way_reports_what_it_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """When a later engine cannot be built (on one H100, the third of a 3-repeat run once found its KV pool
    out of pages), the rounds already measured are reported, marked with the error and the repeats
    completed, and the command exits 1 rather than losing minutes of measurements."""
    from verispec.cli import _parser
    from verispec.kv.pages import OutOfPagesError
    from verispec.tools import bench, bench_batch

    built = 0
    real_serving = bench_batch.serving

    def serving(*args: Any, **kwargs: Any) -> Any:
        nonlocal built
        built += 1
        if built == 3:  # repeat 2's first engine
            raise OutOfPagesError("6 pages needed, 2 free of 6")
        return real_serving(*args, **kwargs)

    monkeypatch.setattr(bench_batch, "serving", serving)
    output = tmp_path / "batch.json"
    flags = ["--concurrency", "1", "--max-new-tokens", "4", "--repeats", "2", "--no-ttft-probe"]
    assert bench.run_bench(_parser().parse_args(["bench", "batch", *flags, "--output", str(output)])) == 1
    report = json.loads(output.read_text())
    assert report["error"] == "OutOfPagesError: 6 pages needed, 2 free of 6"
    assert report["repeats_completed"] == 1
    points = {(p["policy"], p["mode"]): p for p in report["points"]}
    assert set(points) == {(p, m) for p in POLICIES for m in ("off", "auto")}, "repeat 1 of each policy is there"
    assert report["every_stream_exact"], report["stream_problems"]
