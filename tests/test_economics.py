"""Inference economics: the capacity planner, the cost per token (formula, meter, live server) and the
quality benchmark's measures against direct computations."""

from __future__ import annotations

import json
import math
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, ServerFactory, Target, free_port
from verispec.backends.exl2 import plan_split
from verispec.config import CostConfig, config_from_argv
from verispec.cost import PROFILES, CostMeter, PriceProfile, cost_per_million, load_profile, profile_from_config
from verispec.errors import ConfigError
from verispec.tools import plan as planner
from verispec.tools.bench_cost import price_points
from verispec.tools.bench_quality import perplexity, quantized_linear_bytes, rtn, window_stats, windows
from verispec.tools.synth import SHAPES, layer_bytes, linear_bytes, synth
from verispec_proto.v1 import generation_pb2 as pb

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
GIB = 1024**3

# -- planner ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_planner_weights_equal_the_synthetic_checkpoints_tensor_bytes(tmp_path: Path, bits: int) -> None:
    """The tiny shape written by `verispec synth`: per layer, head and embedding, byte for byte."""
    summary = synth("tiny", tmp_path, bits=bits, seed=0)
    from_shape = planner.shape_sizes("tiny", SHAPES["tiny"], float(bits))
    from_checkpoint = planner.checkpoint_sizes(tmp_path)
    assert from_checkpoint.layer_bytes == from_shape.layer_bytes
    assert (from_checkpoint.head_bytes, from_checkpoint.embedding_bytes) == (
        from_shape.head_bytes,
        from_shape.embedding_bytes,
    )
    assert from_shape.total_bytes == summary["bytes"]
    assert planner.model_sizes(str(tmp_path), None).bits == bits, "the checkpoint's own bits are read"


@pytest.mark.parametrize("shape", ["llama-70b", "llama-8b", "llama-1b"])
def test_planner_weights_equal_synth_tables_for_the_real_shapes(shape: str) -> None:
    """The large shapes are not written in CI; their bytes come from the tables synth writes them by."""
    sizes = planner.shape_sizes(shape, SHAPES[shape], 4.0)
    assert list(sizes.layer_bytes) == layer_bytes(SHAPES[shape], 4)
    s = SHAPES[shape]
    assert sizes.head_bytes == linear_bytes(s.hidden, s.vocab, 4) + s.hidden * 2


def test_planner_split_agrees_with_the_backends_split_check() -> None:
    """The --gpu-split the planner prints places the layers, under plan_split, where the plan put them."""
    target = planner.model_sizes("llama-70b", 4.0)
    result = planner.plan(target, planner.parse_gpus("2x24"), 8192, 2, "q4", planner.model_sizes("llama-1b", 4.0))
    assert result["fits"]
    placement = plan_split(list(target.layer_bytes), target.head_bytes + target.embedding_bytes, result["gpu_split"])
    for row in result["per_gpu"]:
        start, end = row["layers"]
        assert placement[start:end] == [row["gpu"]] * (end - start)
    assert len(placement) == 80


def test_a_plan_that_cannot_fit_names_the_gpu_and_the_shortfall() -> None:
    """70B at fp16 on two 24 GiB cards: the layers that do not fit would go to GPU 1, which is short by
    their bytes (weights and KV cache) less what it has free; layers do not split, so GPU 0's remainder
    does not count."""
    target = planner.model_sizes("llama-70b", 16.0)
    result = planner.plan(target, planner.parse_gpus("2xrtx4090"), 8192, 1, "q4")
    assert result["fits"] is False
    placed = sum(r["num_layers"] for r in result["per_gpu"])
    kv_layer = planner.kv_bytes_per_layer(target.shape, 8192, "q4")
    missing = sum(target.layer_bytes[placed:]) + kv_layer * (80 - placed)
    expected = missing / GIB - result["per_gpu"][1]["free_gib"]
    assert result["shortfall"]["gpu"] == 1 and result["shortfall"]["name"] == "rtx4090"
    assert result["shortfall"]["gib"] == pytest.approx(expected, abs=0.05)
    assert "GPU 1 (rtx4090, 24 GiB) is short by" in result["message"]
    assert result["max_sequences"] == 0


def test_plan_estimates_match_the_measured_loads() -> None:
    """The committed H200 runs: 37.0 GiB for the 70B shape at 4.0 bpw with an 8k fp16 cache (the
    backend's own delta, no CUDA context), and 19.3 / 19.6 GiB per GPU under --gpu-split 17.5,19 with
    a q4 cache and the 1B draft on GPU 0 (everything in use)."""
    one = json.loads((BENCHMARKS / "exl2-70b-h200.json").read_text())
    two = json.loads((BENCHMARKS / "exl2-70b-2x-split-q4.json").read_text())
    target, draft = planner.model_sizes("llama-70b", 4.0), planner.model_sizes("llama-1b", 4.0)
    single = planner.plan(target, planner.parse_gpus("h200"), 8192, 1, "fp16")["per_gpu"][0]
    assert single["used_gib"] - planner.CUDA_CONTEXT_GIB == pytest.approx(one["target_vram_gib"], rel=0.03)
    split = planner.plan(target, planner.parse_gpus("2xh200"), 8192, 1, "q4", draft, two["gpu_split"]["target"])
    for row, measured in zip(split["per_gpu"], two["used_gib_per_gpu_after_engine_runs"], strict=True):
        assert row["used_gib"] == pytest.approx(measured, rel=0.05)


def test_plan_cli_prints_one_json_object_and_compare_covers_every_width() -> None:
    command = [str(BIN / "verispec"), "plan", "--model", "llama-70b", "--bits", "4.0", "--gpus", "2x24"]
    command += ["--context", "8192", "--cache-mode", "q4"]
    result = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    assert result["fits"] is True and len(result["per_gpu"]) == 2 and result["max_sequences"] >= 1
    compare = subprocess.run([*command, "--compare"], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in compare.splitlines()[2:] if line.split()[0] in "fp16 8 6 5 4 3"] == [
        "fp16",
        "8",
        "6",
        "5",
        "4",
        "3",
    ]
    refused = subprocess.run(
        [str(BIN / "verispec"), "plan", "--model", "llama-70b", "--bits", "16", "--gpus", "2x24"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 3 and "does not fit: GPU 1" in refused.stdout


# -- cost per token --------------------------------------------------------------------------------


def test_cost_follows_the_formula_on_a_fixed_throughput() -> None:
    """$3.60 an hour at 100 tokens/s, always busy: 360,000 tokens an hour, $10 per million."""
    assert cost_per_million(3.6, 100.0, 1.0) == pytest.approx(10.0)
    assert cost_per_million(3.6, 100.0, 0.5) == pytest.approx(20.0)
    assert cost_per_million(3.6, 0.0) is None
    onprem = PriceProfile("box", 2, "rtx4090", purchase_usd=7300.0, amortization_months=10, watts=1000, kwh_usd=0.2)
    assert onprem.hourly_usd == pytest.approx(7300 / 7300 + 0.2)
    assert PROFILES["2x-a100-80g-cloud"].hourly_usd == pytest.approx(3.6)


def test_cost_meter_prices_the_window_it_measured() -> None:
    """600 tokens in 3 busy seconds of a 10 s window: 200 tokens/s busy, utilisation 0.3 measured, and
    the cost equals the window's actual spend per token; an assumed utilisation replaces the measured one."""
    profile = PriceProfile("test", 1, gpu_hour_usd=3.6)
    meter = CostMeter(profile, window_s=10.0)
    start = meter.started
    meter.record_tokens(50, now=start - 100)  # before the window: forgotten
    for i in range(3):
        meter.record_tokens(200, now=start + 11 + i)
        meter.record_busy(1.0, now=start + 11 + i)
    snapshot = meter.snapshot(now=start + 20)
    assert snapshot is not None
    assert snapshot.tokens_per_s == pytest.approx(200.0) and snapshot.utilization == pytest.approx(0.3)
    window_spend = 3.6 / 3600 * 10
    assert snapshot.usd_per_million_tokens == pytest.approx(window_spend / 600 * 1e6)
    assumed = CostMeter(profile, window_s=10.0, utilization=0.6)
    assumed.record_tokens(600, now=assumed.started + 15)
    assumed.record_busy(3.0, now=assumed.started + 15)
    snap = assumed.snapshot(now=assumed.started + 20)
    assert snap is not None and snap.usd_per_million_tokens == pytest.approx(cost_per_million(3.6, 200.0, 0.6))
    assert CostMeter(None).snapshot() is None


def test_cost_profile_from_flags_or_a_file(tmp_path: Path) -> None:
    config = config_from_argv(["--cost-gpu-hour-usd", "2.5", "--cost-gpus", "2", "--cost-window", "30"])
    profile = profile_from_config(config.cost)
    assert profile is not None and profile.hourly_usd == pytest.approx(5.0) and config.cost.window_s == 30
    assert profile_from_config(CostConfig()) is None
    path = tmp_path / "rack.json"
    path.write_text(json.dumps({"purchase_usd": 14600, "amortization_months": 20, "hardware": "a100-80g"}))
    assert load_profile(str(path)).hourly_usd == pytest.approx(1.0)
    path.write_text(json.dumps({"price": 1}))
    with pytest.raises(ConfigError, match="unknown fields price"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="--cost-profile"):
        config_from_argv(["--cost-profile", "2x-a100-80g-cloud", "--cost-gpu-hour-usd", "1"])
    with pytest.raises(ConfigError, match="--cost-utilization"):
        config_from_argv(["--cost-utilization", "1.5"])


def test_health_and_metrics_report_the_live_cost(make_server: ServerFactory) -> None:
    """Generated tokens are priced through the real server: Health's fields satisfy the formula and
    the Prometheus gauge carries the same profile."""
    metrics_port = free_port()
    running = make_server("--cost-profile", "2x-a100-80g-cloud", "--metrics-port", str(metrics_port))
    running.stub.Generate(pb.GenerateRequest(prompt="The capital of France is", max_new_tokens=8), timeout=120)
    health = running.stub.Health(pb.HealthRequest(), timeout=30)
    assert health.cost_profile == "2x-a100-80g-cloud" and health.cost_hourly_usd == pytest.approx(3.6)
    assert health.cost_tokens_per_second > 0 and 0 < health.cost_utilization <= 1
    expected = cost_per_million(health.cost_hourly_usd, health.cost_tokens_per_second, health.cost_utilization)
    assert health.cost_usd_per_million_tokens == pytest.approx(expected)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert 'verispec_cost_usd_per_million_tokens{profile="2x-a100-80g-cloud"}' in text
    assert 'verispec_cost_hourly_usd{profile="2x-a100-80g-cloud"} 3.6' in text


def test_health_without_a_price_profile_says_so(make_server: ServerFactory) -> None:
    health = make_server().stub.Health(pb.HealthRequest(), timeout=30)
    assert health.cost_usd_per_million_tokens == -1.0 and health.cost_profile == ""


def test_bench_cost_prices_measured_and_projected_points() -> None:
    """The committed H200 sweep: priced as measured on the H200 profile, projected by bandwidth on the
    others, and never priced with the CPU profile."""
    batch = json.loads((BENCHMARKS / "batch-exl2-70b-h200.json").read_text())
    profiles = [PROFILES[name] for name in ("1x-h200-cloud", "2x-a100-80g-cloud", "cpu-2vcpu-cloud")]
    priced = price_points(batch, profiles, 1.0, 0.9, measured_on="h200")
    assert priced["profiles"]["1x-h200-cloud"]["throughput"] == "measured"
    assert priced["profiles"]["2x-a100-80g-cloud"]["throughput"].startswith("projected from h200")
    assert "cpu-2vcpu-cloud" not in priced["profiles"]
    first = priced["points"][0]
    assert first["1x-h200-cloud"] == pytest.approx(3.5 / (first["tokens_per_s"] * 3600) * 1e6, rel=1e-3)


# -- quality benchmark -----------------------------------------------------------------------------


def test_quality_perplexity_equals_a_direct_torch_computation(target: Target) -> None:
    """On a short text, the benchmark's perplexity (its hidden-state and head path, windows) equals
    exp(cross-entropy) of the reference model's own logits."""
    model = target.backend.model
    ids = target.tokenizer.encode(
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
        "and darkness was upon the face of the deep."
    )
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        direct = math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))
    assert perplexity(model, ids, window=len(ids)) == pytest.approx(direct, rel=1e-4)
    half = len(ids) // 2
    assert len(windows(ids, half)) == 2, "two full windows, the tail dropped"
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
    same = window_stats(model, hidden, [ids], hidden)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == same["count"]


def test_rtn_is_round_to_nearest_on_the_groups_grid() -> None:
    """Each group holds at most 2^bits values, its extremes are kept (to fp16), and the error of a
    weight is at most half a step; a short last group (576 = 4 x 128 + 64) is its own group."""
    weight = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    for bits, group in ((8, 32), (4, 128), (3, 64)):
        out = rtn(weight, bits, group)
        starts = list(range(0, 576, group))
        for start in starts:
            block, original = out[:, start : start + group], weight[:, start : start + group]
            step = (original.amax(1) - original.amin(1)) / ((1 << bits) - 1)
            assert all(len(torch.unique(row)) <= 1 << bits for row in block)
            assert bool(((block - original).abs() <= step[:, None] * 0.5 + 2e-3).all())
    assert quantized_linear_bytes(576, 1536, 4, 128) == 576 * 1536 // 2 + 5 * 1536 * 4
