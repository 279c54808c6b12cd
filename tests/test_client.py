"""The Python client package against the real server: sync and asyncio, unary and streaming."""

from __future__ import annotations

import asyncio
import inspect
import json
import time

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from tests.conftest import RunningServer
from verispec_client import AsyncVerispecClient, VerispecClient, build_request, channel_options, error_details
from verispec_proto.v1 import generation_pb2 as pb

FRANCE = [("user", "What is the capital of France?")]


def test_sync_client(server: RunningServer) -> None:
    with VerispecClient(server.address, timeout=60) as client:
        reply = client.generate(messages=FRANCE, max_new_tokens=16)
        assert "Paris" in reply.text
        deltas = list(client.stream(messages=FRANCE, max_new_tokens=16))
        assert "".join(d.text for d in deltas) == reply.text
        assert client.health().status == pb.SERVING_STATUS_SERVING
        assert client.info().vocab_size == 49152
        assert client.tokenize("Hello").count > 0


def test_async_client(server: RunningServer) -> None:
    async def scenario() -> tuple[str, str, int, pb.TokenizeResponse, int]:
        async with AsyncVerispecClient(server.address, timeout=60) as client:
            reply = await client.generate(messages=FRANCE, max_new_tokens=16)
            streamed = [d async for d in client.stream(messages=FRANCE, max_new_tokens=16)]
            health = await client.health()
            tokens = await client.tokenize(messages=FRANCE, return_tokens=True)
            return reply.text, "".join(d.text for d in streamed), health.status, tokens, reply.usage.prompt_tokens

    unary, streamed, status, tokens, prompt_tokens = asyncio.run(scenario())
    assert "Paris" in unary and streamed == unary
    assert status == pb.SERVING_STATUS_SERVING
    assert tokens.count == prompt_tokens == len(tokens.tokens) == len(tokens.token_ids)


def test_async_client_has_the_sync_clients_methods() -> None:
    def methods(cls: type) -> dict[str, list[str]]:
        return {
            name: list(inspect.signature(member).parameters)
            for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member)
        }

    assert methods(AsyncVerispecClient) == methods(VerispecClient)
    assert list(inspect.signature(AsyncVerispecClient).parameters) == list(inspect.signature(VerispecClient).parameters)


def test_default_service_config_balances_per_call_and_retries_unavailable() -> None:
    [option] = channel_options()
    assert option[0] == "grpc.service_config"
    config = json.loads(option[1])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert method["name"] == [{"service": "verispec.v1.GenerationService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert channel_options(None, [("grpc.lb_policy_name", "pick_first")]) == [("grpc.lb_policy_name", "pick_first")]


def test_build_request_maps_flat_options() -> None:
    request = build_request(
        "hi",
        max_new_tokens=5,
        temperature=0.5,
        seed=3,
        logprobs=True,
        speculation="ngram",
        num_draft_tokens=2,
        top_p=None,
    )
    assert request.sampling.temperature == 0.5 and request.sampling.seed == 3
    assert not request.sampling.HasField("top_p"), "None leaves a field unset"
    assert request.response.logprobs
    assert request.speculation.mode == pb.SPECULATION_MODE_NGRAM
    with pytest.raises(TypeError, match="unknown option"):
        build_request("hi", temprature=0.5)
    with pytest.raises(ValueError, match="speculation must be one of"):
        build_request("hi", speculation="fast")


def test_health_reports_load(server: RunningServer) -> None:
    """Health's load: 0 when idle; with a request running, the larger of KV use and the share of slots."""
    with VerispecClient(server.address, timeout=60) as client:
        deadline = time.monotonic() + 10  # requests of earlier tests may still be finishing
        while (idle := client.health()).active_requests + idle.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle.load == idle.kv_utilization == 0
        limit = server.server.config.engine.max_active_requests
        stream = client.stream("Tell a long story.", max_new_tokens=32, min_new_tokens=32)
        next(stream)
        health = client.health()
        list(stream)
    assert health.active_requests + health.queue_depth >= 1
    expected = max(health.kv_utilization, (health.active_requests + health.queue_depth) / limit)
    assert health.load == pytest.approx(expected) and health.load > 0


def test_error_details_decode_the_google_rpc_status(server: RunningServer) -> None:
    """A bad field comes back as INVALID_ARGUMENT with a BadRequest naming it, from either client."""
    with VerispecClient(server.address, timeout=60) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("hi", temperature=-0.5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad] = error_details(info.value)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "sampling.temperature"

    async def scenario() -> list[Message]:
        async with AsyncVerispecClient(server.address, timeout=60) as client:
            try:
                await client.generate("hi", top_p=1.5)
            except grpc.RpcError as exc:
                return error_details(exc)
        raise AssertionError("the call succeeded")

    [bad] = asyncio.run(scenario())
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "sampling.top_p"
    assert error_details(grpc.RpcError()) == []
