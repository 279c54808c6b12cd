"""Shared fixtures: the real embedded model, loaded once, and real servers on ephemeral ports."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from verispec.api.server import Server
from verispec.backends.torch_ref import TorchRefBackend
from verispec.config import DEFAULT_MODEL, Config, ModelConfig, config_from_argv
from verispec.loader import load_backend, start_engine
from verispec.tokenizer import Tokenizer
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc


@dataclass
class Target:
    """The embedded model as a backend and tokenizer, shared by every test."""

    backend: TorchRefBackend
    tokenizer: Tokenizer


@pytest.fixture(scope="session")
def target() -> Target:
    """The embedded model as served by default: on CPU, its own GGUF blocks on the int4 kernel."""
    backend, tokenizer = load_backend(ModelConfig(), DEFAULT_MODEL)
    assert isinstance(backend, TorchRefBackend)
    return Target(backend, tokenizer)


@pytest.fixture(scope="session")
def reference() -> Target:
    """The embedded model dequantized to float32 (`--weights float32`): the reference the native weights
    are checked against, and the exact weights for tests that compare two float32 code paths."""
    backend, tokenizer = load_backend(ModelConfig(weights="float32"), DEFAULT_MODEL)
    assert isinstance(backend, TorchRefBackend)
    return Target(backend, tokenizer)


class LoopThread:
    """An asyncio loop on its own thread, for running a real grpc.aio server beside sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class RunningServer:
    """A started server: its address, a channel and the stubs tests use."""

    server: Server
    address: str
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.GenerationServiceStub:
        return pb_grpc.GenerationServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)


def wait_serving(channel: grpc.Channel, service: str = "", timeout: float = 120) -> None:
    """Blocks until grpc.health.v1 answers SERVING for `service`."""
    stub = health_pb2_grpc.HealthStub(channel)
    for response in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout):
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return


ServerFactory = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def make_server(target: Target, loop_thread: LoopThread) -> Iterator[ServerFactory]:
    """Starts servers over the shared model with extra `serve` flags; all are stopped at the end."""
    started: list[RunningServer] = []

    def factory(*flags: str, draft: Any = None, credentials: grpc.ChannelCredentials | None = None) -> RunningServer:
        config: Config = config_from_argv(["--host", "127.0.0.1", "--port", "0", *flags])
        server = Server(config)
        port = loop_thread.run(server.start())
        models = start_engine(config, target.backend, target.tokenizer, draft, observer=server.metrics)
        loop_thread.run(server.load(lambda _config, _observer: models))
        address = f"127.0.0.1:{port}"
        channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
        wait_serving(channel, "verispec.v1.GenerationService")
        running = RunningServer(server, address, channel)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.channel.close()
        loop_thread.run(running.server.stop(0))


@pytest.fixture(scope="session")
def server(make_server: ServerFactory) -> RunningServer:
    """The default server: embedded model, default settings."""
    return make_server()


BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    """`verispec serve` in its own process; its log lines go to `log_path`."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(60)


def start_serve(
    log_path: Path, *flags: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> ServeProcess:
    """Starts `verispec serve` on a free port of loopback address `host`, without waiting for it."""
    port = free_port(host)
    environment = dict(os.environ, VERISPEC_PORT=str(port), VERISPEC_HOST=host, **(env or {}))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "verispec", "serve", *flags], env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    return ServeProcess(process, f"{host}:{port}", log_path)


def wait_serve_ready(serve: ServeProcess) -> ServeProcess:
    """Waits until a started `verispec serve` answers SERVING; kills it and fails with its log if not."""
    process, address, log_path = serve.process, serve.address, serve.log_path
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=120)
            wait_serving(channel, "verispec.v1.GenerationService")
        except Exception:
            process.kill()
            raise AssertionError(f"server did not start:\n{log_path.read_text()}") from None
    return serve


def spawn_serve(
    log_path: Path, *flags: str, env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> ServeProcess:
    """Starts `verispec serve` on a free loopback port and waits until it is ready."""
    return wait_serve_ready(start_serve(log_path, *flags, env=env, host=host))


def wait_http_ok(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    """Polls `url` until it answers 2xx; fails early, with the log's tail, if `process` exits."""
    name = Path(str(process.args[0])).name if isinstance(process.args, list) else "process"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{name} exited:\n{log_path.read_text()[-4000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:  # refused while starting; HTTPError (non-2xx) is an OSError too
            time.sleep(0.3)
    raise AssertionError(f"{name} not ready at {url}:\n{log_path.read_text()[-4000:]}")
