"""Engine-side state of one admitted request: its tokens, how many the KV cache holds, its pages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from verispec.engine.text import TextStream
from verispec.kv.pages import PageTable
from verispec.request import Request, SpecStats, StepOutput, StepRecord
from verispec.sampling import Sampler
from verispec.spec.adaptive import KController
from verispec.spec.drafters import Drafter

Sink = Callable[[StepOutput], None]


@dataclass
class Sequence:
    """A request inside the engine.

    `context` is the prompt plus every token emitted so far; the cache holds the keys and values of
    its first `num_computed` positions. A step feeds context[num_computed:] (a prefill chunk, or the
    last emitted token plus drafts); after a preemption num_computed drops to 0 and the next steps
    recompute the whole context, so the output continues exactly where it was.
    """

    seq_id: int
    request: Request
    sink: Sink
    submitted_ns: int  # time.time_ns(), for spans
    submitted: float  # time.monotonic(), for limits
    drafter: Drafter | None
    controller: KController
    text: TextStream
    context: list[int]
    num_computed: int = 0
    pages: PageTable = field(default_factory=PageTable)
    draft_state: object = None
    output_ids: list[int] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)
    records: list[StepRecord] = field(default_factory=list)
    admitted: float = 0.0  # time.monotonic() of the first admission
    prefill_start_ns: int = 0
    num_preemptions: int = 0
    sampler_state: Sampler | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_pending(self) -> int:
        """Context tokens whose keys and values are not in the cache yet."""
        return len(self.context) - self.num_computed

    @property
    def decoding(self) -> bool:
        """Prefill is done: only the last emitted token is pending (drafts may follow it)."""
        return self.num_pending == 1 and bool(self.output_ids)

    @property
    def sampler(self) -> Sampler:
        assert self.sampler_state is not None, "the sampler is made when the sequence is first scheduled"
        return self.sampler_state
