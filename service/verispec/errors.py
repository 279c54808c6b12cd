"""Domain exceptions: what can go wrong, independent of the transport that reports it."""

from __future__ import annotations


class VerispecError(Exception):
    """Base class of every error verispec raises on purpose."""


class InvalidRequestError(VerispecError):
    """A request that can never succeed as sent; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OverloadedError(VerispecError):
    """The engine's admission limits are reached; the caller may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CapacityError(VerispecError):
    """A request that can never be served by this server as configured (it exceeds the KV cache)."""


class NotReadyError(VerispecError):
    """The engine is not serving: still loading, draining or stopped."""


class EngineDeadError(VerispecError):
    """The engine thread stopped working; no request can be served any more."""


class ModelLoadError(VerispecError):
    """A model could not be found, fetched, verified or loaded."""


class ConfigError(VerispecError):
    """A setting is invalid; `setting` names it as the user wrote it (flag or variable)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class SamplingError(VerispecError):
    """A distribution with NaN or infinite values: no token may be drawn from it (the request fails)."""


class DeviceFatalError(VerispecError):
    """The compute device stopped working (out of memory, a CUDA fault); the process must restart."""
