"""Prometheus metrics: their names, what records them, and the /metrics endpoint on its own port."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from verispec.request import FinishReason

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Every verispec metric, in one registry; safe to update from the engine thread and the loop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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
        self.queue_depth = Gauge("verispec_queue_depth", "Requests waiting for a slot.", registry=r)
        self.active = Gauge("verispec_active_requests", "Requests being generated.", registry=r)
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
        self.device_memory = Gauge("verispec_device_memory_bytes", "Memory in use per device.", ["device"], registry=r)

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

    def on_finish(self, reason: FinishReason, prompt_tokens: int, generated_tokens: int) -> None:
        self.requests.labels(reason.value).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)

    def watch(
        self,
        queue_depth: Callable[[], float],
        active: Callable[[], float],
        memory: Callable[[], list[tuple[str, int, int]]],
    ) -> None:
        """Gauges read at scrape time from the engine."""
        self.queue_depth.set_function(queue_depth)
        self.active.set_function(active)
        for device, _, _ in memory():
            self.device_memory.labels(device).set_function(_used_bytes(memory, device))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Starts the /metrics endpoint on a daemon thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


def _used_bytes(memory: Callable[[], list[tuple[str, int, int]]], device: str) -> Callable[[], float]:
    def read() -> float:
        return float(next((used for name, used, _ in memory() if name == device), 0))

    return read
