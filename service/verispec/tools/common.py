"""What several benchmarks share: the --concurrency list type and the per-position acceptance counter.

It imports nothing heavy and nothing from the other tools, so each bench module can import it at top level.
"""

from __future__ import annotations

import argparse


def concurrency_list(text: str) -> tuple[int, ...]:
    """--concurrency: comma-separated stream counts, each >= 1."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"need stream counts >= 1, got {text!r}")
    return levels


class PositionCounts:
    """A StepObserver that counts drafts and acceptances per draft position while `enabled`.

    The engine is given it at construction; a bench turns it on for the runs it measures and `clear`s it per set.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.drafted: dict[int, int] = {}
        self.accepted: dict[int, int] = {}

    def clear(self) -> None:
        self.drafted.clear()
        self.accepted.clear()

    def on_step(self, drafter: str, num_draft_tokens: int, num_accepted: int, draft_s: float, verify_s: float) -> None:
        if not self.enabled:
            return
        for position in range(1, num_draft_tokens + 1):
            self.drafted[position] = self.drafted.get(position, 0) + 1
            if position <= num_accepted:
                self.accepted[position] = self.accepted.get(position, 0) + 1

    def on_batch(self, batch_size: int, batch_tokens: int, seconds: float) -> None:
        """Batch sizes are not the benches' concern."""

    def rates(self) -> dict[str, float]:
        return {str(p): round(self.accepted.get(p, 0) / n, 4) for p, n in sorted(self.drafted.items())}
