"""Nothing long runs on the event loop's time and nothing large waits for the collector: start-up's
lazy work and the collector's walk over start-up's heap are done before serving, a refused request
leaves no reference cycle holding it, a stopped server leaves none holding its engine, and the soak's load
generator keeps its own heap small."""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import LoopThread, RunningServer, ServerFactory, Target
from verispec.api.server import Server
from verispec.config import DEFAULT_MODEL, ModelConfig, config_from_argv
from verispec.loader import LoadedModels, start_engine
from verispec.models import resolve_model
from verispec.request import SpeculationMode
from verispec.spec.drafters import ModelDrafter
from verispec.tokenizer import Tokenizer
from verispec.tools import soak
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

HUGE_PROMPT = "a b c " * (4 * 1024 * 1024 // 6 - 200)  # refused by its size: more tokens than the window
CJK_1MB = "漢字テスト中文" * (1024 * 1024 // 21)  # its per-token answer exceeds the message limit
REQUESTS = (pb.GenerateRequest, pb.StreamGenerateRequest, pb.TokenizeRequest)


def test_serving_starts_with_the_tokenizer_warm_and_start_up_heap_frozen(
    target: Target, loop_thread: LoopThread
) -> None:
    """Before health turns SERVING, the tokenizer's lazy tables exist (the first logprobs or chat
    request would build them, one with the GIL held for ~120 ms) and the objects start-up made are
    frozen: a full collection no longer walks the model's Python side (~400k objects)."""
    tokenizer = Tokenizer(resolve_model(DEFAULT_MODEL, ModelConfig().cache_dir))
    config = config_from_argv(["--host", "127.0.0.1", "--port", "0"])
    server = Server(config)
    loop_thread.run(server.start())
    models = start_engine(config, target.backend, tokenizer, None, observer=server.metrics)
    assert "_token_texts" not in vars(tokenizer) and tokenizer._content_tok is None
    try:
        loop_thread.run(server.load(lambda _config, _observer: models))
        assert "_token_texts" in vars(tokenizer) and tokenizer._content_tok is not None
        assert gc.get_freeze_count() > 100_000
        tracked = {id(item) for item in gc.get_objects()}
        assert not {id(models.engine), id(models.engine.core), id(tokenizer)} & tracked
    finally:
        loop_thread.run(server.stop(0))


def test_a_stopped_server_lets_its_engine_go(target: Target, loop_thread: LoopThread) -> None:
    """Once a server has stopped and its last reference is dropped, its engine is freed by reference
    counting alone, as the objects start-up froze are never collected: a second engine in the same process
    (`bench batch` builds one per policy) then finds the first one's KV pool and CUDA graphs given back."""
    engine, core = _serve_and_stop(target, loop_thread)
    assert engine() is None and core() is None


def test_a_stopped_server_gives_back_its_kv_pages_while_still_referenced(
    target: Target, loop_thread: LoopThread
) -> None:
    """Stopping closes the engine's runners, target and draft: their KV pages go at once, even while the
    server and its engine are still referenced (an exl2 runner and its CUDA graphs refer to each other, a
    cycle among start-up's frozen objects that would otherwise hold the GPU's memory to the end)."""
    server, models = _loaded_server(target, loop_thread, "--draft-model", DEFAULT_MODEL, draft=target.backend)
    core = models.engine.core
    drafter = core.speculation.drafter_for(SpeculationMode.DRAFT_MODEL)
    assert isinstance(drafter, ModelDrafter)
    pages = [weakref.ref(runner.k_cache[0]) for runner in (core.runner, drafter.runner)]  # type: ignore[attr-defined]
    assert all(page() is not None for page in pages)
    loop_thread.run(server.stop(0))
    assert core.stopped
    assert [page() for page in pages] == [None, None], "the target's and the draft's pages are gone"
    assert models.engine.core is core, "while the engine itself is still referenced"


def _loaded_server(
    target: Target, loop_thread: LoopThread, *flags: str, draft: Any = None
) -> tuple[Server, LoadedModels]:
    """A server started on an ephemeral port with extra `serve` flags, and the models it serves."""
    config = config_from_argv(["--host", "127.0.0.1", "--port", "0", *flags])
    server = Server(config)
    loop_thread.run(server.start())
    models = start_engine(config, target.backend, target.tokenizer, draft, observer=server.metrics)
    loop_thread.run(server.load(lambda _config, _observer: models))
    return server, models


def _serve_and_stop(target: Target, loop_thread: LoopThread) -> tuple[weakref.ref[Any], weakref.ref[Any]]:
    """A server loaded and stopped; weak references to its engine and engine core once it is dropped."""
    server, models = _loaded_server(target, loop_thread)
    try:
        return weakref.ref(models.engine), weakref.ref(models.engine.core)
    finally:
        loop_thread.run(server.stop(0))


def test_soak_load_generator_runs_as_many_workers_as_its_concurrency(server: RunningServer) -> None:
    """200 requests at concurrency 4, counted at the 100th: the tasks alive stay near 4 (each worker's
    call may hold a task or two of grpc's), never one per request made up front."""
    args = argparse.Namespace(
        requests=200,
        concurrency=4,
        time_limit=120.0,
        seed=0,
        max_new_tokens=2,
        bad_fraction=0.5,
        deadline_fraction=0.0,
        cancel_fraction=0.0,
        attack_fraction=0.0,
    )
    alive: list[int] = []
    result = asyncio.run(soak._drive(server.address, args, lambda _message: alive.append(len(asyncio.all_tasks()))))
    assert result["requests"] == 200 and result["unexpected_status_codes"] == 0, result["unexpected_examples"]
    assert alive and max(alive) <= 3 * args.concurrency + 2, alive


def _large_requests() -> list[object]:
    return [item for item in gc.get_objects() if isinstance(item, REQUESTS) and item.ByteSize() > 1_000_000]


def _refused_and_freed(call: Callable[[], object]) -> tuple[grpc.StatusCode, list[str], int]:
    """Runs a call that sends a large request with automatic collection off, then waits until no large
    request is alive: (status, the large requests the collector found in reference cycles meanwhile,
    the large requests still alive when the wait gave up). Freed by its references alone, a request
    is never found in a cycle."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        code = _refused(call)
        give_up = time.monotonic() + 30
        while True:
            gc.collect()
            cyclic = [type(item).__name__ for item in gc.garbage if isinstance(item, REQUESTS)]
            gc.garbage.clear()
            alive = len(_large_requests())
            if cyclic or not alive or time.monotonic() > give_up:
                return code, cyclic, alive
            time.sleep(0.05)  # grpc lets go of a finished call's state a moment after its status is sent
    finally:
        gc.set_debug(0)
        gc.enable()


def _refused(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a call ends with (plain try/except: pytest.raises would keep the client's error, and
    with it the client's copy of the request, in a cycle of its own)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


REFUSALS: dict[str, Callable[[pb_grpc.GenerationServiceStub], object]] = {
    "generate": lambda stub: stub.Generate(pb.GenerateRequest(prompt=HUGE_PROMPT, max_new_tokens=2), timeout=60),
    "stream": lambda stub: list(
        stub.StreamGenerate(pb.StreamGenerateRequest(prompt=HUGE_PROMPT, max_new_tokens=2), timeout=60)
    ),
    "tokenize": lambda stub: stub.Tokenize(pb.TokenizeRequest(text=CJK_1MB, return_tokens=True), timeout=120),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_a_refused_request_is_in_no_reference_cycle(server: RunningServer, kind: str) -> None:
    """A refusal is set on the call, not raised with context.abort, and the server lets go of the
    request at once. (An abort's AbortError stays on the call's state; the error, its traceback and the
    call formed a cycle through every frame holding the request: a refused 4 MiB prompt outlived its
    call until the connection closed and the collector ran, ~30 MiB a round of 24.)"""
    assert _refused_and_freed(lambda: REFUSALS[kind](server.stub)) == (grpc.StatusCode.INVALID_ARGUMENT, [], 0)


def test_a_denied_request_is_in_no_reference_cycle(make_server: ServerFactory, tmp_path: Path) -> None:
    """A caller without a token is answered UNAUTHENTICATED the same way: its request is freed at once."""
    token_file = tmp_path / "tokens"
    token_file.write_text("a-token-for-this-test\n")
    guarded = make_server("--auth-tokens-file", str(token_file))
    for refusal in REFUSALS.values():
        outcome = _refused_and_freed(lambda: refusal(guarded.stub))  # noqa: B023
        assert outcome == (grpc.StatusCode.UNAUTHENTICATED, [], 0)
