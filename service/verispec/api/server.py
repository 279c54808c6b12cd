"""The grpc.aio server: servicer, standard health, reflection, loading in the background, drain."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
import threading
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from verispec import telemetry
from verispec.api.auth import OPEN_SERVICES, BearerTokenInterceptor, load_tokens, server_credentials
from verispec.api.servicer import SERVICE_NAME, GenerationServicer, ServiceState
from verispec.api.wire import MalformedRequestInterceptor
from verispec.config import Config, ServerConfig
from verispec.cost import meter_from_config
from verispec.engine.speculative import StepObserver
from verispec.errors import EngineDeadError
from verispec.loader import LoadedModels
from verispec.metrics import Metrics
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

_HEALTH_NAMES = ("", SERVICE_NAME)
DRAIN_REFUSE_S = 1.0  # the least time a drain goes on listening, answering new calls UNAVAILABLE
_DRAIN_POLL_S = 0.02


class LoadInterruptedError(Exception):
    """SIGTERM or SIGINT arrived while the models were loading: nothing to drain, the process exits
    without waiting for the loading thread."""


def server_options(settings: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's own limits: message size, streams per connection, idle and age limits (with a grace
    for the calls in flight), keepalive pings both ways."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace_s)),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_s)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(settings.keepalive_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def finish_start_up(models: LoadedModels) -> None:
    """Start-up's last work, on the loading thread, so that no request pays for it on the event loop.

    The tokenizer's lazy tables are built (one holds the GIL for ~120 ms). Then what start-up made is
    moved out of the cyclic collector's reach (gc.freeze, garbage collected first): loading leaves
    ~400k tracked objects (modules, the model's Python side), and a full collection over them takes
    ~150 ms on two cores with the GIL held, stalling the loop and every stream. Frozen, a full
    collection walks only what requests made since; frozen objects are still freed by reference counting.
    """
    models.tokenizer.warm_up()
    gc.collect()
    gc.freeze()


class Server:
    """Owns the grpc.aio server and the service's lifecycle: loading -> serving -> draining."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = ServiceState(config)
        self.metrics = Metrics(cost=meter_from_config(config.cost))
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self.port = 0
        self.health_grpc: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Binds and starts serving (health NOT_SERVING until the model is loaded); returns the port.

        The grpc.aio objects are made here, inside the loop that will run them.
        """
        settings = self.config.server
        # The engine thread runs Python between torch calls; hand the GIL over every 1 ms (not the
        # default 5 ms) so the event loop answers health checks and streams without lag.
        sys.setswitchinterval(0.001)
        self.health = health.aio.HealthServicer()
        tokens = load_tokens(settings.auth_tokens_file, settings.auth_tokens)
        credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tokens:
            open_services = () if settings.auth_protect_health else OPEN_SERVICES
            interceptors.append(BearerTokenInterceptor(tokens, open_services))
        interceptors.append(MalformedRequestInterceptor())  # after auth: strangers learn nothing
        self.grpc = grpc.aio.server(
            interceptors=interceptors,
            options=server_options(settings),
        )
        step_spans = telemetry.StepSpans(self.config.telemetry.step_spans)
        servicer = GenerationServicer(self.state, step_spans, self.metrics)
        pb_grpc.add_GenerationServiceServicer_to_server(servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), self.grpc)
        address = f"{self.config.server.host}:{self.config.server.port}"
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        log.info(
            "server.listening",
            address=f"{settings.host}:{self.port}",
            tls=credentials is not None,
            mtls=settings.tls_client_ca is not None,
            auth=bool(tokens),  # how many tokens or which: never logged
        )
        if settings.health_port:
            await self._start_health_port(settings.host, settings.health_port)
        if self.config.telemetry.metrics_port:
            metrics_port = self.metrics.serve(self.config.telemetry.metrics_port, self.config.server.host)
            log.info("metrics.listening", port=metrics_port)
        return self.port

    async def _start_health_port(self, host: str, port: int) -> None:
        """grpc.health.v1 alone, plaintext and open, sharing the main server's statuses: what kubelet
        gRPC probes can reach when the main port wants TLS or tokens."""
        self.health_grpc = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
        bound = self.health_grpc.add_insecure_port(f"{host}:{port}")
        await self.health_grpc.start()
        log.info("health.listening", port=bound)

    async def load(self, loader: Callable[[Config, StepObserver], LoadedModels]) -> None:
        """Loads the models on a worker thread, the engine reporting its steps to this server's
        metrics; health turns SERVING when done, start-up finished first (see finish_start_up).

        The thread is a daemon of its own, not the loop's executor: a signal during loading ends the
        process at once instead of waiting for the load and calibration to finish.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[LoadedModels] = loop.create_future()

        def settle(result: LoadedModels | None, exc: BaseException | None) -> None:
            if done.cancelled():
                return
            if exc is not None:
                done.set_exception(exc)
            else:
                assert result is not None
                done.set_result(result)

        def loading() -> None:
            try:
                result = loader(self.config, self.metrics)
                finish_start_up(result)
            except BaseException as exc:  # handed to the loop, raised by the await below
                loop.call_soon_threadsafe(settle, None, exc)
                return
            loop.call_soon_threadsafe(settle, result, None)

        threading.Thread(target=loading, name="verispec-load", daemon=True).start()
        try:
            models = await done
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.state.phase = pb.SERVING_STATUS_FAILED
            raise
        core = models.engine.core

        def on_failure(exc: BaseException) -> None:  # engine thread -> event loop
            loop.call_soon_threadsafe(self._engine_failed, exc)

        core.on_failure = on_failure
        self.metrics.watch(models.engine.stats)
        self.state.models = models
        self.state.phase = pb.SERVING_STATUS_SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("server.serving", model=models.target.model_id)

    def _engine_failed(self, exc: BaseException) -> None:
        """The engine thread died (a dead device): stop serving; serve() exits non-zero."""
        log.error("server.engine_failed", error=str(exc))
        self.state.phase = pb.SERVING_STATUS_FAILED
        self.failure = exc
        self._health_update = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self.failed.set()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, new calls refused with UNAVAILABLE, in-flight calls given `grace`
        seconds, engine stopped.

        The gRPC server goes on listening through the drain (at least DRAIN_REFUSE_S, bounded by the
        grace) so that a call arriving at the instant of the signal reaches the servicer and is answered
        UNAVAILABLE, which clients retry on another replica; only once the engine has no request left
        (or the grace is spent) is the server stopped, with what remains of the grace. A call that
        arrives while gRPC itself shuts down would be cancelled by it instead.
        """
        grace = self.config.server.grace_period_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.state.phase != pb.SERVING_STATUS_FAILED:
            self.state.phase = pb.SERVING_STATUS_DRAINING
        await self.health.enter_graceful_shutdown()
        refuse_until = loop.time() + min(grace, DRAIN_REFUSE_S)
        while loop.time() < deadline and (loop.time() < refuse_until or self._engine_busy()):
            await asyncio.sleep(_DRAIN_POLL_S)
        await self.grpc.stop(max(0.0, deadline - loop.time()))
        if self.health_grpc is not None:  # answered NOT_SERVING through the whole drain
            await self.health_grpc.stop(0)
        if self.state.models is not None:
            core = self.state.models.engine.core
            await asyncio.to_thread(core.stop, 10.0)
            if core.stopped:  # its runners were built for it alone (loader.build_engine)
                # Their KV pages and CUDA graphs go now: an exl2 runner and its graphs refer to each other, a
                # cycle among the frozen objects. Off the loop, as freeing graphs is device work.
                await asyncio.to_thread(core.close)
            else:
                log.warning("server.engine_still_running", detail="its pass outlasted the stop; its memory stays")
            # The engine's failure hook holds this server, and the metrics it reports to read its stats: two
            # cycles of objects that finish_start_up froze, which the collector never frees. Cut, the engine
            # goes with the last reference to the server.
            core.on_failure = None
            self.metrics.watch(None)
        log.info("server.stopped")

    def _engine_busy(self) -> bool:
        if self.state.models is None or self.failure is not None:
            return False
        stats = self.state.models.engine.stats()
        return stats.active_requests + stats.queue_depth > 0

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in _HEALTH_NAMES:
            await self.health.set(name, status)


async def serve(config: Config, loader: Callable[[Config, StepObserver], LoadedModels]) -> None:
    """Runs until SIGTERM or SIGINT, then drains; raises when loading fails or the engine dies."""
    server = Server(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.load(loader))
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(server.failed.wait())
    done, _ = await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if loading not in done:  # signalled while loading: no call was served, nothing to drain
        loading.cancel()
        log.info("server.stopping_while_loading")
        await server.stop(0)
        raise LoadInterruptedError("signalled while loading")
    failure = loading.exception()
    if failure is not None:
        await server.stop(0)
        raise failure
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    if server.failure is not None:
        await server.stop(1.0)  # a moment for the failed calls' statuses to go out
        raise EngineDeadError(f"engine failed: {server.failure}")
    log.info("server.draining", grace_period_s=config.server.grace_period_s)
    await server.stop()
