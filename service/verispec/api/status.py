"""Domain errors -> gRPC status codes with google.rpc details, in one place."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from verispec.errors import (
    CapacityError,
    EngineDeadError,
    InvalidRequestError,
    NotReadyError,
    OverloadedError,
    VerispecError,
)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(exc: VerispecError) -> grpc.Status:
    """The rich status a caller sees for a domain error."""
    details: list[any_pb2.Any] = []
    if isinstance(exc, InvalidRequestError):
        code = code_pb2.INVALID_ARGUMENT
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    elif isinstance(exc, OverloadedError):
        code = code_pb2.RESOURCE_EXHAUSTED
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(exc.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    elif isinstance(exc, CapacityError):
        code = code_pb2.RESOURCE_EXHAUSTED  # no RetryInfo: the same request will never fit
    elif isinstance(exc, NotReadyError | EngineDeadError):
        code = code_pb2.UNAVAILABLE
    else:
        code = code_pb2.INTERNAL
    return rpc_status.to_status(status_pb2.Status(code=code, message=str(exc), details=details))


def internal(message: str) -> grpc.Status:
    """INTERNAL for a request the engine failed while serving."""
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=message))


def deadline_exceeded(message: str) -> grpc.Status:
    """DEADLINE_EXCEEDED for a request the engine stopped at the caller's deadline."""
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message=message))


async def refuse(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """Makes `status` the call's outcome; the handler then returns (grpc discards a non-OK call's response).

    Not context.abort, except for UNAVAILABLE: the AbortError it raises is also kept on the call's state,
    so the error, its traceback and the call form a reference cycle through every frame on the way, each
    holding the request. Only the collector's next full pass frees such a cycle: until then a refused
    4 MiB prompt stayed in memory (~30 MiB a round of 24 refused prompts).

    UNAVAILABLE (draining, still loading: refused before any work) is the status clients retry on another
    replica, and grpc retries only a call that got no response headers: a handler that returns sends its
    (discarded) response message with them, an abort sends the status alone. Those refusals hold no large
    request worth the cycle, so they abort.
    """
    if status.code == grpc.StatusCode.UNAVAILABLE:
        await context.abort(status.code, status.details, status.trailing_metadata)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
