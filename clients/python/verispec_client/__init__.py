"""Python client of verispec.v1: sync and asyncio wrappers around the generated stubs."""

from verispec_client.client import AsyncVerispecClient, VerispecClient, build_request, channel_credentials

__all__ = ["AsyncVerispecClient", "VerispecClient", "build_request", "channel_credentials"]
