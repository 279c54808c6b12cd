"""`verispec bench cost`: $ per 1M generated tokens at each load point, per hardware price profile.

Throughput comes from a load sweep (`verispec bench batch`: concurrency 1..16, speculation OFF vs AUTO),
run now on this machine or read from bench batch JSON files (`--from`, e.g. the committed H200 run).
Each point is priced with cost.cost_per_million for every profile. A profile prices what was measured
when its hardware is the measured device; a GPU profile next to a measurement on another GPU is
projected by the ratio of memory bandwidths (decode reads every weight once per pass, so it is
bandwidth-bound; a layer split over several cards runs them one after the other, so their bandwidths do
not add) and says so; CPU measurements are priced with CPU profiles only. An API price is printed beside.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verispec.cost import PROFILES, PriceProfile, cost_per_million, load_profile
from verispec.tools.common import concurrency_list

DEFAULT_PROFILES = ",".join(PROFILES)


def add_cost_arguments(kinds: Any) -> None:
    cost = kinds.add_parser(
        "cost",
        help="$ per 1M generated tokens against load, OFF vs AUTO, per hardware price profile",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cost.add_argument(
        "--from",
        dest="sources",
        type=Path,
        action="append",
        default=[],
        help="bench batch JSON to price (repeatable); without it, a sweep runs now on this machine",
    )
    cost.add_argument(
        "--measured-on",
        default="",
        help="the hardware of the --from files when their device field does not name it (e.g. h200 for cuda:0)",
    )
    cost.add_argument("--model", default=None, help="target model of the sweep run now (default: embedded)")
    cost.add_argument("--draft-model", default="", help="draft model of the sweep's AUTO points")
    cost.add_argument("--concurrency", default="1,2,4,8,16", help="streams per point of the sweep run now")
    cost.add_argument("--max-new-tokens", type=int, default=32, help="tokens every stream generates")
    cost.add_argument("--repeats", type=int, default=1, help="rounds of every point of the sweep run now")
    cost.add_argument(
        "--profiles", default=DEFAULT_PROFILES, help="built-in profile names or JSON files, comma-separated"
    )
    cost.add_argument(
        "--utilization", type=float, default=1.0, help="share of paid hours spent generating at that load"
    )
    cost.add_argument(
        "--api-usd-per-million", type=float, default=0.90, help="an API's price per 1M output tokens, for comparison"
    )
    cost.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    cost.add_argument("--plot", type=Path, default=None, help="PNG of $ per 1M tokens against concurrency")


def device_kind(device: str) -> str:
    """A bench JSON's device field ('cpu', 'NVIDIA H200', 'cuda:0') as a GPU name of the planner, or 'cpu'."""
    from verispec.tools.plan import GPUS

    lowered = device.lower().replace(" ", "")
    if lowered.startswith("cpu"):
        return "cpu"
    for name in sorted(GPUS, key=len, reverse=True):
        if name.split("-")[0] in lowered:
            return name
    return lowered


def throughput_scale(profile: PriceProfile, measured: str) -> tuple[float, str] | None:
    """(factor on measured tokens/s, basis) for pricing `measured` with `profile`; None when it does not apply."""
    from verispec.tools.plan import GPUS

    if profile.hardware in ("", measured):
        return 1.0, "measured"
    if "cpu" in (profile.hardware, measured) or profile.hardware not in GPUS or measured not in GPUS:
        return None
    factor = GPUS[profile.hardware].bandwidth_tbs / GPUS[measured].bandwidth_tbs
    return factor, f"projected from {measured} by memory bandwidth x{factor:.3f}"


def price_points(
    batch: dict[str, Any], profiles: list[PriceProfile], utilization: float, api_usd: float, measured_on: str = ""
) -> dict[str, Any]:
    """The batched points of one bench batch result, priced with every profile that applies."""
    from verispec.tools.plan import GPUS

    measured = device_kind(str(batch.get("device", "cpu")))
    if measured_on and measured != "cpu" and measured not in GPUS:  # e.g. "cuda:0": the flag names it
        measured = measured_on
    measures = [
        (str(p["mode"]), int(p["concurrency"]), float(p["tokens_per_s"]["median"]))
        for p in batch["points"]
        if p.get("policy", "batched") == "batched" and p.get("tokens_per_s")
    ]
    raw = (batch.get("raw_batch") or {}).get("tokens_per_s") or {}  # ExLlamaV2's own batch: the ceiling
    measures += [("raw_ceiling", int(size), float(tps)) for size, tps in raw.items()]
    rows = []
    for mode, concurrency, tps in measures:
        row: dict[str, Any] = {"mode": mode, "concurrency": concurrency, "tokens_per_s": tps}
        for profile in profiles:
            scale = throughput_scale(profile, measured)
            if scale is None:
                continue
            usd = cost_per_million(profile.hourly_usd, tps * scale[0], utilization)
            row[profile.name] = round(usd, 4) if usd is not None else None
        rows.append(row)
    bases = {}
    for profile in profiles:
        scale = throughput_scale(profile, measured)
        if scale is not None:
            bases[profile.name] = {"hourly_usd": round(profile.hourly_usd, 4), "throughput": scale[1]}
    return {
        "model": batch.get("model"),
        "device": batch.get("device"),
        "measured_on": measured,
        "drafter": batch.get("drafter"),
        "max_new_tokens": batch.get("max_new_tokens"),
        "profiles": bases,
        "points": rows,
        "api_usd_per_million": api_usd,
    }


def run_cost(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    from verispec.errors import ConfigError

    if not 0 < args.utilization <= 1:
        raise ConfigError("--utilization", f"must be in (0, 1], got {args.utilization}")
    profiles = [load_profile(name.strip()) for name in args.profiles.split(",") if name.strip()]
    sources = [(str(p), json.loads(p.read_text()), args.measured_on) for p in args.sources]
    if not sources:
        sources.append(("this run", _sweep(args, progress), ""))
    result: dict[str, Any] = {
        "benchmark": "cost",
        "formula": "$/1M tokens = hourly $ / (tokens/s x 3600 x utilization) x 1e6",
        "utilization": args.utilization,
        "api_usd_per_million": args.api_usd_per_million,
        "profiles": {
            p.name: {"hardware": p.hardware, "hourly_usd": round(p.hourly_usd, 4), **_price_terms(p)} for p in profiles
        },
        "measurements": [
            {"source": name, **price_points(batch, profiles, args.utilization, args.api_usd_per_million, measured_on)}
            for name, batch, measured_on in sources
        ],
    }
    if args.plot is not None:
        plot_cost(result, args.plot)
        result["plot"] = str(args.plot)
    return result


def _price_terms(profile: PriceProfile) -> dict[str, float]:
    """The inputs of the profile's hourly price that it sets."""
    terms: dict[str, float] = {"num_gpus": profile.num_gpus}
    if profile.gpu_hour_usd:
        terms["gpu_hour_usd"] = profile.gpu_hour_usd
    if profile.purchase_usd:
        terms |= {"purchase_usd": profile.purchase_usd, "amortization_months": profile.amortization_months}
    if profile.watts:
        terms |= {"watts": profile.watts, "kwh_usd": profile.kwh_usd}
    return terms


def _sweep(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """A bench batch sweep on this machine (no TTFT probe)."""
    from verispec.tools.bench_batch import run_batch

    batch_args = argparse.Namespace(
        model=args.model,
        backend="torch_ref",
        draft_model=args.draft_model,
        concurrency=concurrency_list(args.concurrency),
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        max_batch_tokens=0,
        long_prompt_tokens=0,
        probe_samples=1,
        no_ttft_probe=True,
        output=None,
        plot=None,
    )
    return run_batch(batch_args, progress)


def plot_cost(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5.5))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for measurement in result["measurements"]:
        model = Path(str(measurement["model"])).name
        for name, basis in measurement["profiles"].items():
            color = next(colors)
            projected = "" if basis["throughput"] == "measured" else " (projected)"
            for mode, style in (("off", "-"), ("auto", "--"), ("raw_ceiling", ":")):
                rows = [r for r in measurement["points"] if r["mode"] == mode and r.get(name) is not None]
                if rows:
                    label = f"{name}{projected}, {model}, {mode.upper()}"
                    x, y = [r["concurrency"] for r in rows], [r[name] for r in rows]
                    axis.plot(x, y, style, color=color, marker="o", markersize=4, label=label)
    axis.axhline(result["api_usd_per_million"], color="black", linestyle=":", label="API price (assumed)")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel(f"$ per 1M generated tokens (utilisation {result['utilization']:g})")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.set_title("$ per 1M tokens against load (OFF solid, AUTO dashed, raw ceiling dotted)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
