"""Fatal-error classification and test-only fault injection for the engine step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verispec.config import parse_fault_injection
from verispec.errors import DeviceFatalError

_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "device-side assert", "an illegal memory access")


def is_fatal(exc: BaseException) -> bool:
    """Whether `exc` means the device is unusable (the engine stops) rather than one bad request."""
    if isinstance(exc, DeviceFatalError | torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _FATAL_MARKERS)


class InjectedStepError(RuntimeError):
    """A step failure made on purpose by --fault-injection."""


@dataclass
class FaultInjector:
    """Counts engine steps and fails some on purpose: `step_error:N` fails every Nth step (that
    request gets INTERNAL, the others go on); `fatal:N` raises a fatal device error at the Nth."""

    step_error_every: int = 0
    fatal_at_step: int = 0
    steps: int = 0

    @classmethod
    def parse(cls, spec: str) -> FaultInjector | None:
        """None when the setting is empty (the normal case)."""
        step_error, fatal = parse_fault_injection(spec)
        return cls(step_error, fatal) if step_error or fatal else None

    def before_step(self) -> None:
        self.steps += 1
        if self.fatal_at_step and self.steps >= self.fatal_at_step:
            raise DeviceFatalError(f"injected fatal device error at step {self.steps}")
        if self.step_error_every and self.steps % self.step_error_every == 0:
            raise InjectedStepError(f"injected step error at step {self.steps}")
