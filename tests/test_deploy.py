"""deploy/: the Containerfiles lint clean, every overlay renders and validates strictly against the
Kubernetes schemas, its settings are settings verispec accepts, and the probes, drain and Prometheus
files agree with the server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from verispec.api.servicer import SERVICE_NAME
from verispec.config import config_from_argv, unknown_variables
from verispec.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAYS = ["cpu", "gpu-70b"]
BIN = Path(sys.executable).parent


def _run(*command: str | Path, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus package"
    return path


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    rendered = tmp_path_factory.mktemp("kustomize") / f"{request.param}.yaml"
    rendered.write_text(_run(BIN / "kubectl", "kustomize", DEPLOY / "k8s" / "overlays" / request.param))
    return request.param, rendered


def _objects(rendered: Path) -> dict[str, dict[str, Any]]:
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(rendered.read_text()) if o}


def _settings(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    [config] = [o for key, o in objects.items() if key.startswith("ConfigMap/verispec-config-")]
    data: dict[str, str] = config["data"]
    return data


def _container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [container] = objects["Deployment/verispec"]["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_overlay_validates_strictly(overlay: tuple[str, Path]) -> None:
    _, rendered = overlay
    output = _run(BIN / "kubernetes-validate", "--strict", rendered)
    assert "did not validate" not in output
    kinds = {key.split("/")[0] for key in _objects(rendered)}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= kinds
    assert "HorizontalPodAutoscaler" in kinds


def test_overlay_settings_are_accepted_by_verispec(overlay: tuple[str, Path]) -> None:
    """Every VERISPEC_* variable names a setting, and together they pass verispec's own validation."""
    name, rendered = overlay
    settings = _settings(_objects(rendered))
    assert unknown_variables(settings) == []
    config = config_from_argv([], environ=settings)
    assert config.server.port == 50051 and config.telemetry.metrics_port == 9464
    assert config.server.auth_tokens_file is not None, "production overlays require bearer tokens"
    if name == "gpu-70b":
        assert config.model.backend == "exl2" and config.model.cache_mode == "q4"
        assert config.model.gpu_split == (17.5, 19.0), "the README's two-card split"
        assert config.spec.draft_model is not None


def test_probes_and_drain_match_the_server(overlay: tuple[str, Path]) -> None:
    name, rendered = overlay
    objects = _objects(rendered)
    container = _container(objects)
    pod = objects["Deployment/verispec"]["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = _settings(objects)
    assert ports["health"] == int(settings["VERISPEC_HEALTH_PORT"]), "probes use the plaintext health port"
    assert container["readinessProbe"]["grpc"] == {"port": ports["health"], "service": SERVICE_NAME}
    assert container["livenessProbe"]["grpc"] == {"port": ports["health"]}
    assert container["startupProbe"]["grpc"] == {"port": ports["health"]}
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (600 if name == "gpu-70b" else 300), "model loading needs its time"
    grace = float(settings["VERISPEC_GRACE_PERIOD"])
    assert pod["terminationGracePeriodSeconds"] == grace + 10, "the drain fits in the termination grace"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace, "no restart mid-drain"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = objects["Service/verispec"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051, "metrics": 9464}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
    for variable in ("VERISPEC_AUTH_TOKENS_FILE", "VERISPEC_TLS_CERT", "VERISPEC_TLS_KEY"):
        if variable in settings:
            assert mounts.get(str(Path(settings[variable]).parent)) in secrets, f"{variable} is in a Secret"
    if name == "gpu-70b":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        [models] = [m for m in container["volumeMounts"] if m["name"] == "models"]
        assert models["readOnly"] is True
        assert "VERISPEC_TLS_CERT" in settings, "the GPU overlay serves TLS"


def test_scale_out_objects_match_the_server_and_its_metrics(overlay: tuple[str, Path]) -> None:
    """A headless gRPC Service over the Deployment's pods (per-call balancing by the clients), and an HPA
    on metrics verispec exports, read through the Prometheus adapter's rules."""
    _, rendered = overlay
    objects = _objects(rendered)
    deployment = objects["Deployment/verispec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    headless = objects["Service/verispec-grpc"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in headless["ports"]] == [("grpc", 50051, "grpc")]
    assert "grpc" in {p["name"] for p in _container(objects)["ports"]}
    hpa = objects["HorizontalPodAutoscaler/verispec"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "verispec"}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert objects["PodDisruptionBudget/verispec"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    assert hpa["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
    names = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert names == {"verispec_queue_depth", "verispec_kv_cache_utilization"}
    exported = {family.name for family in Metrics().registry.collect()} | {
        family.name for family in Metrics().engine.describe()
    }
    assert names <= exported, "the HPA scales on metrics verispec exports"
    adapter = yaml.safe_load((DEPLOY / "k8s" / "components" / "autoscaling" / "prometheus-adapter.yaml").read_text())
    assert {rule["name"]["as"] for rule in adapter["rules"]} == names
    for rule in adapter["rules"]:
        assert rule["seriesQuery"].startswith(rule["name"]["as"] + "{")
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_containerfiles_lint_clean() -> None:
    files = sorted(DEPLOY.glob("Containerfile.*"))
    assert [f.name for f in files] == ["Containerfile.cpu", "Containerfile.gpu"]
    _run(BIN / "hadolint", "--config", DEPLOY / ".hadolint.yaml", *files)
    for path in files:
        text = path.read_text()
        assert 'ENTRYPOINT ["verispec", "serve"]' in text and "USER 10001" in text
        assert "EXPOSE 50051 50052 9464" in text and "VERISPEC_HEALTH_PORT=50052" in text


def _wheel_contents(wheel: Path) -> tuple[set[str], str, list[str]]:
    """A wheel's file names, entry points and Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [
        line.removeprefix("Requires-Dist: ") for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    return names, entry_points, requires


def test_the_wheels_the_images_install_are_complete(tmp_path: Path) -> None:
    """Containerfiles `pip install ./clients/python .` (not editable): the client wheel carries the stubs,
    their types and the client command with the generated code's runtimes as its only dependencies; the
    server wheel carries the server and depends on the client wheel."""
    for project in (ROOT / "clients" / "python", ROOT):
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, project)
    [client] = tmp_path.glob("verispec_client-*.whl")
    [server] = tmp_path.glob("verispec-*.whl")
    names, entry_points, requires = _wheel_contents(client)
    for module in ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py", "generation_pb2_grpc.pyi"):
        assert f"verispec_proto/v1/{module}" in names
    assert {"verispec_proto/py.typed", "verispec_client/py.typed", "verispec_client/cli.py"} <= names
    assert "verispec-client = verispec_client.cli:main" in entry_points
    assert {r.split(">")[0].split("<")[0].split("=")[0] for r in requires} == {
        "grpcio",
        "protobuf",
        "googleapis-common-protos",
    }, requires
    assert not [n for n in names if not n.startswith(("verispec_client", "verispec_proto"))]
    names, entry_points, requires = _wheel_contents(server)
    assert {"verispec/py.typed", "verispec/cli.py", "verispec/api/server.py"} <= names
    assert "verispec = verispec.cli:main" in entry_points
    assert "verispec-client==0.1.0" in requires
    assert not [
        n
        for n in names
        if n.startswith(("tests/", "clients/", "typescript/", "verispec_client/", "verispec_proto/", "verispec/v1/"))
    ]


def test_prometheus_config_and_alert_rules() -> None:
    _run(promtool(), "check", "config", BASE / "prometheus" / "prometheus.yml")
    _run(promtool(), "test", "rules", BASE / "prometheus" / "alerts.test.yaml")
    rules = yaml.safe_load((BASE / "prometheus" / "alerts.yaml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((BASE / "prometheus" / "alerts.test.yaml").read_text())
    tested = {check["alertname"] for test in tests["tests"] for check in test["alert_rule_test"]}
    assert alerts == tested, "every alert has a unit test"


def test_collector_pipeline_uses_only_defined_components() -> None:
    config = yaml.safe_load((BASE / "otel" / "config.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= set(config[kind]), kind
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    assert "4317" in config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
