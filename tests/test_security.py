"""Bearer tokens, TLS and mutual TLS against the real server, with certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import BIN, ServerFactory, free_port, spawn_serve
from verispec.api.auth import BearerTokenInterceptor
from verispec_client import VerispecClient, channel_credentials
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-for-tests"
REQUEST = pb.GenerateRequest(prompt="Hello", max_new_tokens=2)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _issue(
    directory: Path, name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, server: bool = False
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue(directory, "ca", None)
    _issue(directory, "server", ca, server=True)
    _issue(directory, "client", ca)
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# tokens of internal callers\nother-token\n{TOKEN}\n")
    return path


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_bearer_token_required_for_generation(make_server: ServerFactory, token_file: Path) -> None:
    running = make_server("--auth-tokens-file", str(token_file))
    stub = running.stub
    assert _code(lambda: stub.Generate(REQUEST)) == grpc.StatusCode.UNAUTHENTICATED
    wrong = [("authorization", "Bearer not-it")]
    assert _code(lambda: stub.Generate(REQUEST, metadata=wrong)) == grpc.StatusCode.UNAUTHENTICATED
    stream = pb.StreamGenerateRequest(prompt="Hello", max_new_tokens=2)
    assert _code(lambda: list(stub.StreamGenerate(stream))) == grpc.StatusCode.UNAUTHENTICATED
    good = [("authorization", f"Bearer {TOKEN}")]
    assert stub.Generate(REQUEST, metadata=good).usage.completion_tokens == 2
    # The deep Health RPC is part of the service: it needs a token like the rest of it.
    assert _code(lambda: stub.Health(pb.HealthRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Health(pb.HealthRequest(), metadata=good).status == pb.SERVING_STATUS_SERVING
    with VerispecClient(running.address, token=TOKEN, timeout=60) as client:
        assert client.generate("Hello", max_new_tokens=2).usage.completion_tokens == 2
    # Probes and discovery stay open by default.
    health = health_pb2_grpc.HealthStub(running.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    listing = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", running.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "verispec.v1.GenerationService" in listing.stdout


def test_token_comparison() -> None:
    interceptor = BearerTokenInterceptor(["abc", "def"])
    assert interceptor.authorized([("authorization", "Bearer def")])
    assert not interceptor.authorized([("authorization", "Bearer de")])
    assert not interceptor.authorized([("authorization", "def")])
    assert not interceptor.authorized([("authorization", "Bearer abc"), ("authorization", "Bearer def")])
    assert not interceptor.authorized(None)


def test_tls(make_server: ServerFactory, pki: Pki) -> None:
    credentials = channel_credentials(pki.ca)
    running = make_server("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), credentials=credentials)
    assert running.stub.Generate(REQUEST).usage.completion_tokens == 2
    with grpc.insecure_channel(running.address) as plaintext:
        stub = pb_grpc.GenerationServiceStub(plaintext)
        assert _code(lambda: stub.Generate(REQUEST, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(make_server: ServerFactory, pki: Pki) -> None:
    with_cert = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    running = make_server(
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        credentials=with_cert,
    )
    assert running.stub.Generate(REQUEST).usage.completion_tokens == 2
    with grpc.secure_channel(running.address, channel_credentials(pki.ca)) as no_cert:
        stub = pb_grpc.GenerationServiceStub(no_cert)
        assert _code(lambda: stub.Generate(REQUEST, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_health_port_serves_plaintext_probes_beside_mtls_and_tokens(
    make_server: ServerFactory, pki: Pki, token_file: Path
) -> None:
    """Kubelet gRPC probes speak neither TLS nor tokens: --health-port gives them grpc.health.v1 alone."""
    health_port = free_port()
    running = make_server(
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)),
        *("--auth-tokens-file", str(token_file), "--health-port", str(health_port)),
        credentials=channel_credentials(pki.ca, pki.client_cert, pki.client_key),
    )
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe:
        health = health_pb2_grpc.HealthStub(probe)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
        ready = health_pb2.HealthCheckRequest(service="verispec.v1.GenerationService")
        assert health.Check(ready, timeout=5).status == serving
        stub = pb_grpc.GenerationServiceStub(probe)
        assert _code(lambda: stub.Generate(REQUEST, timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(running.address) as plaintext:  # the main port stays TLS-only
        main = health_pb2_grpc.HealthStub(plaintext)
        assert _code(lambda: main.Check(health_pb2.HealthCheckRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_client_cli_with_tls_and_token(make_server: ServerFactory, pki: Pki, token_file: Path) -> None:
    running = make_server(
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--auth-tokens-file",
        str(token_file),
        credentials=channel_credentials(pki.ca),
    )
    command = [
        str(BIN / "verispec-client"),
        "--target",
        f"localhost:{running.address.split(':')[1]}",
        "--tls-ca",
        str(pki.ca),
        "--token",
        TOKEN,
        "generate",
        "Hello",
        "--max-new-tokens",
        "2",
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["usage"]["completion_tokens"] == 2


def test_tokens_and_prompts_never_logged(tmp_path: Path) -> None:
    serve = spawn_serve(tmp_path / "serve.log", env={"VERISPEC_AUTH_TOKENS": TOKEN})
    try:
        with grpc.insecure_channel(serve.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            stub.Generate(
                pb.GenerateRequest(prompt="my private prompt", max_new_tokens=2),
                metadata=[("authorization", f"Bearer {TOKEN}")],
            )
            assert _code(lambda: stub.Generate(REQUEST, metadata=[("authorization", "Bearer guess")])) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    finally:
        serve.stop()
    log = serve.log_path.read_text()
    assert '"auth": true' in log
    assert TOKEN not in log and "guess" not in log and "my private prompt" not in log
