"""`verispec-client`: generate (streaming to the terminal), health, info, tokenize."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from verispec_client.client import (
    DEFAULT_TARGET,
    SAMPLING_FIELDS,
    SPECULATION_MODES,
    VerispecClient,
    channel_credentials,
)
from verispec_proto.v1 import generation_pb2 as pb


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verispec-client", description="Call a verispec server.")
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help="gRPC target: host:port, dns:///name:port, ipv4:a:port,b:port"
    )
    parser.add_argument("--timeout", type=float, default=None, help="deadline per call in seconds")
    parser.add_argument(
        "--token", default=os.environ.get("VERISPEC_TOKEN"), help="bearer token (default: $VERISPEC_TOKEN)"
    )
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA to verify the server: use TLS")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM key of --tls-cert")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate", help="generate text for a prompt", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    gen.add_argument("prompt", help="the prompt (with --chat: the user message)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--system", default=None, help="system message (implies --chat)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--json", action="store_true", help="print the whole response(s) as JSON")
    gen.add_argument("--max-new-tokens", type=int, default=0, help="0: the server default")
    gen.add_argument("--min-new-tokens", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--typical-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--presence-penalty", type=float, default=None)
    gen.add_argument("--frequency-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--logprobs", action="store_true", default=None)
    gen.add_argument("--top-logprobs", type=int, default=None)
    gen.add_argument("--time-limit-ms", type=int, default=0)
    gen.add_argument("--speculation", choices=sorted(SPECULATION_MODES), default=None, help="unset: the server default")
    gen.add_argument("--num-draft-tokens", type=int, default=0, help="0: the server default")

    commands.add_parser("health", help="deep health of the service")
    commands.add_parser("info", help="models and defaults")
    tok = commands.add_parser("tokenize", help="token ids of a text")
    tok.add_argument("text")
    return parser


def _print_json(message: Message) -> None:
    print(json_format.MessageToJson(message, preserving_proto_field_name=True))


def _generate(client: VerispecClient, args: argparse.Namespace) -> None:
    messages: list[tuple[str, str]] = []
    if args.chat or args.system is not None:
        if args.system is not None:
            messages.append(("system", args.system))
        messages.append(("user", args.prompt))
    options = {name: getattr(args, name) for name in (*SAMPLING_FIELDS, "logprobs", "top_logprobs")}
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        stop=args.stop,
        time_limit_ms=args.time_limit_ms,
        speculation=args.speculation,
        num_draft_tokens=args.num_draft_tokens,
        **options,
    )
    prompt = "" if messages else args.prompt
    if not args.stream:
        response = client.generate(prompt, messages, **kwargs)
        if args.json:
            _print_json(response)
        else:
            print(response.text)
            _summary(response.finish_reason, response.usage, response.speculation, None)
        return
    start = time.perf_counter()
    last: pb.StreamGenerateResponse | None = None
    for message in client.stream(prompt, messages, **kwargs):
        if args.json:
            _print_json(message)
        else:
            sys.stdout.write(message.text)
            sys.stdout.flush()
        last = message
    if last is not None and not args.json:
        print()
        _summary(last.finish_reason, last.usage, last.speculation, time.perf_counter() - start)


def _summary(
    reason: pb.FinishReason.ValueType, usage: pb.Usage, spec: pb.SpeculationStats, seconds: float | None
) -> None:
    parts = [
        pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower(),
        f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens",
    ]
    if seconds:
        parts.append(f"{usage.completion_tokens / seconds:.1f} tok/s")
    if spec.num_steps:
        parts.append(
            f"{spec.drafter}: {spec.num_accepted_tokens}/{spec.num_draft_tokens} drafts accepted, "
            f"{spec.mean_accepted_length:.2f} tokens/step"
        )
    print(f"[{'; '.join(parts)}]", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    with VerispecClient(args.target, timeout=args.timeout, token=args.token, credentials=credentials) as client:
        try:
            if args.command == "generate":
                _generate(client, args)
            elif args.command == "health":
                _print_json(client.health())
            elif args.command == "info":
                _print_json(client.info())
            elif args.command == "tokenize":
                _print_json(client.tokenize(args.text, return_tokens=True))
        except grpc.RpcError as exc:
            print(f"verispec-client: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
