"""verispec: a gRPC service for a quantized LLM with speculative decoding."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("verispec")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
