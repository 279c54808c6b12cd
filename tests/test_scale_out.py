"""Scale-out with real parts: two `verispec serve` processes on two loopback addresses and one client
with a multi-address target. The client's default service config balances per call (round_robin), so
both servers serve (counted by each server's own /metrics), and when one drains on SIGTERM the calls
move to the other with none failing."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServeProcess, free_port, start_serve, wait_serve_ready
from verispec_client import VerispecClient

HOSTS = ("127.0.0.1", "127.0.0.2")
# Small servers that start fast: no speculation and a short calibration (passes of 1 and 2 tokens).
FLAGS = (
    *("--max-active-requests", "4", "--grace-period", "30", "--speculation", "off"),
    *("--num-draft-tokens", "1", "--max-num-draft-tokens", "1", "--max-batch-tokens", "8"),
)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two servers on two cores: one torch thread each


def _finished(metrics_url: str) -> int:
    """Requests the server finished (verispec_requests_total over every finish reason)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "verispec_requests_total"
        )
    )


def test_round_robin_spreads_calls_and_a_drain_fails_none(tmp_path: Path) -> None:
    metrics_ports = [free_port(host) for host in HOSTS]
    serves: list[ServeProcess] = [
        start_serve(tmp_path / f"serve-{i}.log", *FLAGS, "--metrics-port", str(port), env=ONE_THREAD, host=host)
        for i, (host, port) in enumerate(zip(HOSTS, metrics_ports, strict=True))
    ]
    try:
        for serve in serves:  # both load at once
            wait_serve_ready(serve)
        urls = [f"http://{host}:{port}/metrics" for host, port in zip(HOSTS, metrics_ports, strict=True)]
        target = "ipv4:" + ",".join(serve.address for serve in serves)
        with VerispecClient(target, timeout=60) as client:
            grpc.channel_ready_future(client.channel).result(timeout=30)
            # Spread: a short burst of calls lands on both servers.
            calls = 12
            for i in range(calls):
                client.generate(f"Count to {i}:", max_new_tokens=2)
            counts = [_finished(url) for url in urls]
            assert sum(counts) == calls and min(counts) >= calls // 4, f"calls per server: {counts}"

            # Drain: two callers keep calling while server 0 gets SIGTERM; no call may fail.
            failures: list[str] = []
            done = {"before": 0, "after": 0}
            lock = threading.Lock()
            drained = threading.Event()
            stop = threading.Event()

            def caller(n: int) -> None:
                for i in range(60):  # bounded: at most 60 calls per caller
                    if stop.is_set():
                        return
                    try:
                        reply = client.generate(f"Caller {n}, call {i}:", max_new_tokens=6, min_new_tokens=6)
                        assert len(reply.token_ids) == 6
                        with lock:
                            done["after" if drained.is_set() else "before"] += 1
                    except grpc.RpcError as exc:
                        with lock:
                            failures.append(f"{exc.code().name}: {exc.details()}")

            threads = [threading.Thread(target=caller, args=(n,)) for n in range(2)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            serves[0].process.send_signal(signal.SIGTERM)
            assert serves[0].process.wait(60) == 0, serves[0].log_path.read_text()[-4000:]
            drained.set()
            before_drain_on_b = _finished(urls[1])
            deadline = time.monotonic() + 30
            while done["after"] < 6 and time.monotonic() < deadline and any(t.is_alive() for t in threads):
                time.sleep(0.1)
            stop.set()
            for thread in threads:
                thread.join(60)
            after_on_b = _finished(urls[1])
        assert failures == [], failures
        assert done["before"] > 0 and done["after"] >= 6, done
        assert after_on_b - before_drain_on_b >= done["after"] - 2, "calls after the drain went to server 1"
        log = serves[0].log_path.read_text()
        assert "server.draining" in log and "server.stopped" in log
    finally:
        for serve in serves:
            serve.stop()
