"""The report of `bench quality-exl2`: its points written into the CPU curve's JSON, and the plot of both.

The JSON of `verispec bench quality` keeps a place for the GPU points under "exl2"; `merge_into` fills it
only when both runs read the same tokens of the same corpus file. The plot draws perplexity and KL against
stored bits per weight, the CPU curve's round-to-nearest points beside the EXL2 ones when given, and the
points as draft models when they were measured so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def merge_into(path: Path, result: dict[str, Any]) -> None:
    """Writes the run's "exl2" section into a `bench quality` JSON measured on the same tokens."""
    cpu = json.loads(path.read_text())
    if cpu.get("benchmark") != "quality":
        raise ValueError(f"{path} is not the JSON of `verispec bench quality`")
    mine, theirs = result["corpus"], cpu["corpus"]
    same = ("file_sha256", "tokens_evaluated", "window")
    if any(mine[key] != theirs[key] for key in same):
        raise ValueError(
            f"{path} was measured on other tokens: "
            + ", ".join(f"{key} {theirs[key]} here, {mine[key]} in the run" for key in same if mine[key] != theirs[key])
        )
    cpu["exl2"] = result["exl2"]
    path.write_text(json.dumps(cpu, indent=2) + "\n")


def plot(result: dict[str, Any], path: Path, cpu: dict[str, Any] | None = None) -> None:
    """Perplexity and KL against stored bits per weight (and, when measured, the points as drafts); the CPU
    curve's round-to-nearest points beside them when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from verispec.tools.bench_quality import KL_FLOOR

    points = [p for p in result["exl2"]["points"] if "perplexity" in p]
    drafts = [p for p in points if "as_draft" in p]
    figure, axes = plt.subplots(1, 3 if drafts else 2, figsize=(16 if drafts else 11, 4))
    bpw = [p["decoder_bits_per_weight"] for p in points]
    axes[0].plot(bpw, [p["perplexity"] for p in points], marker="o", label="EXL2 (ExLlamaV2's converter)")
    axes[1].plot(bpw, [max(p["kl_divergence"], KL_FLOOR) for p in points], marker="o", label="EXL2")
    for group_size in sorted({p["group_size"] for p in (cpu or {}).get("points", [])}):
        rows = sorted((p for p in (cpu or {})["points"] if p["group_size"] == group_size), key=lambda p: p["bits"])
        style = {"linestyle": ":", "marker": ".", "alpha": 0.6, "label": f"RTN on CPU, groups of {group_size}"}
        axes[0].plot([p["bits_per_weight"] for p in rows], [p["perplexity"] for p in rows], **style)
        axes[1].plot([p["bits_per_weight"] for p in rows], [max(p["kl_divergence"], KL_FLOOR) for p in rows], **style)
    reference = result["exl2"]["reference"].get("perplexity")
    if reference is not None:
        axes[0].axhline(reference, color="grey", linestyle="--", label=f"reference (fp16 export) {reference:.2f}")
    axes[0].set_ylabel("perplexity")
    axes[1].set_ylabel(f"KL(reference || point), nats/token (floor {KL_FLOOR:g})")
    if drafts:
        x = [p["decoder_bits_per_weight"] for p in drafts]
        key = next(k for k in drafts[0]["as_draft"] if k.startswith("fixed_k"))
        axes[2].plot(x, [p["as_draft"]["acceptance_rate"] or 0 for p in drafts], marker="o", label="acceptance")
        axes[2].plot(x, [p["as_draft"][key] for p in drafts], marker="s", label=f"speedup, {key.split('_')[1]}")
        axes[2].plot(x, [p["as_draft"]["auto_speedup"] for p in drafts], marker="^", label="speedup, AUTO")
        axes[2].axhline(1.0, color="grey", linestyle="--")
        axes[2].set_ylabel("acceptance rate / speedup (x)")
        axes[2].set_title("as the reference's draft model", fontsize=9)
    for axis in axes:
        axis.set_xlabel("stored bits per weight (decoder linears)")
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    device = result["exl2"].get("device", "GPU")
    figure.suptitle(
        f"{result['model']} on {result['corpus']['tokens_evaluated']} tokens of the King James Bible, {device}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
