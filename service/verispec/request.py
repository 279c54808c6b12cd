"""Plain data of one generation request and its outputs (no grpc, no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    """Why a request stopped generating."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    STOP_TOKEN = "stop_token"
    CANCELLED = "cancelled"
    TIME_LIMIT = "time_limit"
    ERROR = "error"


class SpeculationMode(enum.Enum):
    """How a request is accelerated; AUTO lets the engine choose k (0 included)."""

    AUTO = "auto"
    OFF = "off"
    DRAFT_MODEL = "draft_model"
    NGRAM = "ngram"


@dataclass(frozen=True)
class SamplingParams:
    """Logits -> probabilities settings; temperature 0 is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class StoppingCriteria:
    """When generation ends, besides the model's end-of-sequence token."""

    max_new_tokens: int
    min_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_sequence: bool = False
    time_limit_s: float | None = None


@dataclass(frozen=True)
class ResponseOptions:
    """Extra outputs a request asks for."""

    logprobs: bool = False
    top_logprobs: int = 0
    echo_input_tokens: bool = False


@dataclass(frozen=True)
class SpeculationParams:
    """Speculation for one request; num_draft_tokens is k (an upper bound under AUTO)."""

    mode: SpeculationMode
    num_draft_tokens: int


@dataclass(frozen=True)
class Request:
    """A validated request: prompt already tokenized and truncated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingCriteria
    response: ResponseOptions
    speculation: SpeculationParams
    deadline: float | None = None  # time.monotonic() after which the caller is gone
    record_steps: bool = False  # keep a StepRecord per phase for tracing


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and its top alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class SpecStats:
    """Speculation counters of one request; vocabulary as in vLLM (draft, accepted, bonus)."""

    drafter: str = "off"
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target pass, the bonus/recovered token included."""
        return self.num_emitted_tokens / self.num_steps if self.num_steps else 0.0


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one request; `finish_reason` set on the last."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    error: str = ""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    seed: int = 0
    spec: SpecStats | None = None
    records: tuple[StepRecord, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ResultAccumulator:
    """Folds a request's step outputs into one final result (for unary calls)."""

    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: StepOutput | None = None

    def add(self, out: StepOutput) -> None:
        self.token_ids.extend(out.token_ids)
        self.text_parts.append(out.text)
        self.logprobs.extend(out.logprobs)
        self.last = out

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass(frozen=True)
class StepRecord:
    """Timing and outcome of one engine phase of a request, in engine time (time.time_ns()).

    `kind` is "queue", "prefill", "draft" or "verify"; draft and verify of one step share `step`.
    """

    kind: str
    start_ns: int
    end_ns: int
    step: int = 0
    drafter: str = ""
    num_draft_tokens: int = 0
    num_accepted: int = 0
    num_emitted: int = 0
    bonus: bool = False
    position: int = 0
    batch_size: int = 0  # sequences in the forward pass this phase ended in
    batch_tokens: int = 0  # tokens in that pass
