"""Prometheus metrics: their names, what records them, and the /metrics endpoint on its own port."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from verispec.cost import CostMeter
from verispec.request import FinishReason

if TYPE_CHECKING:  # the engine imports torch; this module is read by the loop side only
    from verispec.cost import CostSnapshot
    from verispec.engine.core import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """Every verispec metric, in one registry; safe to update from the engine thread and the loop."""

    def __init__(self, registry: CollectorRegistry | None = None, cost: CostMeter | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.cost = cost or CostMeter(None)
        r = self.registry
        self.requests = Counter(
            "verispec_requests", "Finished requests by finish reason.", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            "verispec_rejected_requests", "Requests refused before generation, by status code.", ["code"], registry=r
        )
        self.ttft = Histogram(
            "verispec_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "verispec_inter_token_latency_seconds",
            "Time between streamed steps divided by the tokens they carried.",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("verispec_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generated_tokens = Counter("verispec_generated_tokens", "Generated tokens.", registry=r)
        self.steps = Counter("verispec_spec_steps", "Target verify passes after prefill.", ["drafter"], registry=r)
        self.draft_tokens = Counter("verispec_spec_draft_tokens", "Draft tokens proposed.", ["drafter"], registry=r)
        self.accepted_tokens = Counter(
            "verispec_spec_accepted_tokens", "Draft tokens accepted.", ["drafter"], registry=r
        )
        self.drafted_at = Counter(
            "verispec_spec_drafted_by_position",
            "Drafts proposed at each draft position (1 = first).",
            ["drafter", "position"],
            registry=r,
        )
        self.accepted_at = Counter(
            "verispec_spec_accepted_by_position",
            "Drafts accepted at each draft position (1 = first).",
            ["drafter", "position"],
            registry=r,
        )
        self.draft_seconds = Histogram(
            "verispec_spec_draft_seconds", "Time of one draft phase.", ["drafter"], buckets=_STEP_BUCKETS, registry=r
        )
        self.verify_seconds = Histogram(
            "verispec_spec_verify_seconds",
            "Time of one target verify pass.",
            ["drafter"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "verispec_batch_size", "Sequences in one forward pass.", buckets=_BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "verispec_batch_tokens",
            "Tokens in one forward pass: decodes, drafts and prefill chunks.",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "verispec_batch_seconds",
            "Time of one engine step over its batch: drafting, the forward pass and verification.",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.engine = EngineCollector()
        r.register(self.engine)
        r.register(CostCollector(self.cost))

    def on_step(self, drafter: str, num_draft_tokens: int, num_accepted: int, draft_s: float, verify_s: float) -> None:
        """One speculative step of one request (engine thread)."""
        self.steps.labels(drafter).inc()
        self.verify_seconds.labels(drafter).observe(verify_s)
        if num_draft_tokens:
            self.draft_tokens.labels(drafter).inc(num_draft_tokens)
            self.accepted_tokens.labels(drafter).inc(num_accepted)
            self.draft_seconds.labels(drafter).observe(draft_s)
            for position in range(1, num_draft_tokens + 1):
                self.drafted_at.labels(drafter, str(position)).inc()
                if position <= num_accepted:
                    self.accepted_at.labels(drafter, str(position)).inc()

    def on_batch(self, batch_size: int, batch_tokens: int, seconds: float) -> None:
        """One forward pass over batch_size sequences and batch_tokens tokens (engine thread)."""
        self.batch_size.observe(batch_size)
        self.batch_tokens.observe(batch_tokens)
        self.batch_seconds.observe(seconds)
        self.cost.record_busy(seconds)

    def on_tokens(self, count: int) -> None:
        """Tokens streamed to a caller (loop side): the throughput the cost per token is priced on."""
        self.cost.record_tokens(count)

    def on_finish(self, reason: FinishReason, prompt_tokens: int, generated_tokens: int) -> None:
        self.requests.labels(reason.value).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)

    def watch(self, stats: Callable[[], EngineStats] | None) -> None:
        """Reads the engine's gauges and its preemption count from `stats` at scrape time (None: no engine,
        the gauges absent)."""
        self.engine.stats = stats

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the /metrics endpoint on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


class EngineCollector:
    """What the engine thread owns (queues, KV pages, preemptions, device memory), read from one
    EngineStats snapshot per scrape; absent until a model is loaded."""

    def __init__(self) -> None:
        self.stats: Callable[[], EngineStats] | None = None

    def describe(self) -> Iterable[Metric]:
        return _engine_families(None)

    def collect(self) -> Iterable[Metric]:
        return [] if self.stats is None else _engine_families(self.stats())


_ENGINE_GAUGES = (
    ("verispec_queue_depth", "Requests waiting for a slot."),
    ("verispec_active_requests", "Requests being generated."),
    ("verispec_kv_pages_used", "KV cache pages held by running requests."),
    ("verispec_kv_pages_capacity", "KV cache pages in the pool."),  # not _total: that suffix means a counter
    ("verispec_kv_cache_utilization", "Share of KV cache pages in use (0..1)."),
)


def _gauge_values(stats: EngineStats) -> tuple[float, ...]:
    """The values of _ENGINE_GAUGES, in order."""
    used, total = stats.kv_pages_used, stats.kv_pages_total
    return stats.queue_depth, stats.active_requests, used, total, used / total if total else 0.0


def _engine_families(stats: EngineStats | None) -> list[Metric]:
    """The snapshot's metric families; without a snapshot, their names alone (for the registry)."""
    values: tuple[float | None, ...] = (None,) * len(_ENGINE_GAUGES) if stats is None else _gauge_values(stats)
    families: list[Metric] = [
        GaugeMetricFamily(name, documentation, value=value)
        for (name, documentation), value in zip(_ENGINE_GAUGES, values, strict=True)
    ]
    families.append(
        CounterMetricFamily(
            "verispec_preemptions",
            "Running requests preempted (KV pages taken back, context recomputed later) since the engine started.",
            value=None if stats is None else stats.num_preemptions,
        )
    )
    used = GaugeMetricFamily("verispec_device_memory_bytes", "Memory in use per device.", labels=["device"])
    total = GaugeMetricFamily(
        "verispec_device_memory_total_bytes", "Memory size per device, where known (not for cpu).", labels=["device"]
    )
    for device, used_bytes, total_bytes in () if stats is None else stats.memory:
        used.add_metric([device], used_bytes)
        if total_bytes:
            total.add_metric([device], total_bytes)
    return [*families, used, total]


class CostCollector:
    """The live cost per token from the cost meter's window, read at scrape time; absent without a profile."""

    def __init__(self, meter: CostMeter) -> None:
        self.meter = meter

    def describe(self) -> Iterable[Metric]:
        return _cost_families(None, "")

    def collect(self) -> Iterable[Metric]:
        snapshot = self.meter.snapshot()
        return [] if snapshot is None else _cost_families(snapshot, snapshot.profile)


def _cost_families(snapshot: CostSnapshot | None, profile: str) -> list[Metric]:
    values: dict[str, float | None] = {
        "verispec_cost_usd_per_million_tokens": None,
        "verispec_cost_utilization": None,
        "verispec_cost_tokens_per_second": None,
        "verispec_cost_hourly_usd": None,
    }
    if snapshot is not None:
        values = {
            "verispec_cost_usd_per_million_tokens": snapshot.usd_per_million_tokens,
            "verispec_cost_utilization": snapshot.utilization,
            "verispec_cost_tokens_per_second": snapshot.tokens_per_s,
            "verispec_cost_hourly_usd": snapshot.hourly_usd,
        }
    docs = {
        "verispec_cost_usd_per_million_tokens": "Hardware $ per 1M generated tokens over the cost window, at the "
        "utilisation of verispec_cost_utilization (absent while the window holds no token).",
        "verispec_cost_utilization": "Share of paid hardware time the cost assumes busy: measured over the window, "
        "or --cost-utilization.",
        "verispec_cost_tokens_per_second": "Generated tokens per second of busy engine time over the cost window.",
        "verispec_cost_hourly_usd": "Hourly price of the hardware price profile in $.",
    }
    families: list[Metric] = []
    for name, value in values.items():
        family = GaugeMetricFamily(name, docs[name], labels=["profile"])
        if value is not None:
            family.add_metric([profile], value)
        families.append(family)
    return families
