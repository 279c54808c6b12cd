"""Settings: flags over VERISPEC_* variables over defaults, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from verispec.config import Config, config_from_argv, step_span_ratio, unknown_variables
from verispec.errors import ConfigError


def test_defaults() -> None:
    config = config_from_argv([], environ={})
    assert config.server.port == 50051
    assert config.model.model == "smollm2-135m-instruct"
    assert config.spec.default_mode == "auto"
    assert config.telemetry.traces_exporters == ()


def test_flag_wins_over_environment() -> None:
    env = {"VERISPEC_PORT": "6000", "VERISPEC_MAX_ACTIVE_REQUESTS": "3"}
    config = config_from_argv(["--port", "7000"], environ=env)
    assert config.server.port == 7000
    assert config.engine.max_active_requests == 3


def test_environment_parses_types() -> None:
    env = {"VERISPEC_LOG_PROMPTS": "yes", "VERISPEC_GRACE_PERIOD": "2.5", "VERISPEC_CACHE_DIR": "/x/y"}
    config = config_from_argv([], environ=env)
    assert config.telemetry.log_prompts is True
    assert config.server.grace_period_s == 2.5
    assert config.model.cache_dir == Path("/x/y")


@pytest.mark.parametrize(
    ("argv", "env", "setting"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--port", "abc"], {}, "--port"),
        ([], {"VERISPEC_PORT": "abc"}, "VERISPEC_PORT"),
        (["--speculation", "fast"], {}, "--speculation"),
        (["--speculation", "draft_model"], {}, "--speculation"),
        (["--num-draft-tokens", "9", "--max-num-draft-tokens", "8"], {}, "--num-draft-tokens"),
        (["--default-max-new-tokens", "5000"], {}, "--default-max-new-tokens"),
        (["--step-spans", "2"], {}, "--step-spans"),
        (["--dtype", "int3"], {}, "--dtype"),
        (["--exl2-gemm", "cutlass"], {}, "--exl2-gemm"),
        ([], {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ([], {"VERISPEC_LOG_PROMPTS": "maybe"}, "VERISPEC_LOG_PROMPTS"),
        (["--fault-injection", "explode:3"], {}, "--fault-injection"),
        (["--fault-injection", "fatal:0"], {}, "--fault-injection"),
    ],
)
def test_bad_settings_name_themselves(argv: list[str], env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_argv(argv, environ=env)
    assert info.value.setting == setting


def test_otlp_exporter_follows_the_standard_variables() -> None:
    assert config_from_argv(
        [], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    ).telemetry.traces_exporters == ("otlp",)
    config = config_from_argv(
        [], {"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    )
    assert config.telemetry.traces_exporters == ("otlp", "console")
    assert config.telemetry.otlp_protocol == "http/protobuf"


def test_step_span_ratio() -> None:
    assert step_span_ratio("on") == 1.0
    assert step_span_ratio("off") == 0.0
    assert step_span_ratio("0.25") == 0.25
    assert step_span_ratio("0") is None
    assert step_span_ratio("often") is None


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_misspelt_variables_are_found() -> None:
    environ = {"VERISPEC_GRACE_PERIOD": "5", "VERISPEC_GRACE_PERIODS": "5", "VERISPEC_TOKEN": "t", "HOME": "/"}
    assert unknown_variables(environ) == ["VERISPEC_GRACE_PERIODS"]
