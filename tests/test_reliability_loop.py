"""Nothing long runs on the event loop's time: start-up's lazy work and the collector's walk over
start-up's heap are done before serving, and the soak's load generator keeps its own heap small."""

from __future__ import annotations

import argparse
import asyncio
import gc

from tests.conftest import LoopThread, RunningServer, Target
from verispec.api.server import Server
from verispec.config import DEFAULT_MODEL, ModelConfig, config_from_argv
from verispec.loader import start_engine
from verispec.models import resolve_model
from verispec.tokenizer import Tokenizer
from verispec.tools import soak


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
