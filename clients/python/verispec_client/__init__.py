"""Python client of verispec.v1: sync and asyncio wrappers around the generated stubs."""

from verispec_client.client import (
    DEFAULT_SERVICE_CONFIG,
    AsyncVerispecClient,
    VerispecClient,
    build_request,
    build_tokenize_request,
    channel_credentials,
    channel_options,
    error_details,
)

__all__ = [
    "DEFAULT_SERVICE_CONFIG",
    "AsyncVerispecClient",
    "VerispecClient",
    "build_request",
    "build_tokenize_request",
    "channel_credentials",
    "channel_options",
    "error_details",
]
