"""Settings: frozen dataclasses built once from flags and VERISPEC_* variables (read only here)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verispec.errors import ConfigError

ENV_PREFIX = "VERISPEC_"
DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """Where fetched and converted models live: $VERISPEC_CACHE_DIR, else $XDG_CACHE_HOME/verispec."""
    explicit = os.environ.get(env_variable("cache-dir"))
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "verispec"


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the gRPC server listens."""

    host: str = "0.0.0.0"
    port: int = 50051
    health_port: int = 0  # 0: grpc.health.v1 only on the main port
    grace_period_s: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024
    stream_stall_timeout_s: float = 30.0  # a stream that cannot send for this long is cancelled (0: never)
    # Connection hygiene, with gRPC's own server settings.
    max_concurrent_streams: int = 100  # per connection
    max_connection_idle_s: float = 300.0  # a connection without calls this long gets GOAWAY
    max_connection_age_s: float = 1800.0  # every connection gets GOAWAY at this age (clients reconnect)
    max_connection_age_grace_s: float = 300.0  # then its calls have this long before it is closed
    keepalive_time_s: float = 60.0  # the server pings a quiet connection this often
    keepalive_timeout_s: float = 20.0  # and closes it when the ping is not answered this fast
    keepalive_min_ping_interval_s: float = 10.0  # clients pinging more often are told to go away
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens_file: Path | None = None
    auth_tokens: str = ""  # comma-separated; prefer the file (environment is visible to ps -e)
    auth_protect_health: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Which target model to load and how."""

    model: str = DEFAULT_MODEL
    backend: str = "torch_ref"
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "auto"  # auto (native on CPU), native (the GGUF's own blocks), float32 (dequantized)
    max_context_length: int = 0  # 0: the model's own
    cache_dir: Path = field(default_factory=default_cache_dir)
    gpu_split: tuple[float, ...] = ()  # exl2: GB of weights per GPU; empty: autosplit
    reserve_gb: float = 1.0  # exl2 autosplit: GB left free on each GPU
    cache_mode: str = "fp16"  # exl2 KV cache: fp16, q8, q6, q4
    exl2_gemm: str = "auto"  # exl2 4-bit GEMM of passes up to 64 rows: auto (measured), verispec, exllamav2
    cuda_graphs: bool = True  # exl2: few-token passes replay CUDA graphs captured at start-up


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding defaults; requests may override mode and k within max_num_draft_tokens."""

    draft_model: str = ""
    draft_gpu_split: tuple[float, ...] = ()  # exl2: the draft's own placement; empty: autosplit
    default_mode: str = "auto"
    default_num_draft_tokens: int = 4
    max_num_draft_tokens: int = 8
    ngram_min: int = 2
    ngram_max: int = 4


@dataclass(frozen=True)
class EngineConfig:
    """Admission limits and per-request bounds."""

    max_active_requests: int = 32  # a cap: KV pages decide how many actually run
    max_queued_requests: int = 64
    max_batch_tokens: int = 256  # tokens per forward pass: decodes, drafts and prefill chunks
    decode_step_slack: float = 1.25  # while decoding, prefill may slow a step this much (0: no limit)
    kv_cache_memory: float = 0.0  # share of memory free after loading (<= 1) or GiB (> 1); 0: auto
    kv_page_size: int = 16  # token positions per KV page
    scheduling: str = "batched"  # batched | round_robin (the comparison point of bench batch)
    max_new_tokens_limit: int = 2048
    default_max_new_tokens: int = 256
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_stop_token_ids: int = 64
    fault_injection: str = ""  # test only: step_error:N, fatal:N


@dataclass(frozen=True)
class TelemetryConfig:
    """Logging, tracing and metrics settings (OTLP endpoints come from the standard OTEL_* variables)."""

    log_level: str = "info"
    log_format: str = "json"
    log_prompts: bool = False
    step_spans: str = "on"  # on | off | a sampling ratio in (0, 1]
    metrics_port: int = 0  # 0: no metrics endpoint
    traces_exporters: tuple[str, ...] = ()  # from OTEL_TRACES_EXPORTER: otlp, console
    otlp_protocol: str = "grpc"  # from OTEL_EXPORTER_OTLP_PROTOCOL: grpc or http/protobuf


@dataclass(frozen=True)
class CostConfig:
    """The hardware price behind the live cost per token (a built-in profile, a JSON file, or the price flags)."""

    profile: str = ""  # a built-in profile name or a JSON file; empty: the price flags below
    gpu_hour_usd: float = 0.0  # cloud $ per GPU-hour
    num_gpus: int = 1
    purchase_usd: float = 0.0  # on-prem purchase price of the whole machine
    amortization_months: float = 36.0
    watts: float = 0.0  # on-prem draw under load
    kwh_usd: float = 0.15
    utilization: float = 0.0  # share of paid hours busy; 0: measured over the window
    window_s: float = 60.0


@dataclass(frozen=True)
class Config:
    """Everything the service needs, built once at start-up and passed down in slices."""

    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    cost: CostConfig = field(default_factory=CostConfig)


# (flag, dataclass slice, attribute, type, help). Each flag's variable is VERISPEC_<FLAG>.
_OPTIONS: tuple[tuple[str, str, str, Any, str], ...] = (
    ("host", "server", "host", str, "address to listen on"),
    ("port", "server", "port", int, "gRPC port (0 picks a free one)"),
    (
        "health-port",
        "server",
        "health_port",
        int,
        "also serve grpc.health.v1 alone, in plaintext and without auth, on this port: for kubelet gRPC "
        "probes, which speak neither TLS nor tokens (0: off)",
    ),
    (
        "grace-period",
        "server",
        "grace_period_s",
        float,
        "seconds in-flight requests may finish after SIGTERM",
    ),
    ("max-message-bytes", "server", "max_message_bytes", int, "largest gRPC message accepted"),
    (
        "stream-stall-timeout",
        "server",
        "stream_stall_timeout_s",
        float,
        "seconds a stream may be unable to send (its reader stopped reading) before it is cancelled and "
        "its engine slot, KV pages and buffered output are freed (0: never)",
    ),
    ("max-concurrent-streams", "server", "max_concurrent_streams", int, "most calls in flight on one connection"),
    (
        "max-connection-idle",
        "server",
        "max_connection_idle_s",
        float,
        "seconds a connection without calls stays open before GOAWAY",
    ),
    (
        "max-connection-age",
        "server",
        "max_connection_age_s",
        float,
        "seconds after which any connection gets GOAWAY (clients reconnect; spreads load, reaps stuck ones)",
    ),
    (
        "max-connection-age-grace",
        "server",
        "max_connection_age_grace_s",
        float,
        "seconds the calls of an aged connection may finish before it is closed",
    ),
    (
        "keepalive-time",
        "server",
        "keepalive_time_s",
        float,
        "seconds between the server's keepalive pings on a quiet connection",
    ),
    (
        "keepalive-timeout",
        "server",
        "keepalive_timeout_s",
        float,
        "seconds a keepalive ping may go unanswered before the connection is closed",
    ),
    (
        "keepalive-min-ping-interval",
        "server",
        "keepalive_min_ping_interval_s",
        float,
        "shortest interval between a client's pings; clients pinging faster (or without calls) get GOAWAY",
    ),
    ("tls-cert", "server", "tls_cert", Path, "PEM certificate chain: serve TLS (with --tls-key)"),
    ("tls-key", "server", "tls_key", Path, "PEM private key of --tls-cert"),
    ("tls-client-ca", "server", "tls_client_ca", Path, "PEM CA bundle: require client certificates (mTLS)"),
    (
        "auth-tokens-file",
        "server",
        "auth_tokens_file",
        Path,
        "file of bearer tokens, one a line: calls must send 'authorization: Bearer <token>'",
    ),
    ("auth-tokens", "server", "auth_tokens", str, "comma-separated bearer tokens (the file is safer)"),
    (
        "auth-protect-health",
        "server",
        "auth_protect_health",
        bool,
        "require a token for grpc.health.v1 and reflection too",
    ),
    (
        "model",
        "model",
        "model",
        str,
        f"target model: '{DEFAULT_MODEL}' (embedded default) or a model directory",
    ),
    ("backend", "model", "backend", str, "runtime of target and draft: torch_ref or exl2 (CUDA)"),
    ("gpu-split", "model", "gpu_split", tuple, "exl2: GB of target weights per GPU, e.g. 21,23 (empty: autosplit)"),
    ("reserve-gb", "model", "reserve_gb", float, "exl2 autosplit: GB kept free on each GPU"),
    ("cache-mode", "model", "cache_mode", str, "exl2 KV cache: fp16, q8, q6 or q4"),
    (
        "exl2-gemm",
        "model",
        "exl2_gemm",
        str,
        "exl2 4-bit GEMM of passes up to 64 rows: auto (per row bucket, the faster of verispec's kernels and "
        "ExLlamaV2's, timed at start-up), verispec (always its own: CUDA where they build, else Triton) or "
        "exllamav2 (its own kernels)",
    ),
    (
        "cuda-graphs",
        "model",
        "cuda_graphs",
        bool,
        "exl2: run passes of up to 64 rows (decodes, verifies, draft steps, prefill chunks) as CUDA graphs "
        "captured at start-up, one per row bucket (needs Triton); false: every pass launches its kernels",
    ),
    ("device", "model", "device", str, "torch device: auto (cuda if present, else cpu), cpu, cuda:N"),
    ("dtype", "model", "dtype", str, "activation dtype: auto, float32, float16, bfloat16"),
    (
        "weights",
        "model",
        "weights",
        str,
        "weights of a GGUF model: native (its own 4-bit blocks on torch's int4 CPU kernel), float32 "
        "(dequantized, the reference), auto (native on CPU, float32 elsewhere)",
    ),
    (
        "max-context-length",
        "model",
        "max_context_length",
        int,
        "longest prompt+completion in tokens (0: the model's own)",
    ),
    ("cache-dir", "model", "cache_dir", Path, "where fetched and converted models are kept"),
    (
        "draft-model",
        "spec",
        "draft_model",
        str,
        "draft model directory for speculative decoding (default: none, n-gram drafter)",
    ),
    ("speculation", "spec", "default_mode", str, "default speculation mode: auto, off, draft_model, ngram"),
    ("draft-gpu-split", "spec", "draft_gpu_split", tuple, "exl2: GB of draft weights per GPU (empty: autosplit)"),
    ("num-draft-tokens", "spec", "default_num_draft_tokens", int, "default k, drafts per step"),
    ("max-num-draft-tokens", "spec", "max_num_draft_tokens", int, "largest k a request may ask for"),
    ("ngram-min", "spec", "ngram_min", int, "shortest n-gram the prompt-lookup drafter matches"),
    ("ngram-max", "spec", "ngram_max", int, "longest n-gram the prompt-lookup drafter matches"),
    (
        "max-active-requests",
        "engine",
        "max_active_requests",
        int,
        "most requests generated concurrently (a cap; free KV pages decide how many run)",
    ),
    (
        "max-batch-tokens",
        "engine",
        "max_batch_tokens",
        int,
        "token budget of one forward pass: every running request's next token and drafts, then prefill "
        "chunks of waiting prompts (smaller: steadier inter-token latency; larger: faster long prefills)",
    ),
    (
        "decode-step-slack",
        "engine",
        "decode_step_slack",
        float,
        "while requests are decoding, prefill chunks may make a step at most this many times slower than "
        "the decode-only step, by the measured pass costs (0: no limit; prompts then use the whole budget)",
    ),
    (
        "kv-cache-memory",
        "engine",
        "kv_cache_memory",
        float,
        "paged KV cache size: a share of the memory free after loading (0 < x <= 1) or GiB (x > 1); "
        "0: auto (0.9 of a GPU's free memory, 0.1 of the host's available memory on CPU)",
    ),
    ("kv-page-size", "engine", "kv_page_size", int, "token positions per KV cache page"),
    (
        "scheduling",
        "engine",
        "scheduling",
        str,
        "batched (continuous batching) or round_robin (one request per forward pass; for comparison)",
    ),
    (
        "max-queued-requests",
        "engine",
        "max_queued_requests",
        int,
        "requests waiting for a slot before RESOURCE_EXHAUSTED",
    ),
    (
        "max-new-tokens-limit",
        "engine",
        "max_new_tokens_limit",
        int,
        "largest max_new_tokens a request may ask for",
    ),
    (
        "default-max-new-tokens",
        "engine",
        "default_max_new_tokens",
        int,
        "max_new_tokens when a request leaves it at 0",
    ),
    (
        "fault-injection",
        "engine",
        "fault_injection",
        str,
        "TEST ONLY: fail steps on purpose: step_error:N (every Nth step), fatal:N (device dies at step N)",
    ),
    ("log-level", "telemetry", "log_level", str, "debug, info, warning or error"),
    ("log-format", "telemetry", "log_format", str, "json (one object a line) or console"),
    ("log-prompts", "telemetry", "log_prompts", bool, "log prompt and completion text (debug only)"),
    (
        "step-spans",
        "telemetry",
        "step_spans",
        str,
        "spans per draft/verify step: on, off, or a sampling ratio in (0, 1]",
    ),
    ("metrics-port", "telemetry", "metrics_port", int, "Prometheus /metrics port (0: off)"),
    (
        "cost-profile",
        "cost",
        "profile",
        str,
        "hardware price profile of the live cost per token: a built-in name (2x-rtx4090-onprem, "
        "2x-a100-80g-cloud, 1x-h200-cloud, cpu-2vcpu-cloud) or a JSON file of its fields (empty: the price flags)",
    ),
    ("cost-gpu-hour-usd", "cost", "gpu_hour_usd", float, "cloud price per GPU-hour in $ (without --cost-profile)"),
    ("cost-gpus", "cost", "num_gpus", int, "GPUs the cloud price is paid for"),
    ("cost-purchase-usd", "cost", "purchase_usd", float, "on-prem: purchase price of the machine in $"),
    ("cost-amortization-months", "cost", "amortization_months", float, "on-prem: months the purchase is spread over"),
    ("cost-watts", "cost", "watts", float, "on-prem: power the machine draws under load"),
    ("cost-kwh-usd", "cost", "kwh_usd", float, "on-prem: electricity price per kWh in $"),
    (
        "cost-utilization",
        "cost",
        "utilization",
        float,
        "share of paid hours the hardware is busy, in (0, 1] (0: the busy share measured over the window)",
    ),
    ("cost-window", "cost", "window_s", float, "seconds of the sliding window throughput is measured over"),
)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def env_variable(flag: str) -> str:
    """The VERISPEC_* variable of a `serve` flag: --gpu-split -> VERISPEC_GPU_SPLIT."""
    return ENV_PREFIX + flag.upper().replace("-", "_")


def parse_split(setting: str, text: str) -> tuple[float, ...]:
    """GB per GPU from "17.5,19" (empty: autosplit); a ConfigError names `setting` if unreadable."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(setting, f"cannot read {text!r}: {exc}") from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per setting; defaults come from the dataclasses."""
    defaults = Config()
    for flag, section, attr, kind, help_text in _OPTIONS:
        default = getattr(getattr(defaults, section), attr)
        env = env_variable(flag)
        parser.add_argument(
            f"--{flag}",
            dest=f"{section}.{attr}",
            default=None,
            metavar="BOOL" if kind is bool else flag.split("-")[-1].upper(),
            nargs="?" if kind is bool else None,
            const="true" if kind is bool else None,
            help=f"{help_text} [env {env}; default {default}]",
        )


def build_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over VERISPEC_* variables, which win over defaults; every value is validated."""
    env = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {s: {} for s in ("server", "model", "spec", "engine", "telemetry", "cost")}
    options = [(f, s, a, k) for f, s, a, k, _ in _OPTIONS]
    for flag, section, attr, kind in options:
        raw = getattr(args, f"{section}.{attr}", None)
        name = f"--{flag}"
        if raw is None:
            env_name = env_variable(flag)
            raw = env.get(env_name)
            name = env_name
        if raw is None:
            continue
        values[section][attr] = _convert(name, raw, kind)
    if "cache_dir" not in values["model"]:
        values["model"]["cache_dir"] = default_cache_dir()
    values["telemetry"].update(_otel_settings(env))
    config = Config(
        server=ServerConfig(**values["server"]),
        model=ModelConfig(**values["model"]),
        spec=SpecConfig(**values["spec"]),
        engine=EngineConfig(**values["engine"]),
        telemetry=TelemetryConfig(**values["telemetry"]),
        cost=CostConfig(**values["cost"]),
    )
    validate(config)
    return config


def _otel_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The standard OTEL_* variables this service honours itself (the exporters read the rest).

    OTEL_TRACES_EXPORTER picks exporters (otlp, console, none); when it is unset, traces go to
    OTLP only if an OTLP endpoint is configured, so a bare start does not retry a missing collector.
    """
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None:
        configured = any(env.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        names = "otlp" if configured else "none"
    exporters = tuple(n.strip() for n in names.split(",") if n.strip() and n.strip() != "none")
    for name in exporters:
        _require(name in ("otlp", "console"), "OTEL_TRACES_EXPORTER", f"unsupported exporter {name!r}")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    _require(
        protocol in ("grpc", "http/protobuf"),
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        f"unsupported protocol {protocol!r}",
    )
    return {"traces_exporters": exporters, "otlp_protocol": protocol}


def _convert(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            return _parse_bool(raw)
        if kind is tuple:
            return parse_split(name, raw)
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(name, f"cannot read {raw!r}: {exc}") from None


def _require(ok: bool, setting: str, message: str) -> None:
    if not ok:
        raise ConfigError(setting, message)


def validate(config: Config) -> None:
    """Raises ConfigError naming the first bad setting."""
    s, m, sp, e, t = config.server, config.model, config.spec, config.engine, config.telemetry
    _require(0 <= s.port <= 65535, "--port", f"{s.port} is not a TCP port")
    _require(0 <= s.health_port <= 65535, "--health-port", f"{s.health_port} is not a TCP port")
    _require(s.health_port == 0 or s.health_port != s.port, "--health-port", "must differ from --port")
    _require(s.grace_period_s >= 0, "--grace-period", "must be >= 0")
    _require(s.max_message_bytes >= 1024, "--max-message-bytes", "must be >= 1024")
    _require(s.stream_stall_timeout_s >= 0, "--stream-stall-timeout", "must be >= 0 (0: never)")
    _require(s.max_concurrent_streams >= 1, "--max-concurrent-streams", "must be >= 1")
    for setting, seconds in (
        ("--max-connection-idle", s.max_connection_idle_s),
        ("--max-connection-age", s.max_connection_age_s),
        ("--max-connection-age-grace", s.max_connection_age_grace_s),
        ("--keepalive-time", s.keepalive_time_s),
        ("--keepalive-timeout", s.keepalive_timeout_s),
        ("--keepalive-min-ping-interval", s.keepalive_min_ping_interval_s),
    ):
        _require(seconds > 0, setting, "must be > 0 seconds")
    _require(m.backend in ("torch_ref", "exl2"), "--backend", f"unknown backend {m.backend!r}")
    _require(m.dtype in ("auto", "float32", "float16", "bfloat16"), "--dtype", f"unknown dtype {m.dtype!r}")
    _require(m.weights in ("auto", "native", "float32"), "--weights", f"unknown weights {m.weights!r}")
    _require(m.cache_mode in ("fp16", "q8", "q6", "q4"), "--cache-mode", f"unknown mode {m.cache_mode!r}")
    _require(
        m.exl2_gemm in ("auto", "verispec", "exllamav2"),
        "--exl2-gemm",
        f"{m.exl2_gemm!r} is not one of auto, verispec, exllamav2",
    )
    _require(all(gb > 0 for gb in m.gpu_split + sp.draft_gpu_split), "--gpu-split", "every share must be > 0 GB")
    _require(m.reserve_gb >= 0, "--reserve-gb", "must be >= 0")
    _require(m.max_context_length >= 0, "--max-context-length", "must be >= 0")
    _require(
        sp.default_mode in ("auto", "off", "draft_model", "ngram"),
        "--speculation",
        f"unknown mode {sp.default_mode!r}",
    )
    _require(
        sp.default_mode != "draft_model" or bool(sp.draft_model),
        "--speculation",
        "draft_model needs --draft-model",
    )
    _require(0 <= sp.max_num_draft_tokens <= 32, "--max-num-draft-tokens", "must be in [0, 32]")
    _require(
        0 <= sp.default_num_draft_tokens <= sp.max_num_draft_tokens,
        "--num-draft-tokens",
        f"must be in [0, --max-num-draft-tokens={sp.max_num_draft_tokens}]",
    )
    _require(1 <= sp.ngram_min <= sp.ngram_max <= 16, "--ngram-min", "need 1 <= --ngram-min <= --ngram-max <= 16")
    _require(e.max_active_requests >= 1, "--max-active-requests", "must be >= 1")
    _require(e.max_queued_requests >= 0, "--max-queued-requests", "must be >= 0")
    _require(e.max_batch_tokens >= 1, "--max-batch-tokens", "must be >= 1")
    _require(
        e.max_batch_tokens > sp.max_num_draft_tokens,
        "--max-batch-tokens",
        f"must exceed --max-num-draft-tokens={sp.max_num_draft_tokens} (one token plus its drafts)",
    )
    _require(e.decode_step_slack == 0 or e.decode_step_slack >= 1, "--decode-step-slack", "must be 0 (off) or >= 1")
    _require(e.kv_cache_memory >= 0, "--kv-cache-memory", "must be >= 0 (0: auto)")
    _require(1 <= e.kv_page_size <= 1024, "--kv-page-size", "must be in [1, 1024]")
    _require(e.scheduling in ("batched", "round_robin"), "--scheduling", f"unknown policy {e.scheduling!r}")
    _require(e.max_new_tokens_limit >= 1, "--max-new-tokens-limit", "must be >= 1")
    _require(
        1 <= e.default_max_new_tokens <= e.max_new_tokens_limit,
        "--default-max-new-tokens",
        f"must be in [1, --max-new-tokens-limit={e.max_new_tokens_limit}]",
    )
    try:
        parse_fault_injection(e.fault_injection)
    except ValueError as exc:
        raise ConfigError("--fault-injection", str(exc)) from None
    _require(t.log_level in ("debug", "info", "warning", "error"), "--log-level", f"unknown level {t.log_level!r}")
    _require(t.log_format in ("json", "console"), "--log-format", f"unknown format {t.log_format!r}")
    _require(0 <= t.metrics_port <= 65535, "--metrics-port", f"{t.metrics_port} is not a TCP port")
    _validate_cost(config.cost)
    _require(
        step_span_ratio(t.step_spans) is not None,
        "--step-spans",
        f"{t.step_spans!r} is not on, off or a ratio in (0, 1]",
    )


def _validate_cost(c: CostConfig) -> None:
    prices = (c.gpu_hour_usd, c.purchase_usd, c.watts)
    _require(min(prices) >= 0, "--cost-gpu-hour-usd", "prices and watts must be >= 0")
    _require(
        not c.profile or not any(prices),
        "--cost-profile",
        "set the price by a profile or by the price flags, not both",
    )
    _require(c.num_gpus >= 1, "--cost-gpus", "must be >= 1")
    _require(c.amortization_months > 0, "--cost-amortization-months", "must be > 0")
    _require(c.kwh_usd >= 0, "--cost-kwh-usd", "must be >= 0")
    _require(0 <= c.utilization <= 1, "--cost-utilization", "must be in [0, 1] (0: measured)")
    _require(c.window_s > 0, "--cost-window", "must be > 0")


def parse_fault_injection(spec: str) -> tuple[int, int]:
    """'step_error:3,fatal:10' -> (3, 10); '' -> (0, 0); ValueError for anything else."""
    step_error = fatal = 0
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, _, count = part.partition(":")
        if kind not in ("step_error", "fatal") or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{part!r} is not step_error:N or fatal:N with N >= 1")
        if kind == "step_error":
            step_error = int(count)
        else:
            fatal = int(count)
    return step_error, fatal


def step_span_ratio(setting: str) -> float | None:
    """'on' -> 1.0, 'off' -> 0.0, '0.25' -> 0.25; None when the setting is not understood."""
    if setting == "on":
        return 1.0
    if setting == "off":
        return 0.0
    try:
        ratio = float(setting)
    except ValueError:
        return None
    return ratio if 0.0 < ratio <= 1.0 else None


_CLIENT_VARIABLES = {ENV_PREFIX + "TOKEN"}  # read by verispec-client, not by the server


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """VERISPEC_* variables that name no setting: most likely misspelt (the server warns at start)."""
    known = {env_variable(flag) for flag, *_ in _OPTIONS} | _CLIENT_VARIABLES
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def config_from_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Builds a Config from `serve` flags alone (tests and embedding)."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return build_config(parser.parse_args(list(argv)), environ)
