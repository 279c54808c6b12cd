"""Metrics as Prometheus sees them: Debian's Prometheus server scrapes a live verispec, evaluates the
deploy/ alert rules against it, and answers a speculation query through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.conftest import RunningServer, ServerFactory, free_port, wait_http_ok
from tests.test_deploy import BASE, DEPLOY, promtool
from tests.test_telemetry import COPY_PROMPT
from verispec_proto.v1 import generation_pb2 as pb

POD_LABELS = {"namespace": "verispec", "pod": "verispec-0"}
ADAPTER_RULES = DEPLOY / "k8s" / "components" / "autoscaling" / "prometheus-adapter.yaml"


@dataclass
class Scraped:
    """A verispec server, its metrics port, and a Prometheus scraping it every second."""

    server: RunningServer
    metrics_port: int
    api: str

    def query(self, expression: str) -> list[dict[str, Any]]:
        url = f"{self.api}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for_value(self, expression: str, expected: float, timeout: float = 30) -> None:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = self.query(expression)
            if last and float(last[0]["value"][1]) == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{expression} never became {expected}; last answer {last}")


@pytest.fixture(scope="module")
def scraped(make_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make test` installs Debian's prometheus package"
    metrics_port, web_port = free_port(), free_port()
    server = make_server("--metrics-port", str(metrics_port))
    directory = tmp_path_factory.mktemp("prometheus")
    shutil.copy(BASE / "prometheus" / "alerts.yaml", directory / "alerts.yaml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yaml"],
        # The namespace and pod labels Kubernetes service discovery attaches, which the adapter's rules map.
        "scrape_configs": [
            {
                "job_name": "verispec",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"], "labels": POD_LABELS}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{web_port}"
    try:
        wait_http_ok(f"{api}/-/ready", process, directory / "prometheus.log", timeout=60)
        yield Scraped(server, metrics_port, api)
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def test_prometheus_reads_speculation_counts_back(scraped: Scraped) -> None:
    """The counts Prometheus stores are exactly those the response reported."""
    scraped.wait_for_value('up{job="verispec"}', 1)
    request = pb.GenerateRequest(
        prompt=COPY_PROMPT,
        max_new_tokens=24,
        speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_NGRAM, num_draft_tokens=4),
    )
    response = scraped.server.stub.Generate(request, timeout=120)
    stats, usage = response.speculation, response.usage
    assert stats.num_accepted_tokens > 0
    scraped.wait_for_value('sum(verispec_spec_draft_tokens_total{drafter="ngram"})', stats.num_draft_tokens)
    scraped.wait_for_value('sum(verispec_spec_accepted_tokens_total{drafter="ngram"})', stats.num_accepted_tokens)
    scraped.wait_for_value('sum(verispec_requests_total{finish_reason=~"length|eos"})', 1)
    [ttft] = scraped.query("verispec_time_to_first_token_seconds_count")
    assert float(ttft["value"][1]) == 1
    # Alone in the engine, the request was every batch: one prefill pass, then one pass per step, each
    # fed its last token plus that step's drafts.
    scraped.wait_for_value("verispec_batch_size_count", 1 + stats.num_steps)
    scraped.wait_for_value("verispec_batch_size_sum", 1 + stats.num_steps)
    scraped.wait_for_value("verispec_batch_tokens_sum", usage.prompt_tokens + stats.num_steps + stats.num_draft_tokens)


def test_prometheus_reads_the_kv_cache_and_device_memory(scraped: Scraped) -> None:
    """The pool's size, its pages returned after the requests, no preemptions, memory per device."""
    scraped.server.stub.Generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=4), timeout=120)
    [total] = scraped.query("verispec_kv_pages_capacity")
    assert float(total["value"][1]) > 0
    scraped.wait_for_value("verispec_kv_pages_used", 0)
    scraped.wait_for_value("verispec_kv_cache_utilization", 0)
    scraped.wait_for_value("verispec_preemptions_total", 0)
    [memory] = scraped.query("verispec_device_memory_bytes")
    assert memory["metric"]["device"] == "cpu" and float(memory["value"][1]) > 0


def test_alert_rules_evaluate_on_live_metrics(scraped: Scraped) -> None:
    """deploy/'s rules load, evaluate without error against the real series, and none fire on a healthy server."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{scraped.api}/api/v1/rules", timeout=10) as answer:
            groups = json.load(answer)["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if (rules and all(rule["lastEvaluation"] > "2000" for rule in rules)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == 7
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []


def test_metrics_page_passes_promtool(scraped: Scraped) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{scraped.metrics_port}/metrics", timeout=10) as answer:
        page = answer.read().decode()
    assert "verispec_spec_draft_tokens_total" in page
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=page, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _adapter_query(rule: dict[str, Any]) -> str:
    """A rule's metricsQuery as the Prometheus adapter renders it for one pod of the HPA's namespace."""
    series = rule["seriesQuery"].split("{")[0].strip("'")
    matchers = ",".join(f'{k}="{v}"' for k, v in POD_LABELS.items())
    query: str = rule["metricsQuery"]
    return query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod")


def test_autoscaling_adapter_rules_read_queue_depth_and_kv_use(scraped: Scraped) -> None:
    """The adapter's rules, as the HPA asks them, answer one value per pod: queue depth 0 on an idle
    server, and the KV pages a running request held."""
    rules = {rule["name"]["as"]: rule for rule in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]}
    assert set(rules) == {"verispec_queue_depth", "verispec_kv_cache_utilization"}
    scraped.wait_for_value('up{job="verispec"}', 1)
    stream = scraped.server.stub.StreamGenerate(
        pb.StreamGenerateRequest(prompt="Tell a long story.", max_new_tokens=48, min_new_tokens=48), timeout=120
    )
    next(stream)
    time.sleep(2.5)  # the request holds its pages across at least two 1 s scrapes
    list(stream)
    [kv] = scraped.query(_adapter_query(rules["verispec_kv_cache_utilization"]))
    assert kv["metric"] == {"pod": "verispec-0"} and 0 < float(kv["value"][1]) <= 1, kv
    [queue] = scraped.query(_adapter_query(rules["verispec_queue_depth"]))
    assert queue["metric"] == {"pod": "verispec-0"} and float(queue["value"][1]) == 0, queue
