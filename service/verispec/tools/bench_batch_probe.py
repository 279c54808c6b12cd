"""`verispec bench batch`'s probe: a new short request's time to first token on the batched server, idle,
behind 8 decoding streams, and behind those plus a long prompt in prefill (the passes it waited for counted
from the server's pass log)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from verispec.tools.bench_batch_clients import (
    TOPICS,
    StreamResult,
    Target,
    generate_request,
    pass_summary,
    prompt_for,
    quantile,
    spread,
    stream,
)
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

PROBE_BACKGROUND_STREAMS = 8
PROBE_MAX_NEW_TOKENS = 2
PROBE_BACKGROUND_TOKENS = 1024  # cancelled once the probe is done
PROBE_PROMPT = "Name three colours."


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.002)


async def _probe(target: Target) -> StreamResult:
    """The short request whose time to first token the probe measures."""
    return await stream(target.stub, generate_request(PROBE_PROMPT, "off", PROBE_MAX_NEW_TOKENS, target.chat))


async def probe_ttft(target: Target, background: int, long_prompt: str | None, samples: int) -> dict[str, Any]:
    """`samples` short requests, one after another, once `background` streams are decoding (and a long
    prompt is in prefill); only samples whose first token came while the long prompt was still in prefill
    count for that condition.

    The background streams ask for far more tokens than the probes need and are cancelled once they are
    done (a long prompt then finishes its prefill alone); the engine must be idle again (Health) before
    the next measurement.
    """
    first = [asyncio.Event() for _ in range(background)]
    requests = [generate_request(prompt_for(i), "off", PROBE_BACKGROUND_TOKENS, target.chat) for i in range(background)]
    jobs = [asyncio.ensure_future(stream(target.stub, r, e)) for r, e in zip(requests, first, strict=True)]
    await _until(lambda: all(e.is_set() or j.done() for e, j in zip(first, jobs, strict=True)))
    passes_before = target.counts.snapshot()[0]
    long_job = None
    if long_prompt is not None:
        long_job = asyncio.ensure_future(
            stream(target.stub, generate_request(long_prompt, "off", PROBE_MAX_NEW_TOKENS, chat=False))
        )
        await _until(lambda: long_prompt_started(target.counts.passes(passes_before), background) or long_job.done())
    probes: list[StreamResult] = []
    for _ in range(samples):
        if long_job is not None and long_job.done():
            break
        probes.append(await _probe(target))
    last = (probes[-1].first_token_at or 0.0) if probes else float("inf")
    run: dict[str, Any] = {
        "background_decoding_at_last_probe_token": sum(not j.done() or j.result().ended_at > last for j in jobs),
        "passes_while_probing": pass_summary(target.counts.passes(passes_before)),
        "passes_to_first_token": passes_to_first_token(probes, target.counts.pass_ends(passes_before)),
    }
    for job in jobs:  # before the long prompt is done: how long its prefill takes under load is not this run's
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    if long_job is not None:
        long = await long_job
        long_first = long.first_token_at or float("inf")
        run["long_prompt_tokens"] = long.prompt_tokens
        run["probes_before_long_first_token"] = sum((p.first_token_at or 0.0) < long_first for p in probes)
        probes = [p for p in probes if (p.first_token_at or 0.0) < long_first]
        run["long_prompt_ttft_ms"] = round(1000 * (long.ttft_s or 0.0), 1)  # streams cancelled after the probes
        run["long_exact"] = len(long.token_ids) == PROBE_MAX_NEW_TOKENS and long.error is None
    run["probes"] = probes
    run["seconds_to_idle_after_cancel"] = await _until_idle(target.stub)
    return run


def passes_to_first_token(probes: Sequence[StreamResult], ends: Sequence[float]) -> list[int]:
    """For each probe, the passes that ended between its call and its first token: the pass in flight when it
    came, its own, and any it waited for besides."""
    counts = []
    for probe in probes:
        if probe.first_token_at is None or probe.ttft_s is None:
            continue
        called = probe.first_token_at - probe.ttft_s
        counts.append(sum(called < end <= probe.first_token_at for end in ends))
    return counts


def long_prompt_started(passes: Sequence[tuple[int, int, float]], background: int) -> bool:
    """Whether a pass since the long prompt's submission holds its first prefill chunk: a pass of more
    sequences than the background streams, or of more tokens than sequences (OFF makes no drafts), however
    few tokens the chunk has."""
    return any(size > background or tokens > size for size, tokens, _ms in passes)


async def _until_idle(stub: pb_grpc.GenerationServiceStub, timeout: float = 60.0) -> float:
    """Seconds until Health reports no active or queued request; raises after `timeout`."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        health = await stub.Health(pb.HealthRequest(), timeout=10)
        if health.active_requests == 0 and health.queue_depth == 0:
            return round(time.perf_counter() - start, 3)
        await asyncio.sleep(0.01)
    raise RuntimeError(f"the engine still had {health.active_requests} active requests {timeout}s after cancels")


async def run_probe(
    target: Target, repeats: int, samples: int, long_prompt: str | None, progress: Callable[[str], None]
) -> Any:
    """TTFT of the same short request on the idle server, behind decoding streams, and behind those plus
    a long prefill: `samples` requests per condition, `repeats` times. The goal's figure is a condition's
    p99 over the idle median; the p50 ratio is beside it."""
    ttft: dict[str, list[float]] = {"idle": [], "under_load": [], "long_prefill": []}
    runs: dict[str, list[dict[str, Any]]] = {"under_load": [], "long_prefill": []}
    problems = 0
    for repeat in range(repeats):
        progress(f"TTFT probe {repeat + 1}/{repeats}: idle, behind {PROBE_BACKGROUND_STREAMS} streams, long prefill")
        probes = [await _probe(target) for _ in range(samples)]
        ttft["idle"] += [p.ttft_s or 0.0 for p in probes]
        for name in runs if long_prompt is not None else ("under_load",):
            run = await probe_ttft(
                target, PROBE_BACKGROUND_STREAMS, long_prompt if name == "long_prefill" else None, samples
            )
            sampled: list[StreamResult] = run.pop("probes")
            probes += sampled
            ttft[name] += [p.ttft_s or 0.0 for p in sampled]
            problems += not run.get("long_exact", True)
            runs[name].append(run)
        problems += sum(len(p.token_ids) != PROBE_MAX_NEW_TOKENS or p.error is not None for p in probes)
    result: dict[str, Any] = {
        "background_streams": PROBE_BACKGROUND_STREAMS,
        "samples_per_condition_and_repeat": samples,
        "streams_not_exact": problems,
    }
    idle_median = statistics.median(ttft["idle"])
    for name, values in ttft.items():
        if not values:
            continue
        ms = [v * 1000 for v in values]
        result[f"{name}_ttft_ms"] = {**spread(ms), "p99": round(quantile(ms, 99) or 0.0, 2), "samples": len(ms)}
        if name != "idle":
            result[f"{name}_p50_over_idle"] = round(statistics.median(values) / idle_median, 3)
            result[f"{name}_p99_over_idle"] = round((quantile(values, 99) or 0.0) / idle_median, 3)
            result[f"{name}_runs"] = runs[name]
    return result


def long_prompt_text(tokenizer: Any, num_tokens: int) -> str:
    """Raw text of about num_tokens tokens: numbered sentences, so n-gram lookup finds little to copy."""
    sentences = [f"Line {i}: the {TOPICS[i % len(TOPICS)]} was noted at hour {i % 24}." for i in range(num_tokens)]
    ids = tokenizer.encode(" ".join(sentences))[:num_tokens]
    text: str = tokenizer.decode(ids)
    return text
