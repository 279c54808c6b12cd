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
The clients (streams, rounds, latency arithmetic) are in `bench_batch_clients`, the probe in `bench_batch_probe`;
here are the ceiling, the set-up (one engine and server at a time, the client process), the run and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import multiprocessing
import os
import statistics
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import grpc

from verispec.tools.bench_batch_clients import (
    MODES,
    BatchCounts,
    Round,
    Target,
    check_round,
    pass_summary,
    run_round,
    spread,
)
from verispec.tools.bench_batch_probe import long_prompt_text, run_probe
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

T = TypeVar("T")
POLICIES = ("batched", "round_robin")
MAX_ACTIVE_REQUESTS = 32
FIRST_PASSES = 12  # passes of a point's first round listed in the report (sequences, tokens, ms): its ramp-up


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


def _point(rounds: list[Round]) -> dict[str, Any]:
    first = rounds[0]
    point: dict[str, Any] = {"policy": first.policy, "mode": first.mode, "concurrency": first.concurrency}
    per_round = [r.metrics() for r in rounds]
    for name in per_round[0]:
        values = [v for m in per_round if (v := m[name]) is not None]
        point[name] = spread(values) if values else None
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
