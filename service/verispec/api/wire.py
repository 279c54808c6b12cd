"""Request decoding that turns malformed bytes into INVALID_ARGUMENT naming the field.

grpc answers UNKNOWN when a request fails to parse. This interceptor parses requests itself; on a
failure it re-reads the bytes with a twin of the message whose string fields are bytes, finds the
field that is not UTF-8, and rejects the call with a google.rpc.BadRequest naming it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from verispec.api.status import refuse, to_status
from verispec.errors import InvalidRequestError

_TWIN_PACKAGE = "verispec_wire_twin"


class _Malformed:
    """Stands in for a request that did not parse."""

    def __init__(self, error: InvalidRequestError) -> None:
        self.error = error


@functools.cache
def _bytes_twin(descriptor: Any) -> type[Message]:
    """A message class with `descriptor`'s wire layout, every string field made bytes."""
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.file.CopyToProto(proto)
    old_package = proto.package
    proto.name = f"{_TWIN_PACKAGE}/{proto.name}"
    proto.package = f"{_TWIN_PACKAGE}.{old_package}"
    proto.ClearField("service")

    def retype(messages: Any) -> None:
        for message in messages:
            for field in message.field:
                if field.type == FieldDescriptor.TYPE_STRING:
                    field.type = FieldDescriptor.TYPE_BYTES
                if field.type_name.startswith(f".{old_package}."):
                    field.type_name = f".{_TWIN_PACKAGE}{field.type_name}"
            retype(message.nested_type)

    retype(proto.message_type)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    twin = pool.FindMessageTypeByName(f"{_TWIN_PACKAGE}.{descriptor.full_name}")
    return message_factory.GetMessageClass(twin)


def _bad_utf8_field(message: Message, original: Any, prefix: str = "") -> str | None:
    """The path of the first string field (per `original`) whose bytes are not UTF-8."""
    for field, value in message.ListFields():
        kind = original.fields_by_name[field.name]
        path = f"{prefix}{field.name}"
        items = list(value) if kind.is_repeated else [value]
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]" if kind.is_repeated else path
            if kind.type == FieldDescriptor.TYPE_STRING:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return item_path
            elif kind.type == FieldDescriptor.TYPE_MESSAGE:
                found = _bad_utf8_field(item, kind.message_type, f"{item_path}.")
                if found:
                    return found
    return None


def diagnose(data: bytes, message_class: type[Message]) -> InvalidRequestError:
    """Why `data` does not parse as `message_class`, naming the field where it can."""
    descriptor = message_class.DESCRIPTOR
    try:
        twin = _bytes_twin(descriptor).FromString(data)
    except DecodeError:
        return InvalidRequestError("request", f"not a valid {descriptor.full_name} message")
    field = _bad_utf8_field(twin, descriptor)
    if field is None:
        return InvalidRequestError("request", f"not a valid {descriptor.full_name} message")
    return InvalidRequestError(field, "is not valid UTF-8")


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_class = getattr(deserializer, "__self__", None)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            if isinstance(message_class, type) and issubclass(message_class, Message):
                return _Malformed(diagnose(data, message_class))
            return _Malformed(InvalidRequestError("request", "malformed message"))

    return parse


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parses unary requests leniently so malformed ones get INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, prefix: str = "/verispec.v1.") -> None:
        self.prefix = prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        # Only verispec's own methods: they are all unary-request, and their streams are generators.
        if handler is None or not details.method.startswith(self.prefix) or handler.request_streaming:
            return handler
        codec = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, _Malformed):
                    await refuse(context, to_status(request.error))  # set, not raised: see status.refuse
                    return None
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **codec)
        streaming = handler.unary_stream

        # A coroutine that writes (as the servicer's streams are), so a reset stream unwinds in its task.
        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if isinstance(request, _Malformed):
                await refuse(context, to_status(request.error))
                return
            if inspect.isasyncgenfunction(streaming):
                async with contextlib.aclosing(streaming(request, context)) as responses:
                    async for response in responses:
                        await context.write(response)
            else:
                await streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(stream, **codec)
