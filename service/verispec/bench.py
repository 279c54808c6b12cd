"""`verispec bench`: measurements printed as JSON (service overhead now; more kinds as they land)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

OVERHEAD_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="bench", required=True)
    overhead = kinds.add_parser(
        "overhead",
        help="tokens/s of one greedy request through the gRPC stream vs the backend driven directly",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    overhead.add_argument("--model", default=None, help="target model (default: the embedded model)")
    overhead.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per run")
    overhead.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved")
    overhead.add_argument("--output", type=Path, default=None, help="also write the JSON here")


def run_bench(args: argparse.Namespace) -> int:
    from verispec import telemetry
    from verispec.config import TelemetryConfig

    telemetry.configure_logging(TelemetryConfig(log_level="warning"))
    if args.bench == "overhead":
        result = asyncio.run(_overhead(args))
    else:  # pragma: no cover - argparse only accepts the kinds above
        raise SystemExit(f"unknown benchmark {args.bench}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def direct_greedy(backend: Any, prompt_ids: list[int], num_tokens: int, suppress: list[int]) -> float:
    """Seconds for plain greedy decoding of num_tokens straight on the backend (end-of-sequence masked)."""
    cache = backend.new_cache()
    try:
        start = time.perf_counter()
        logits = backend.forward(cache, prompt_ids, 1)
        for _ in range(num_tokens - 1):
            logits[:, suppress] = float("-inf")
            token = int(logits[0].argmax())
            logits = backend.forward(cache, [token], 1)
        return time.perf_counter() - start
    finally:
        backend.free(cache)


async def _overhead(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from verispec.api.server import Server
    from verispec.config import DEFAULT_MODEL, config_from_argv
    from verispec.loader import load
    from verispec.v1 import generation_pb2 as pb
    from verispec.v1 import generation_pb2_grpc as pb_grpc

    config = config_from_argv(
        [
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--model",
            args.model or DEFAULT_MODEL,
            "--speculation",
            "off",
            "--step-spans",
            "off",
        ]
    )
    _progress("loading the model")
    models = await asyncio.to_thread(load, config)
    server = Server(config)
    port = await server.start()
    await server.load(lambda _: models)
    backend = models.engine.core.backend
    prompt_ids = models.tokenizer.encode(OVERHEAD_PROMPT)
    suppress = sorted(models.tokenizer.eos_token_ids)
    n = args.max_new_tokens
    request = pb.StreamGenerateRequest(
        prompt=OVERHEAD_PROMPT,
        max_new_tokens=n,
        min_new_tokens=n,
        speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_OFF),
    )
    direct_s: list[float] = []
    service_s: list[float] = []
    ttft_s: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await _stream(stub, request)  # warm-up of both paths
        for i in range(args.repeats):
            _progress(f"run {i + 1}/{args.repeats}: direct")
            direct_s.append(await asyncio.to_thread(direct_greedy, backend, prompt_ids, n, suppress))
            _progress(f"run {i + 1}/{args.repeats}: gRPC stream")
            elapsed, first, count = await _stream(stub, request)
            assert count == n, f"the service generated {count} tokens, expected {n}"
            service_s.append(elapsed)
            ttft_s.append(first)
    await server.stop(0)
    direct_tps = n / statistics.median(direct_s)
    service_tps = n / statistics.median(service_s)
    return {
        "benchmark": "overhead",
        "model": models.target.model_id,
        "device": ",".join(models.target.devices),
        "max_new_tokens": n,
        "repeats": args.repeats,
        "direct_tokens_per_s": round(direct_tps, 2),
        "grpc_stream_tokens_per_s": round(service_tps, 2),
        "ratio": round(service_tps / direct_tps, 4),
        "grpc_ttft_ms_median": round(1000 * statistics.median(ttft_s), 1),
        "direct_s": [round(s, 3) for s in direct_s],
        "grpc_stream_s": [round(s, 3) for s in service_s],
    }


async def _stream(stub: Any, request: Any) -> tuple[float, float, int]:
    """(seconds to the last message, seconds to the first token, tokens received)."""
    start = time.perf_counter()
    first = 0.0
    count = 0
    async for message in stub.StreamGenerate(request):
        if count == 0 and message.token_ids:
            first = time.perf_counter() - start
        count += len(message.token_ids)
    return time.perf_counter() - start, first, count
