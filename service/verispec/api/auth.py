"""Bearer-token authentication as a server interceptor, and TLS credentials from files."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from verispec.errors import ConfigError

# Probes and service discovery stay open unless the operator protects them too.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_DENIED = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"


def load_tokens(path: Path | None, inline: str) -> tuple[str, ...]:
    """Tokens from a file (one per line, '#' comments) and a comma-separated list; empty: auth off."""
    tokens = [t.strip() for t in inline.split(",") if t.strip()]
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError("--auth-tokens-file", f"cannot read {path}: {exc.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return tuple(tokens)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through when its `authorization` metadata carries one of the tokens.

    Tokens are compared in constant time, and neither they nor the metadata are ever logged.
    """

    def __init__(self, tokens: Sequence[str], open_services: Sequence[str] = OPEN_SERVICES) -> None:
        self._tokens = [t.encode() for t in tokens]
        self._open = tuple(open_services)

    def authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str) or not values[0].startswith("Bearer "):
            return False
        offered = values[0].removeprefix("Bearer ").encode()
        # Compare against every token so the time taken does not reveal which one matched.
        matches = [hmac.compare_digest(offered, token) for token in self._tokens]
        return any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        if self.authorized(details.invocation_metadata):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED."""

    # The status is set, not raised with context.abort: an abort would keep the stranger's request in a
    # reference cycle until the collector's next full pass (see status.refuse).
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(_DENIED)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        context.set_code(grpc.StatusCode.UNAUTHENTICATED)
        context.set_details(_DENIED)
        return
        yield  # pragma: no cover - makes this an async generator that yields nothing

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.unary_unary_rpc_method_handler(deny, **codec)


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS from PEM files; with a client CA, clients must present a certificate it signed (mTLS)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca", "needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert" if cert is None else "--tls-key", "TLS needs both --tls-cert and --tls-key")
    pem = {}
    for setting, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None:
            try:
                pem[setting] = path.read_bytes()
            except OSError as exc:
                raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(pem["--tls-key"], pem["--tls-cert"])],
        root_certificates=pem.get("--tls-client-ca"),
        require_client_auth=client_ca is not None,
    )
