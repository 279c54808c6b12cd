"""The contract end to end: a real in-process server with the real embedded model."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tests.conftest import RunningServer, ServerFactory
from verispec.runner.base import available_cpu_bytes
from verispec_proto.v1 import generation_pb2 as pb

FRANCE = [pb.ChatMessage(role="user", content="What is the capital of France?")]
STORY = "Once upon a time, in a small village by the sea,"
# Keys and values of 30 layers x 3 KV heads x head_dim 64, float32.
SMOLLM2_KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


def greedy(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


def stream_of(request: pb.GenerateRequest) -> pb.StreamGenerateRequest:
    return pb.StreamGenerateRequest.FromString(request.SerializeToString())


def test_chat_greedy_answers_paris(server: RunningServer) -> None:
    """A greedy chat request about France's capital names Paris and ends at end-of-sequence."""
    response = server.stub.Generate(greedy(messages=FRANCE, max_new_tokens=32))
    assert "Paris" in response.text
    assert response.finish_reason == pb.FINISH_REASON_EOS
    assert response.usage.completion_tokens == len(response.token_ids)
    assert response.usage.prompt_tokens > 0
    assert response.request_id


def test_stream_concatenation_equals_unary(server: RunningServer) -> None:
    """The streamed deltas of a greedy request add up to the unary text, token for token."""
    request = greedy(prompt=STORY, max_new_tokens=40)
    unary = server.stub.Generate(request)
    messages = list(server.stub.StreamGenerate(stream_of(request)))
    assert "".join(m.text for m in messages) == unary.text
    assert [t for m in messages for t in m.token_ids] == list(unary.token_ids)
    finals = [m for m in messages if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert finals == [messages[-1]], "exactly one final message, and it is the last"
    assert messages[-1].usage.completion_tokens == len(unary.token_ids)


def test_same_seed_same_text(server: RunningServer) -> None:
    """Sampling with a given seed is reproducible; the seed is echoed back."""
    sampling = pb.SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    request = greedy(prompt=STORY, max_new_tokens=24, sampling=sampling)
    first = server.stub.Generate(request)
    second = server.stub.Generate(request)
    assert first.text == second.text and first.token_ids == second.token_ids
    assert first.seed == 1234
    other = server.stub.Generate(
        greedy(prompt=STORY, max_new_tokens=24, sampling=pb.SamplingParams(temperature=0.9, top_p=0.95, seed=99))
    )
    assert other.token_ids != first.token_ids, "a different seed gives a different sample"


def test_unset_seed_is_returned_and_replays(server: RunningServer) -> None:
    """Without a seed the server picks one; sending it back reproduces the text."""
    sampling = pb.SamplingParams(temperature=1.0)
    first = server.stub.Generate(greedy(prompt=STORY, max_new_tokens=16, sampling=sampling))
    assert first.seed != 0
    sampling.seed = first.seed
    again = server.stub.Generate(greedy(prompt=STORY, max_new_tokens=16, sampling=sampling))
    assert again.token_ids == first.token_ids


def test_stop_sequence_ends_generation(server: RunningServer) -> None:
    """A stop sequence found in the text ends generation; it is left out of the text by default."""
    response = server.stub.Generate(greedy(messages=FRANCE, max_new_tokens=32, stop=[" Paris"]))
    assert response.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert response.stop_sequence == " Paris"
    assert "Paris" not in response.text
    assert response.text.startswith("The capital of France is")
    kept = server.stub.Generate(
        greedy(
            messages=FRANCE,
            max_new_tokens=32,
            stop=[" Paris"],
            response=pb.ResponseOptions(include_stop_sequence=True),
        )
    )
    assert kept.text.endswith(" Paris")


def test_stop_sequence_across_tokens_in_stream(server: RunningServer) -> None:
    """A stop sequence spanning token boundaries is never streamed, even partly."""
    stop = "of France is Par"
    messages = list(server.stub.StreamGenerate(stream_of(greedy(messages=FRANCE, max_new_tokens=32, stop=[stop]))))
    text = "".join(m.text for m in messages)
    assert messages[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert text == "The capital "
    assert all("of" not in m.text for m in messages[1:]), "no part of the stop sequence was streamed"


def test_max_new_tokens_gives_length(server: RunningServer) -> None:
    response = server.stub.Generate(greedy(prompt=STORY, max_new_tokens=5))
    assert response.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(response.token_ids) == 5


def test_min_new_tokens_suppresses_eos(server: RunningServer) -> None:
    """With min_new_tokens the model cannot end before that many tokens."""
    plain = server.stub.Generate(greedy(messages=FRANCE, max_new_tokens=32))
    forced = server.stub.Generate(greedy(messages=FRANCE, max_new_tokens=32, min_new_tokens=len(plain.token_ids) + 4))
    assert len(forced.token_ids) >= len(plain.token_ids) + 4


def test_stop_token_ids(server: RunningServer) -> None:
    """A stop token id ends generation with FINISH_REASON_STOP_TOKEN."""
    plain = server.stub.Generate(greedy(messages=FRANCE, max_new_tokens=32))
    stop_id = plain.token_ids[2]
    response = server.stub.Generate(greedy(messages=FRANCE, max_new_tokens=32, stop_token_ids=[stop_id]))
    assert response.finish_reason == pb.FINISH_REASON_STOP_TOKEN
    assert list(response.token_ids) == list(plain.token_ids[:3])


def test_logprobs_and_top_logprobs(server: RunningServer) -> None:
    """Greedy tokens are the most likely ones, so each is its own top-1 alternative."""
    response = server.stub.Generate(
        greedy(messages=FRANCE, max_new_tokens=8, response=pb.ResponseOptions(logprobs=True, top_logprobs=3))
    )
    assert len(response.logprobs) == len(response.token_ids)
    for token_id, item in zip(response.token_ids, response.logprobs, strict=True):
        assert item.token_id == token_id
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token_id == token_id
        values = [alt.logprob for alt in item.top_logprobs]
        assert values == sorted(values, reverse=True)


def test_echo_input_tokens_and_truncation(server: RunningServer) -> None:
    """truncate_input_tokens keeps the last n prompt tokens, as echoed back."""
    full = server.stub.Tokenize(pb.TokenizeRequest(text=STORY))
    response = server.stub.Generate(
        greedy(
            prompt=STORY,
            max_new_tokens=2,
            truncate_input_tokens=5,
            response=pb.ResponseOptions(echo_input_tokens=True),
        )
    )
    assert [t.token_id for t in response.input_tokens] == list(full.token_ids[-5:])
    assert response.usage.prompt_tokens == 5


def _bad_request(server: RunningServer, request: pb.GenerateRequest) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(request)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries google.rpc details"
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    return bad.field_violations[0].field, error.details()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "prompt"),
        ({"prompt": "x", "messages": FRANCE}, "prompt"),
        ({"prompt": "x", "sampling": pb.SamplingParams(temperature=float("nan"))}, "sampling.temperature"),
        ({"prompt": "x", "sampling": pb.SamplingParams(temperature=-0.5)}, "sampling.temperature"),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_p=0.0)}, "sampling.top_p"),
        ({"prompt": "x", "sampling": pb.SamplingParams(top_p=1.5)}, "sampling.top_p"),
        ({"prompt": "x", "sampling": pb.SamplingParams(min_p=2.0)}, "sampling.min_p"),
        ({"prompt": "x", "sampling": pb.SamplingParams(typical_p=0.0)}, "sampling.typical_p"),
        (
            {"prompt": "x", "sampling": pb.SamplingParams(repetition_penalty=0.0)},
            "sampling.repetition_penalty",
        ),
        ({"prompt": "x", "sampling": pb.SamplingParams(presence_penalty=3.0)}, "sampling.presence_penalty"),
        (
            {"prompt": "x", "sampling": pb.SamplingParams(frequency_penalty=float("inf"))},
            "sampling.frequency_penalty",
        ),
        ({"prompt": "x", "response": pb.ResponseOptions(top_logprobs=6)}, "response.top_logprobs"),
        ({"prompt": "x", "max_new_tokens": 100_000}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
        ({"prompt": "x", "stop": [""]}, "stop[0]"),
        ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
        ({"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids[0]"),
        ({"messages": [pb.ChatMessage(role="", content="hi")]}, "messages[0].role"),
        ({"prompt": "word " * 9000}, "prompt"),
        (
            {"prompt": "x", "speculation": pb.SpeculationParams(mode=pb.SPECULATION_MODE_DRAFT_MODEL)},
            "speculation.mode",
        ),
    ],
)
def test_invalid_requests_name_the_field(server: RunningServer, fields: dict[str, object], field: str) -> None:
    """Every bad input is INVALID_ARGUMENT with a BadRequest naming the field, and the server lives on."""
    named, message = _bad_request(server, greedy(**fields))
    assert named == field
    assert message.startswith(field)


def test_server_survives_bad_requests(server: RunningServer) -> None:
    """After a burst of bad requests the server still answers."""
    for _ in range(5):
        _bad_request(server, greedy(prompt="x", sampling=pb.SamplingParams(top_p=7)))
    assert server.stub.Generate(greedy(prompt="Hi", max_new_tokens=2)).usage.completion_tokens == 2


def test_long_prompt_accepted_with_truncation(server: RunningServer) -> None:
    """A prompt over the context window is served when truncation is asked for."""
    response = server.stub.Generate(greedy(prompt="word " * 9000, max_new_tokens=1, truncate_input_tokens=64))
    assert response.usage.prompt_tokens == 64


def test_tokenize(server: RunningServer) -> None:
    response = server.stub.Tokenize(pb.TokenizeRequest(text="Hello world", return_tokens=True))
    assert response.count == len(response.token_ids) == len(response.tokens) > 0
    assert "".join(response.tokens).replace("Ġ", " ") == "Hello world"
    chat = server.stub.Tokenize(pb.TokenizeRequest(messages=FRANCE))
    assert chat.count > response.count


def test_model_info(server: RunningServer) -> None:
    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model_id == "smollm2-135m-instruct"
    assert info.backend == "torch_ref"
    assert info.vocab_size == 49152
    assert info.max_context_length == 8192
    assert info.drafter == "ngram"
    assert info.default_speculation_mode == pb.SPECULATION_MODE_AUTO
    assert info.max_num_draft_tokens >= info.default_num_draft_tokens > 0


def test_model_info_describes_the_kv_cache(server: RunningServer) -> None:
    """Page size, pages, bytes per token and their product, as the pool was built; the batching settings."""
    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.kv_page_size == 16
    assert info.kv_pages_total > 0
    assert info.kv_bytes_per_token == SMOLLM2_KV_BYTES_PER_TOKEN
    assert info.kv_cache_bytes == info.kv_pages_total * info.kv_page_size * info.kv_bytes_per_token
    assert info.max_batch_tokens == 256
    assert info.scheduling == "batched"


def test_deep_health(server: RunningServer) -> None:
    server.stub.Generate(greedy(prompt="Hi", max_new_tokens=2))
    # The engine publishes its snapshot after the step that sent the final message: poll briefly.
    health = _health_when(server, lambda h: h.active_requests == 0)
    assert health.status == pb.SERVING_STATUS_SERVING
    assert health.model_loaded and not health.draft_loaded
    assert health.active_requests == 0 and health.queue_depth == 0
    assert 0 <= health.last_step_age_seconds < 60
    assert health.devices[0].device == "cpu" and health.devices[0].used_bytes > 0
    assert health.version
    assert health.batch_size == 1 and health.batch_tokens >= 1, "the last pass stepped the lone request"
    assert health.num_preemptions == 0


def _health_when(server: RunningServer, done: Callable[[pb.HealthResponse], bool]) -> pb.HealthResponse:
    """Health, polled until `done` holds (the engine publishes its snapshot after each step)."""
    deadline = time.monotonic() + 10
    health: pb.HealthResponse = server.stub.Health(pb.HealthRequest())
    while not done(health) and time.monotonic() < deadline:
        time.sleep(0.05)
        health = server.stub.Health(pb.HealthRequest())
    return health


def test_kv_pages_are_held_while_running_and_returned_when_done(server: RunningServer) -> None:
    """A running request holds the pages of its context; once it finishes the pool is empty again."""
    request = greedy(prompt=STORY, max_new_tokens=48, min_new_tokens=48)
    call = server.stub.StreamGenerate(stream_of(request), timeout=120)
    messages = iter(call)
    next(messages)
    running = _health_when(server, lambda h: h.kv_pages_used > 0)
    prompt_tokens = server.stub.Tokenize(pb.TokenizeRequest(text=STORY)).count
    assert running.kv_pages_used >= -(-prompt_tokens // 16), "at least the prompt's pages"
    assert running.kv_pages_total == server.stub.ModelInfo(pb.ModelInfoRequest()).kv_pages_total
    assert running.kv_utilization == pytest.approx(running.kv_pages_used / running.kv_pages_total)
    for _ in messages:
        pass
    idle = _health_when(server, lambda h: h.kv_pages_used == 0)
    assert idle.kv_pages_used == 0 and idle.kv_utilization == 0.0
    assert idle.active_requests == 0


@pytest.fixture(scope="module")
def tiny_pool(make_server: ServerFactory) -> RunningServer:
    """A server whose KV cache holds about 8 pages (128 positions): --kv-cache-memory as a share of
    the host's available memory, computed for that."""
    share = 8 * 16 * SMOLLM2_KV_BYTES_PER_TOKEN / available_cpu_bytes()
    return make_server("--kv-cache-memory", repr(share))


def test_kv_cache_and_memory_are_reported_before_the_first_request(tiny_pool: RunningServer) -> None:
    """A server that has served nothing yet already describes its pool and its device memory."""
    info = tiny_pool.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.kv_bytes_per_token == SMOLLM2_KV_BYTES_PER_TOKEN
    assert info.kv_cache_bytes == info.kv_pages_total * 16 * SMOLLM2_KV_BYTES_PER_TOKEN
    health = tiny_pool.stub.Health(pb.HealthRequest())
    assert health.kv_pages_total == info.kv_pages_total and health.kv_pages_used == 0
    assert [d.device for d in health.devices] == ["cpu"]


def test_request_larger_than_the_kv_cache_is_refused_for_good(tiny_pool: RunningServer) -> None:
    """Prompt + max_new_tokens beyond the whole pool: RESOURCE_EXHAUSTED naming the KV cache and no
    RetryInfo (retrying cannot help), from both RPCs; requests that fit are still served."""
    info = tiny_pool.stub.ModelInfo(pb.ModelInfoRequest())
    assert 1 <= info.kv_pages_total <= 64, "the share made a tiny pool"
    too_long = greedy(prompt="Hi", max_new_tokens=info.kv_pages_total * info.kv_page_size)
    errors = []
    with pytest.raises(grpc.RpcError) as unary:
        tiny_pool.stub.Generate(too_long, timeout=60)
    errors.append(unary.value)
    with pytest.raises(grpc.RpcError) as streamed:
        list(tiny_pool.stub.StreamGenerate(stream_of(too_long), timeout=60))
    errors.append(streamed.value)
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "KV cache" in error.details()
        status = rpc_status.from_call(error)
        assert status is None or not any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
    fits = tiny_pool.stub.Generate(greedy(prompt="Hi", max_new_tokens=8, min_new_tokens=8), timeout=120)
    assert fits.usage.completion_tokens == 8
    assert _health_when(tiny_pool, lambda h: h.kv_pages_used == 0).kv_pages_used == 0
