"""Sync and asyncio clients: build a request from keyword options, call the generated stubs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# Calls are balanced one by one over every address the target resolves to (a headless Service's pods
# behind `dns:///name:port`, or an `ipv4:a:port,b:port` list), not pinned to one connection; a call
# refused with UNAVAILABLE (a replica draining or restarting: refused before any work) is retried on
# another address. Streams are retried only before their first message, as gRPC retries always are.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}
SPECULATION_MODES = {
    "auto": pb.SPECULATION_MODE_AUTO,
    "off": pb.SPECULATION_MODE_OFF,
    "draft_model": pb.SPECULATION_MODE_DRAFT_MODEL,
    "ngram": pb.SPECULATION_MODE_NGRAM,
}
SAMPLING_FIELDS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
_RESPONSE_FIELDS = ("logprobs", "top_logprobs", "echo_input_tokens", "include_stop_sequence")


def build_request(
    prompt: str = "",
    messages: Sequence[tuple[str, str]] = (),
    *,
    max_new_tokens: int = 0,
    min_new_tokens: int = 0,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    time_limit_ms: int = 0,
    truncate_input_tokens: int = 0,
    speculation: str | None = None,
    num_draft_tokens: int = 0,
    **options: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from keyword options; sampling and response options are passed flat
    (temperature=0.7, seed=1, logprobs=True, ...). None values are left unset."""
    unknown = set(options) - set(SAMPLING_FIELDS) - set(_RESPONSE_FIELDS)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    sampling = {k: v for k, v in options.items() if k in SAMPLING_FIELDS and v is not None}
    response = {k: v for k, v in options.items() if k in _RESPONSE_FIELDS and v is not None}
    spec = pb.SpeculationParams(num_draft_tokens=num_draft_tokens)
    if speculation is not None:
        if speculation not in SPECULATION_MODES:
            raise ValueError(f"speculation must be one of {', '.join(SPECULATION_MODES)}, got {speculation!r}")
        spec.mode = SPECULATION_MODES[speculation]
    return pb.GenerateRequest(
        prompt=prompt,
        messages=[pb.ChatMessage(role=role, content=content) for role, content in messages],
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        time_limit_ms=time_limit_ms,
        truncate_input_tokens=truncate_input_tokens,
        sampling=pb.SamplingParams(**sampling),
        response=pb.ResponseOptions(**response),
        speculation=spec,
    )


_DETAIL_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.RequestInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}


def error_details(error: grpc.RpcError) -> list[Message]:
    """The google.rpc details a failed call carries, decoded: a BadRequest naming the invalid field, the
    RetryInfo of a full queue, ... (empty when it carries none). Works for sync and asyncio errors."""
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == "grpc-status-details-bin":
            details = []
            for detail in status_pb2.Status.FromString(value).details:
                cls = _DETAIL_TYPES.get(detail.TypeName())
                if cls is not None:
                    message = cls()
                    detail.Unpack(message)
                    details.append(message)
            return details
    return []


def build_tokenize_request(
    text: str = "", messages: Sequence[tuple[str, str]] = (), return_tokens: bool = False
) -> pb.TokenizeRequest:
    """A TokenizeRequest for a text or a conversation."""
    return pb.TokenizeRequest(
        text=text, messages=[pb.ChatMessage(role=r, content=c) for r, c in messages], return_tokens=return_tokens
    )


def channel_credentials(
    tls_ca: Path | None = None, tls_cert: Path | None = None, tls_key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from PEM files (a client certificate for mTLS); None for plaintext."""
    if tls_ca is None and tls_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes() if tls_ca else None,
        private_key=tls_key.read_bytes() if tls_key else None,
        certificate_chain=tls_cert.read_bytes() if tls_cert else None,
    )


def channel_options(
    service_config: dict[str, Any] | None = DEFAULT_SERVICE_CONFIG, options: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Channel arguments: the service config (balancing and retries; None: gRPC's own defaults, one
    connection, pick_first) and any extra `grpc.*` arguments, which come last and win."""
    base = [] if service_config is None else [("grpc.service_config", json.dumps(service_config))]
    return [*base, *options]


def _open(
    flavour: Any, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> Any:
    """A channel from `grpc` or `grpc.aio`: TLS when credentials are given, plaintext otherwise."""
    if credentials is None:
        return flavour.insecure_channel(target, options=options)
    return flavour.secure_channel(target, credentials, options=options)


def _metadata(metadata: Sequence[tuple[str, str]], token: str | None) -> tuple[tuple[str, str], ...]:
    return (*metadata, ("authorization", f"Bearer {token}")) if token else tuple(metadata)


def as_stream_request(request: pb.GenerateRequest) -> pb.StreamGenerateRequest:
    """The same request for StreamGenerate (the two messages share their field numbers)."""
    return pb.StreamGenerateRequest.FromString(request.SerializeToString())


class VerispecClient:
    """Blocking client; use as a context manager or call close().

    `target` is any gRPC target: `host:port`, `dns:///name:port` (every address the name resolves to),
    `ipv4:a:port,b:port`. `service_config` sets balancing and retries (DEFAULT_SERVICE_CONFIG: round_robin
    per call, UNAVAILABLE retried); `options` are extra channel arguments."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        service_config: dict[str, Any] | None = DEFAULT_SERVICE_CONFIG,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel = _open(grpc, target, credentials, channel_options(service_config, options))
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self.timeout = timeout
        self.metadata = _metadata(metadata, token)

    def generate(
        self, prompt: str = "", messages: Sequence[tuple[str, str]] = (), **options: Any
    ) -> pb.GenerateResponse:
        request = build_request(prompt, messages, **options)
        response: pb.GenerateResponse = self._stub.Generate(request, timeout=self.timeout, metadata=self.metadata)
        return response

    def stream(
        self, prompt: str = "", messages: Sequence[tuple[str, str]] = (), **options: Any
    ) -> Iterator[pb.StreamGenerateResponse]:
        request = as_stream_request(build_request(prompt, messages, **options))
        yield from self._stub.StreamGenerate(request, timeout=self.timeout, metadata=self.metadata)

    def health(self) -> pb.HealthResponse:
        response: pb.HealthResponse = self._stub.Health(
            pb.HealthRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return response

    def info(self) -> pb.ModelInfoResponse:
        response: pb.ModelInfoResponse = self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return response

    def tokenize(
        self, text: str = "", messages: Sequence[tuple[str, str]] = (), return_tokens: bool = False
    ) -> pb.TokenizeResponse:
        request = build_tokenize_request(text, messages, return_tokens)
        response: pb.TokenizeResponse = self._stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)
        return response

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, e.g. for grpc.channel_ready_future()."""
        channel: grpc.Channel = self._channel
        return channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> VerispecClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncVerispecClient:
    """asyncio client, with the same methods and arguments as VerispecClient; use with `async with` or
    await close()."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        service_config: dict[str, Any] | None = DEFAULT_SERVICE_CONFIG,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel = _open(grpc.aio, target, credentials, channel_options(service_config, options))
        self._stub = pb_grpc.GenerationServiceStub(self._channel)
        self.timeout = timeout
        self.metadata = _metadata(metadata, token)

    async def generate(
        self, prompt: str = "", messages: Sequence[tuple[str, str]] = (), **options: Any
    ) -> pb.GenerateResponse:
        request = build_request(prompt, messages, **options)
        response: pb.GenerateResponse = await self._stub.Generate(request, timeout=self.timeout, metadata=self.metadata)
        return response

    async def stream(
        self, prompt: str = "", messages: Sequence[tuple[str, str]] = (), **options: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        request = as_stream_request(build_request(prompt, messages, **options))
        call = self._stub.StreamGenerate(request, timeout=self.timeout, metadata=self.metadata)
        async for message in call:
            yield message

    async def health(self) -> pb.HealthResponse:
        response: pb.HealthResponse = await self._stub.Health(
            pb.HealthRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return response

    async def info(self) -> pb.ModelInfoResponse:
        response: pb.ModelInfoResponse = await self._stub.ModelInfo(
            pb.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return response

    async def tokenize(
        self, text: str = "", messages: Sequence[tuple[str, str]] = (), return_tokens: bool = False
    ) -> pb.TokenizeResponse:
        request = build_tokenize_request(text, messages, return_tokens)
        response: pb.TokenizeResponse = await self._stub.Tokenize(request, timeout=self.timeout, metadata=self.metadata)
        return response

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, e.g. to await channel_ready()."""
        channel: grpc.aio.Channel = self._channel
        return channel

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncVerispecClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
