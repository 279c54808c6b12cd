"""Cost per token: hardware price profiles, the formula, and a sliding-window meter of live throughput.

    $ per 1M tokens = hourly price / (tokens/s while busy x 3600 x utilisation) x 1e6

The hourly price of a profile is its cloud rate (GPUs x $/GPU-hour) plus, on-prem, the purchase price
amortised over months (730 hours a month) and the power it draws (watts / 1000 x $/kWh). Utilisation is
the share of paid hours the hardware spends generating: measured over the window by default (busy engine
time / window time, which makes the figure the window's actual cost), or assumed by a setting (a
projection: "at this throughput, busy 60% of the day"). Imports nothing from verispec but config.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from verispec.config import CostConfig
from verispec.errors import ConfigError

HOURS_PER_MONTH = 730.0  # 8760 / 12


@dataclass(frozen=True)
class PriceProfile:
    """What one deployment's hardware costs per hour."""

    name: str
    num_gpus: int = 1
    hardware: str = ""  # what it prices: a GPU name of `verispec plan` (rtx4090, a100-80g, h200) or "cpu"
    gpu_hour_usd: float = 0.0  # cloud: rate per GPU-hour
    purchase_usd: float = 0.0  # on-prem: price of the whole machine
    amortization_months: float = 36.0
    watts: float = 0.0  # on-prem: draw of the whole machine under load
    kwh_usd: float = 0.0

    @property
    def hourly_usd(self) -> float:
        cloud = self.num_gpus * self.gpu_hour_usd
        capital = self.purchase_usd / (self.amortization_months * HOURS_PER_MONTH) if self.purchase_usd else 0.0
        power = self.watts / 1000.0 * self.kwh_usd
        return cloud + capital + power


# Assumed list prices (late 2026), to be replaced by a deployment's own: pass --cost-profile FILE.
PROFILES = {
    p.name: p
    for p in (
        # Two RTX 4090 at ~$1,800 each in a ~$1,600 host, over 3 years; 2 x 450 W + 250 W host at $0.15/kWh.
        PriceProfile(
            "2x-rtx4090-onprem", 2, "rtx4090", purchase_usd=5200.0, amortization_months=36, watts=1150, kwh_usd=0.15
        ),
        # Two A100 80 GB on demand at $1.80 per GPU-hour.
        PriceProfile("2x-a100-80g-cloud", 2, "a100-80g", gpu_hour_usd=1.80),
        # One H200 on demand at $3.50 per GPU-hour (the machine the GPU figures were measured on).
        PriceProfile("1x-h200-cloud", 1, "h200", gpu_hour_usd=3.50),
        # A 2-vCPU cloud instance, the class of machine the CPU figures were measured on: $0.08 an hour.
        PriceProfile("cpu-2vcpu-cloud", 1, "cpu", gpu_hour_usd=0.08),
    )
}


def cost_per_million(hourly_usd: float, tokens_per_s: float, utilization: float = 1.0) -> float | None:
    """$ per 1M generated tokens; None when nothing was generated or the hardware is never busy."""
    if tokens_per_s <= 0 or utilization <= 0:
        return None
    return hourly_usd / (tokens_per_s * 3600.0 * utilization) * 1e6


def load_profile(text: str) -> PriceProfile:
    """A built-in profile's name, or a JSON file of PriceProfile fields ({"name": ..., "gpu_hour_usd": ...})."""
    if text in PROFILES:
        return PROFILES[text]
    path = Path(text).expanduser()
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            "--cost-profile",
            f"{text!r} is not a built-in profile ({', '.join(PROFILES)}) nor a readable JSON file: {exc}",
        ) from None
    known = {f.name for f in fields(PriceProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            "--cost-profile", f"{path}: unknown fields {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    data.setdefault("name", path.stem)
    try:
        profile = PriceProfile(**data)
    except TypeError as exc:
        raise ConfigError("--cost-profile", f"{path}: {exc}") from None
    if profile.hourly_usd < 0:
        raise ConfigError("--cost-profile", f"{path}: the hourly price is negative")
    return profile


def profile_from_config(config: CostConfig) -> PriceProfile | None:
    """The profile named by --cost-profile, else the one the price flags describe, else None."""
    if config.profile:
        return load_profile(config.profile)
    profile = PriceProfile(
        "flags",
        config.num_gpus,
        "",
        config.gpu_hour_usd,
        config.purchase_usd,
        config.amortization_months,
        config.watts,
        config.kwh_usd,
    )
    return profile if profile.hourly_usd > 0 else None


@dataclass(frozen=True)
class CostSnapshot:
    """The meter's view of the last window."""

    profile: str
    hourly_usd: float
    tokens_per_s: float  # generated tokens per second of busy engine time
    utilization: float  # what the cost assumes: measured busy share, or the configured one
    measured_utilization: float
    usd_per_million_tokens: float | None  # None: no token in the window


class CostMeter:
    """Generated tokens and busy engine seconds over a sliding window; thread-safe.

    The API side records tokens as it streams them, the engine thread records the time of each step.
    """

    def __init__(self, profile: PriceProfile | None, window_s: float = 60.0, utilization: float = 0.0) -> None:
        self.profile = profile
        self.window_s = window_s
        self.utilization = utilization  # 0: measured
        self.started = time.monotonic()
        self._tokens: deque[tuple[float, int]] = deque()
        self._busy: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def record_tokens(self, count: int, now: float | None = None) -> None:
        with self._lock:
            self._tokens.append((time.monotonic() if now is None else now, count))

    def record_busy(self, seconds: float, now: float | None = None) -> None:
        with self._lock:
            self._busy.append((time.monotonic() if now is None else now, seconds))

    def snapshot(self, now: float | None = None) -> CostSnapshot | None:
        """None without a price profile."""
        if self.profile is None:
            return None
        now = time.monotonic() if now is None else now
        start = now - self.window_s
        with self._lock:
            for events in (self._tokens, self._busy):
                while events and events[0][0] < start:
                    events.popleft()
            tokens = sum(n for _, n in self._tokens)
            busy = sum(s for _, s in self._busy)
        elapsed = min(self.window_s, max(now - self.started, 1e-9))
        measured = min(busy / elapsed, 1.0)
        utilization = self.utilization or measured
        tokens_per_s = tokens / busy if busy > 0 else 0.0
        return CostSnapshot(
            self.profile.name,
            self.profile.hourly_usd,
            tokens_per_s,
            utilization,
            measured,
            cost_per_million(self.profile.hourly_usd, tokens_per_s, utilization) if tokens else None,
        )


def meter_from_config(config: CostConfig) -> CostMeter:
    return CostMeter(profile_from_config(config), config.window_s, config.utilization)
