"""`verispec bench batch`: throughput and latency under concurrent load, through the real gRPC server.

The model loads once; each scheduling policy (continuous batching, and round robin as the comparison
point) gets an engine over it behind a server on an ephemeral port, one at a time, and the clients run in
a process of their own. For every
policy, speculation mode (OFF, AUTO) and concurrency, N greedy StreamGenerate clients each take exactly
--max-new-tokens tokens; the policies take turns per repeat (ABBA) so drift hits both alike. A probe
then times a new request's first token on the batched server: idle, behind 8 decoding streams, and
behind those streams plus a long prompt in prefill. With the exl2 backend, ExLlamaV2's own batched
forward over the same model gives the raw ceiling.

Its flags are defined in `verispec.tools.bench`: this module imports grpc and the generated stubs at top level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import grpc

from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

T = TypeVar("T")
POLICIES = ("batched", "round_robin")
MODES = {"off": pb.SPECULATION_MODE_OFF, "auto": pb.SPECULATION_MODE_AUTO}
MAX_ACTIVE_REQUESTS = 32
PROBE_BACKGROUND_STREAMS = 8
PROBE_MAX_NEW_TOKENS = 2
PROBE_BACKGROUND_TOKENS = 1024  # cancelled once the probe is done
PASS_LOG = 4096  # passes whose shape and time BatchCounts keeps
_PASS_FIELDS = 4
FIRST_PASSES = 12  # passes of a point's first round listed in the report (sequences, tokens, ms): its ramp-up
PROBE_PROMPT = "Name three colours."
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
        "sequences": _spread([float(n) for n in sizes]),
        "tokens": _spread([float(n) for n in tokens]),
        "ms": {**_spread(list(ms)), "p99": round(_quantile(list(ms), 99) or 0.0, 2)},
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
            "itl_ms_p50": _ms(_quantile(itl, 50)),
            "itl_ms_p99": _ms(_quantile(itl, 99)),
            "ttft_ms_p50": _ms(_quantile(ttft, 50)),
            "ttft_ms_p99": _ms(_quantile(ttft, 99)),
            "mean_batch_size": self.mean_batch_size,
        }


def _quantile(values: list[float], q: int) -> float | None:
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


# -- the probe: a new request's first token under load ---------------------------------------------


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
        result[f"{name}_ttft_ms"] = {**_spread(ms), "p99": round(_quantile(ms, 99) or 0.0, 2), "samples": len(ms)}
        if name != "idle":
            result[f"{name}_p50_over_idle"] = round(statistics.median(values) / idle_median, 3)
            result[f"{name}_p99_over_idle"] = round((_quantile(values, 99) or 0.0) / idle_median, 3)
            result[f"{name}_runs"] = runs[name]
    return result


# -- the raw ceiling: ExLlamaV2's own batched forward -----------------------------------------------


def raw_batch_ceiling(backend: Any, sizes: Sequence[int], num_steps: int, prompt_tokens: int = 16) -> dict[str, Any]:
    """Tokens/s of ExLlamaV2's forward over B equal-length sequences, 1 new token each, for B in sizes.

    A plain (unpaged) fp16 `ExLlamaV2Cache` of batch B holds a `prompt_tokens` prefix per sequence;
    each timed step feeds ids [B, 1] and takes the argmax back to the host, as a decode step does.
    """
    import torch
    from exllamav2 import ExLlamaV2Cache

    model = backend.model
    max_seq_len = -(-(prompt_tokens + num_steps + 4) // 256) * 256
    result: dict[str, Any] = {"cache": "fp16", "prompt_tokens": prompt_tokens, "steps": num_steps}
    rates: dict[str, float] = {}
    with torch.inference_mode():
        for size in sizes:
            cache = ExLlamaV2Cache(model, batch_size=size, max_seq_len=max_seq_len)
            prefix = torch.arange(prompt_tokens).unsqueeze(0) + 7 * torch.arange(size).unsqueeze(1) + 100
            model.forward(prefix.long(), cache, preprocess_only=True)
            ids = prefix[:, -1:].long()
            for warm in (True, False):
                start = time.perf_counter()
                for _ in range(2 if warm else num_steps):
                    logits = model.forward(ids, cache)  # [B, 1, vocab]
                    ids = logits[:, -1, :].argmax(dim=-1, keepdim=True).cpu()
                elapsed = time.perf_counter() - start
            rates[str(size)] = round(size * num_steps / elapsed, 1)
            del cache, logits
            torch.cuda.empty_cache()
    result["tokens_per_s"] = rates
    return result


# -- set-up: one model load, then one engine and server at a time ---------------------------------
#
# On a 2-core CPU a second live thread that has run torch work slows the first by 20-40% even while it
# waits (measured here: one engine thread 10.5 tokens/s, the same with an idle second engine 6.4-8.3).
# So the model loads on a thread that then ends, and each (repeat, policy) block builds its engine on a
# new thread, serves the block's rounds and stops, ending that thread, before the next block starts.


def on_new_thread(
    name: str, build: Callable[[], T], then: Callable[[T], None] | None = None
) -> tuple[Future[T], threading.Thread]:
    """Runs `build` on a new thread, then `then(result)` on the same thread (an engine loop); the thread
    ends after. Torch work stays on the one thread that started it."""
    built: Future[T] = Future()

    def main() -> None:
        try:
            result = build()
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(result)
        if then is not None:
            then(result)

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    return built, thread


@dataclass(frozen=True)
class Parts:
    """The loaded models every engine is built over, and the raw ceiling measured before any engine."""

    target: Any
    tokenizer: Any
    draft: Any
    raw_batch: dict[str, Any] | None


def load_parts(config: Any, raw_sizes: Sequence[int], raw_steps: int) -> Parts:
    """Target and draft as `serve` loads them; on exl2, ExLlamaV2's batched forward before any KV pool
    takes the GPU's free memory."""
    from verispec.loader import check_same_vocabulary, load_backend

    target, tokenizer = load_backend(config.model, config.model.model)
    draft = None
    if config.spec.draft_model:
        draft, draft_tokenizer = load_backend(config.model, config.spec.draft_model, config.spec.draft_gpu_split)
        check_same_vocabulary(tokenizer, draft_tokenizer, config.spec.draft_model)
    raw = raw_batch_ceiling(target, raw_sizes, raw_steps) if target.info.backend == "exl2" else None
    return Parts(target, tokenizer, draft, raw)


def server_flags(args: argparse.Namespace, policy: str) -> list[str]:
    """The `serve` flags of one policy's server."""
    from verispec.config import DEFAULT_MODEL

    flags = ["--host", "127.0.0.1", "--port", "0", "--step-spans", "off", "--scheduling", policy]
    flags += ["--max-active-requests", str(MAX_ACTIVE_REQUESTS), "--model", args.model or DEFAULT_MODEL]
    flags += ["--backend", args.backend]
    if args.draft_model:
        flags += ["--draft-model", args.draft_model]
    if args.max_batch_tokens:
        flags += ["--max-batch-tokens", str(args.max_batch_tokens)]
    return flags


@dataclass(frozen=True)
class ServerInfo:
    """What the client process needs to know of one policy's server."""

    port: int
    policy: str
    counts: BatchCounts
    drafter: str
    chat: bool


class ClientProcess:
    """The bench's clients, in a process of their own as real callers are. In the server's process their
    gRPC work would compete with the server's event loop and with the engine thread for the GIL, and the
    figures would measure the bench as much as the server."""

    def __init__(self, server: ServerInfo) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_client_main, args=(child, server), name="verispec-bench-clients")
        self._process.start()
        child.close()
        self.server = server

    async def call(self, command: str, *args: Any) -> Any:
        """Runs COMMANDS[command](target, *args) in the client process; returns its result or raises."""
        self._conn.send((command, args))
        ok, result = await asyncio.get_running_loop().run_in_executor(None, self._conn.recv)
        if not ok:
            raise RuntimeError(f"bench client process failed:\n{result}")
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


def _client_main(conn: Connection, server: ServerInfo) -> None:
    asyncio.run(_client_loop(conn, server))


async def _client_loop(conn: Connection, server: ServerInfo) -> None:
    """Serves the parent's commands over one channel until it sends None."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        target = Target(server.policy, stub, server.counts, server.drafter, server.chat)
        while (command := await loop.run_in_executor(None, conn.recv)) is not None:
            name, args = command
            try:
                conn.send((True, await COMMANDS[name](target, *args)))
            except Exception as exc:  # handed to the parent, which raises it
                conn.send((False, "".join(traceback.format_exception(exc))))


@contextlib.asynccontextmanager
async def serving(
    config: Any, parts: Parts, progress: Callable[[str], None] | None = None
) -> AsyncIterator[ClientProcess]:
    """A server on an ephemeral port over a new engine (own thread) and a client process for it; stopped,
    and the engine's memory freed, on exit (`progress` is told how much GPU memory is free then)."""
    from verispec.api.server import Server
    from verispec.loader import build_engine

    policy = config.engine.scheduling
    counts = BatchCounts()
    server = Server(config)
    port = await server.start()
    build = functools.partial(build_engine, config, parts.target, parts.tokenizer, parts.draft, counts)
    engine, engine_thread = on_new_thread(f"verispec-engine-{policy}", build, lambda models: models.engine.core.run())
    clients = None
    try:
        await server.load(_returning(await asyncio.wrap_future(engine)))
        chat = parts.tokenizer.has_chat_template
        clients = ClientProcess(ServerInfo(port, policy, counts, engine.result().auto_drafter, chat))
        yield clients
    finally:
        if clients is not None:
            clients.close()
        await server.stop(0)
        del server, engine  # every reference to the engine, so that its KV pool can go
        await asyncio.to_thread(engine_thread.join, 60)  # and the engine thread's own, once its loop has ended
        gc.collect()
        _empty_cuda_cache()  # the next engine sizes its KV pool from the memory free then
        if progress is not None and (free := _free_gpu_memory()):
            progress(f"{policy} engine stopped: {free}")


def _returning(models: Any) -> Callable[..., Any]:
    """A loader for Server.load handing over an engine already built (called as loader(config, observer))."""
    return lambda _config, _observer=None: models


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _free_gpu_memory() -> str:
    """Free and total memory per GPU, in GiB ("" without CUDA): what the next engine's KV pool is sized from."""
    import torch

    if not torch.cuda.is_available():
        return ""
    gib = 2**30
    sizes = [torch.cuda.mem_get_info(index) for index in range(torch.cuda.device_count())]
    return ", ".join(
        f"cuda:{index} {free / gib:.1f} of {total / gib:.1f} GiB free" for index, (free, total) in enumerate(sizes)
    )


def long_prompt_text(tokenizer: Any, num_tokens: int) -> str:
    """Raw text of about num_tokens tokens: numbered sentences, so n-gram lookup finds little to copy."""
    sentences = [f"Line {i}: the {TOPICS[i % len(TOPICS)]} was noted at hour {i % 24}." for i in range(num_tokens)]
    ids = tokenizer.encode(" ".join(sentences))[:num_tokens]
    text: str = tokenizer.decode(ids)
    return text


# -- the run ---------------------------------------------------------------------------------------


def run_batch(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole benchmark; raises ConfigError naming a flag out of range before loading anything."""
    from verispec.errors import ConfigError

    for flag, value, least in (
        ("--repeats", args.repeats, 1),
        ("--max-new-tokens", args.max_new_tokens, 2),
        ("--probe-samples", args.probe_samples, 1),
    ):
        if value < least:
            raise ConfigError(flag, f"must be >= {least}, got {value}")
    if args.long_prompt_tokens < 0:
        raise ConfigError("--long-prompt-tokens", f"must be >= 0, got {args.long_prompt_tokens}")
    return asyncio.run(_run(args, progress))


async def _run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    from verispec.config import config_from_argv

    load_before = os.getloadavg()
    configs = {p: config_from_argv(server_flags(args, p)) for p in POLICIES}
    progress("loading the model")
    loading, _thread = on_new_thread(
        "verispec-load", lambda: load_parts(configs["batched"], args.concurrency, args.max_new_tokens)
    )
    parts = await asyncio.wrap_future(loading)
    long_prompt = long_prompt_text(parts.tokenizer, args.long_prompt_tokens) if args.long_prompt_tokens else None
    rounds: list[Round] = []
    probe = None
    drafter, failure, completed = "", None, 0
    try:
        for repeat in range(args.repeats):
            for policy in POLICIES if repeat % 2 == 0 else POLICIES[::-1]:  # ABBA: drift hits both policies
                async with serving(configs[policy], parts, progress) as clients:
                    rounds += await clients.call("block", args, repeat, progress)
                    if policy == "batched" and probe is None and not args.no_ttft_probe:
                        probe = await clients.call("probe", args.repeats, args.probe_samples, long_prompt, progress)
                    drafter = clients.server.drafter
            completed += 1
    except Exception as exc:  # what was measured before is reported, marked incomplete
        if not rounds:
            raise
        failure = f"{type(exc).__name__}: {exc}"
        progress(f"stopped early, after {completed} of {args.repeats} repeats: {failure}")
    report = _report(args, rounds, probe, parts.raw_batch)
    if failure is not None:
        report.update(error=failure, repeats_completed=completed)
    info = parts.target.info
    report.update(
        model=info.model_id,
        backend=info.backend,
        device=",".join(info.devices),
        drafter=drafter,
        max_batch_tokens=configs["batched"].engine.max_batch_tokens,
        load_average_before_after=[round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        cpu_count=os.cpu_count(),
    )
    if args.plot is not None:
        plot_throughput(report, args.plot)
        report["plot"] = str(args.plot)
    return report


async def _block(target: Target, args: argparse.Namespace, repeat: int, progress: Callable[[str], None]) -> list[Round]:
    """One policy's rounds of one repeat: every concurrency, both modes (in turn reversed each repeat)."""
    n, label = args.max_new_tokens, f"repeat {repeat + 1}/{args.repeats}, {target.policy}"
    progress(f"{label}: warm-up")
    for mode in MODES:
        await run_round(target, mode, max(args.concurrency), 2)
    rounds = []
    for concurrency in args.concurrency:
        for mode in MODES:  # unmeasured: the first pass of a new batch shape pays one-off set-up costs
            await run_round(target, mode, concurrency, 4)
        for mode in MODES if repeat % 2 == 0 else list(MODES)[::-1]:
            result = await run_round(target, mode, concurrency, n, repeat)
            progress(f"{label}, {mode}, {concurrency} streams: {result.tokens / result.wall_s:.1f} tokens/s")
            rounds.append(result)
    return rounds


COMMANDS: dict[str, Callable[..., Any]] = {"block": _block, "probe": run_probe}  # what the client process runs


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def _point(rounds: list[Round]) -> dict[str, Any]:
    first = rounds[0]
    point: dict[str, Any] = {"policy": first.policy, "mode": first.mode, "concurrency": first.concurrency}
    per_round = [r.metrics() for r in rounds]
    for name in per_round[0]:
        values = [v for m in per_round if (v := m[name]) is not None]
        point[name] = _spread(values) if values else None
    drafted = sum(s.num_draft_tokens for r in rounds for s in r.streams)
    accepted = sum(s.num_accepted_tokens for r in rounds for s in r.streams)
    point["acceptance_rate"] = round(accepted / drafted, 4) if drafted else None
    point["draft_tokens_per_stream"] = round(drafted / sum(len(r.streams) for r in rounds), 2)
    point["passes"] = pass_summary([p for r in rounds for p in r.passes])
    point["first_passes"] = [[size, tokens, round(ms, 2)] for size, tokens, ms in first.passes[:FIRST_PASSES]]
    return point


def _greedy_mismatches(rounds: list[Round]) -> list[dict[str, Any]]:
    """Streams whose greedy tokens differ from the first stream seen on the same prompt (where they part)."""
    reference: dict[int, list[int]] = {}
    mismatches = []
    for r in rounds:
        for index, s in enumerate(r.streams):
            expected = reference.setdefault(index, s.token_ids)
            if s.token_ids != expected:
                at = next((i for i, (a, b) in enumerate(zip(s.token_ids, expected, strict=False)) if a != b), None)
                mismatches.append(
                    {"policy": r.policy, "mode": r.mode, "concurrency": r.concurrency, "repeat": r.repeat,
                     "stream": index, "first_difference_at": at}
                )  # fmt: skip
    return mismatches


def _report(args: argparse.Namespace, rounds: list[Round], probe: Any, raw: Any) -> dict[str, Any]:
    grouped: dict[tuple[str, str, int], list[Round]] = {}
    for r in rounds:
        grouped.setdefault((r.policy, r.mode, r.concurrency), []).append(r)
    points = [_point(group) for group in grouped.values()]
    problems = [p for r in rounds for p in check_round(r, args.max_new_tokens)]
    tps = {key: statistics.median(r.tokens / r.wall_s for r in group) for key, group in grouped.items()}

    def ratio(a: tuple[str, str, int], b: tuple[str, str, int]) -> float | None:
        return round(tps[a] / tps[b], 3) if a in tps and b in tps else None

    levels = args.concurrency
    ratios: dict[str, Any] = {
        "batched_8_over_1": {m: ratio(("batched", m, 8), ("batched", m, 1)) for m in MODES},
        "batched_scaling_over_1": {
            m: {str(c): ratio(("batched", m, c), ("batched", m, 1)) for c in levels} for m in MODES
        },
        "batched_over_round_robin": {
            m: {str(c): ratio(("batched", m, c), ("round_robin", m, c)) for c in levels} for m in MODES
        },
        "auto_over_off": {p: {str(c): ratio((p, "auto", c), (p, "off", c)) for c in levels} for p in POLICIES},
    }
    if probe is not None:
        for name in ("under_load", "long_prefill"):  # the goal: p99 under load <= 2x the idle median
            ratios[f"ttft_{name}_p99_over_idle"] = probe.get(f"{name}_p99_over_idle")
            ratios[f"ttft_{name}_p50_over_idle"] = probe.get(f"{name}_p50_over_idle")
    return {
        "benchmark": "batch",
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "concurrency": list(levels),
        "max_active_requests": MAX_ACTIVE_REQUESTS,
        "every_stream_exact": not problems,
        "stream_problems": problems,
        "greedy_mismatches": _greedy_mismatches(rounds),
        "ratios": ratios,
        "points": points,
        "ttft_probe": probe,
        "raw_batch": raw,
    }


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    """Aggregate tokens/s against concurrency, one line per policy and mode (bars: min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for policy in POLICIES:
        for mode in MODES:
            points = [p for p in report["points"] if p["policy"] == policy and p["mode"] == mode]
            levels = [p["concurrency"] for p in points]
            rates = [p["tokens_per_s"] for p in points]
            medians = [r["median"] for r in rates]
            errors = [
                [m - r["min"] for m, r in zip(medians, rates, strict=True)],
                [r["max"] - m for m, r in zip(medians, rates, strict=True)],
            ]
            style = "-" if policy == "batched" else "--"
            axis.errorbar(
                levels, medians, yerr=errors, fmt=style + "o", capsize=3, label=f"{policy}, speculation {mode}"
            )
    raw = report.get("raw_batch")
    if raw:
        sizes = sorted(int(b) for b in raw["tokens_per_s"])
        axis.plot(sizes, [raw["tokens_per_s"][str(b)] for b in sizes], ":k", label="ExLlamaV2 forward, raw")
    axis.set_xscale("log", base=2)
    axis.set_xticks(report["concurrency"], [str(c) for c in report["concurrency"]])
    axis.set_xlabel("concurrent streams")
    axis.set_ylabel("aggregate tokens/s")
    axis.set_ylim(bottom=0)
    axis.set_title(f"{report['model']} on {report['device']}, {report['max_new_tokens']} greedy tokens per stream")
    axis.grid(alpha=0.3)
    axis.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
