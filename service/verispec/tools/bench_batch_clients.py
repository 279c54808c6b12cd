"""The clients of `verispec bench batch`: greedy streams, rounds of N of them at once, what each stream
delivered and when, the latency arithmetic, and the server's pass log the report summarises.

It imports grpc and the generated stubs at top level, as the client process needs them.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

MODES = {"off": pb.SPECULATION_MODE_OFF, "auto": pb.SPECULATION_MODE_AUTO}
PASS_LOG = 4096  # passes whose shape and time BatchCounts keeps
_PASS_FIELDS = 4
STREAM_TIMEOUT_S = 600.0
TOPICS = (
    "the sea", "autumn leaves", "a lighthouse", "bread baking", "a city at night", "mountain trails",
    "an old clock", "the first snow", "a busy market", "a quiet library", "honeybees", "a river delta",
    "a thunderstorm", "desert stars", "a train station", "a vegetable garden", "paper kites", "a harbour",
    "northern lights", "a violin", "tide pools", "a windmill", "morning fog", "a bicycle repair shop",
    "glaciers", "a chess match", "fireflies", "a ferry crossing", "volcanoes", "a bakery at dawn",
    "owls", "a village fair",
)  # fmt: skip


def prompt_for(index: int) -> str:
    """A short prompt, distinct for every stream index."""
    return f"Write a few sentences about {TOPICS[index % len(TOPICS)]} (note {index})."


@dataclass
class StreamResult:
    """What one StreamGenerate call delivered, with client-side timings."""

    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # one sample per token after the first message
    token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str = ""
    prompt_tokens: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    error: str | None = None
    first_token_at: float | None = None  # time.perf_counter() readings, to order streams against each other
    ended_at: float = 0.0


def token_latencies(times: Sequence[float], counts: Sequence[int]) -> tuple[float | None, list[float]]:
    """(time to the first token, per-token inter-token latencies) from message arrival times.

    `times` are seconds since the call was made, one per message that carried `counts` tokens. A gap
    between messages is shared by the tokens of the later one (a speculative step delivers several).
    """
    arrivals = [(t, n) for t, n in zip(times, counts, strict=True) if n > 0]
    if not arrivals:
        return None, []
    samples: list[float] = []
    for (before, _), (now, n) in itertools.pairwise(arrivals):
        samples += [(now - before) / n] * n
    return arrivals[0][0], samples


async def stream(
    stub: pb_grpc.GenerationServiceStub, request: pb.StreamGenerateRequest, first: asyncio.Event | None = None
) -> StreamResult:
    """One call, timed per message; `first` is set when the first token arrives."""
    result = StreamResult()
    times: list[float] = []
    counts: list[int] = []
    start = time.perf_counter()
    try:
        async for message in stub.StreamGenerate(request, timeout=STREAM_TIMEOUT_S):
            times.append(time.perf_counter() - start)
            counts.append(len(message.token_ids))
            result.token_ids += message.token_ids
            if result.token_ids and result.first_token_at is None:
                result.first_token_at = time.perf_counter()
                if first is not None:
                    first.set()
            if message.finish_reason:
                result.finish_reason = pb.FinishReason.Name(message.finish_reason)
                result.prompt_tokens = message.usage.prompt_tokens
                result.completion_tokens = message.usage.completion_tokens
                result.num_draft_tokens = message.speculation.num_draft_tokens
                result.num_accepted_tokens = message.speculation.num_accepted_tokens
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    result.ended_at = time.perf_counter()
    result.ttft_s, result.itl_s = token_latencies(times, counts)
    return result


def generate_request(prompt: str, mode: str, max_new_tokens: int, chat: bool = True) -> pb.StreamGenerateRequest:
    """A greedy request that generates exactly max_new_tokens tokens (end-of-sequence held back)."""
    request = pb.StreamGenerateRequest(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        speculation=pb.SpeculationParams(mode=MODES[mode]),
    )
    if chat:
        request.messages.append(pb.ChatMessage(role="user", content=prompt))
    else:
        request.prompt = prompt
    return request


class BatchCounts:
    """A StepObserver counting forward passes and their sequences, and keeping the shape, time and end of the
    last PASS_LOG passes. The engine thread writes; the client process reads snapshots, so the counts live in
    shared memory. A pass's end is a time.perf_counter() reading (CLOCK_MONOTONIC: one clock for both
    processes), so that a client's request can be placed among the passes."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._values = context.Array("q", 2)
        # (sequences, tokens, microseconds, end in microseconds) per pass
        self._log = context.Array("q", _PASS_FIELDS * PASS_LOG, lock=False)

    def on_step(self, drafter: str, num_draft_tokens: int, num_accepted: int, draft_s: float, verify_s: float) -> None:
        """Per-request steps are not this bench's concern."""

    def on_batch(self, batch_size: int, batch_tokens: int, seconds: float) -> None:
        with self._values.get_lock():
            slot = _PASS_FIELDS * (self._values[0] % PASS_LOG)
            self._log[slot : slot + _PASS_FIELDS] = [
                batch_size, batch_tokens, round(seconds * 1e6), round(time.perf_counter() * 1e6)
            ]  # fmt: skip
            self._values[0] += 1
            self._values[1] += batch_size

    def snapshot(self) -> tuple[int, int]:
        """(forward passes, sequences in them) so far."""
        with self._values.get_lock():
            passes, sequences = self._values[:]
        return passes, sequences

    def passes(self, since: int) -> list[tuple[int, int, float]]:
        """(sequences, tokens, milliseconds) of each pass from pass number `since` on (the last PASS_LOG)."""
        return [(size, tokens, micros / 1000) for size, tokens, micros, _end in self._rows(since)]

    def pass_ends(self, since: int) -> list[float]:
        """When each pass from pass number `since` on ended (time.perf_counter() seconds; the last PASS_LOG)."""
        return [end / 1e6 for *_shape, end in self._rows(since)]

    def _rows(self, since: int) -> list[tuple[int, ...]]:
        with self._values.get_lock():
            total = self._values[0]
            first = max(since, total - PASS_LOG)
            slots = [_PASS_FIELDS * (i % PASS_LOG) for i in range(first, total)]
            return [tuple(self._log[slot : slot + _PASS_FIELDS]) for slot in slots]


def pass_summary(passes: Sequence[tuple[int, int, float]]) -> dict[str, Any]:
    """What the passes of a probe window looked like: how many, their tokens and sequences, their times."""
    if not passes:
        return {"passes": 0}
    sizes, tokens, ms = zip(*passes, strict=True)
    return {
        "passes": len(passes),
        "sequences": spread([float(n) for n in sizes]),
        "tokens": spread([float(n) for n in tokens]),
        "ms": {**spread(list(ms)), "p99": round(quantile(list(ms), 99) or 0.0, 2)},
    }


@dataclass
class Target:
    """One policy's server as the bench's clients see it."""

    policy: str
    stub: pb_grpc.GenerationServiceStub
    counts: BatchCounts
    drafter: str  # what AUTO drafts with: ngram or draft_model
    chat: bool  # prompts as chat messages (models without a chat template, e.g. synthetic ones, get raw text)


@dataclass
class Round:
    """One round: N concurrent streams on one server, in one mode."""

    policy: str
    mode: str
    concurrency: int
    repeat: int
    wall_s: float
    streams: list[StreamResult]
    mean_batch_size: float | None
    passes: list[tuple[int, int, float]]  # (sequences, tokens, ms) of each forward pass of the round

    @property
    def tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.streams)

    def metrics(self) -> dict[str, float | None]:
        itl = [x for s in self.streams for x in s.itl_s]
        ttft = [s.ttft_s for s in self.streams if s.ttft_s is not None]
        return {
            "tokens_per_s": self.tokens / self.wall_s,
            "itl_ms_p50": _ms(quantile(itl, 50)),
            "itl_ms_p99": _ms(quantile(itl, 99)),
            "ttft_ms_p50": _ms(quantile(ttft, 50)),
            "ttft_ms_p99": _ms(quantile(ttft, 99)),
            "mean_batch_size": self.mean_batch_size,
        }


def quantile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


async def run_round(target: Target, mode: str, concurrency: int, max_new_tokens: int, repeat: int = 0) -> Round:
    """N streams at once on distinct prompts; the round's wall time runs from the calls to the last token."""
    passes, sequences = target.counts.snapshot()
    requests = [generate_request(prompt_for(i), mode, max_new_tokens, target.chat) for i in range(concurrency)]
    start = time.perf_counter()
    streams = await asyncio.gather(*(stream(target.stub, r) for r in requests))
    wall = time.perf_counter() - start
    passes_after, sequences_after = target.counts.snapshot()
    mean_batch = (sequences_after - sequences) / (passes_after - passes) if passes_after > passes else None
    passes_seen = target.counts.passes(passes)
    return Round(target.policy, mode, concurrency, repeat, wall, list(streams), mean_batch, passes_seen)


def check_round(result: Round, max_new_tokens: int) -> list[dict[str, Any]]:
    """The streams that did not deliver exactly max_new_tokens tokens and end with LENGTH."""
    problems = []
    for index, s in enumerate(result.streams):
        exact = len(s.token_ids) == s.completion_tokens == max_new_tokens
        if not exact or s.error is not None or s.finish_reason != "FINISH_REASON_LENGTH":
            problems.append(
                {
                    "policy": result.policy,
                    "mode": result.mode,
                    "concurrency": result.concurrency,
                    "repeat": result.repeat,
                    "stream": index,
                    "tokens_received": len(s.token_ids),
                    "completion_tokens": s.completion_tokens,
                    "finish_reason": s.finish_reason,
                    "error": s.error,
                }
            )
    return problems


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }
