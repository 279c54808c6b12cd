"""Adaptive k: choose the number of drafts that maximises expected tokens per second, 0 included."""

from __future__ import annotations

import collections
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

_EMA = 0.1  # weight of a new measurement
_RECENT = 5  # passes of one batch shape whose median prices drafts in it
_STOP_AFTER = 3  # passes of a shape measured before a probe is judged unable to pay there
PROBE_EVERY = 8  # steps at k = 0 before a k = 1 probe re-measures acceptance ...
_PROBE_MAX = 256  # ... doubling after each rejected probe, up to this many steps
PROBE_CARRY_MAX = 64  # a new request starts from the interval its drafter last reached, up to this
_DECAY = 0.9  # per step, of a request's acceptance evidence


@dataclass
class CostModel:
    """Measured seconds of one target pass over n tokens (and over n tokens of s sequences), and of one
    draft step, per drafter.

    The pass cost by tokens alone mixes shapes: on the CPU int4 kernel (2-core CI machine) one sequence
    of 4 tokens took 31 ms against 26 for 1, 8 sequences of 1 token 53 ms, and a 9th token beside those
    8 (one draft) 64 ms, where the single-sequence figures put it at +1 ms. AUTO prices drafts in a batch
    by the passes of its own shape (`pass_cost`, the median of its last few passes, so that one slow
    pass does not stop AUTO probing), so what a draft adds to a batch is measured, not inferred from
    single-sequence passes.
    """

    verify_s: dict[int, float] = field(default_factory=dict)
    draft_s: dict[str, float] = field(default_factory=dict)
    batch_s: dict[int, dict[int, collections.deque[float]]] = field(default_factory=dict)  # seqs -> tokens -> s
    # The median of each batch_s window, kept as passes are recorded (once a step) rather than worked out
    # on every price AUTO asks for (k_max + 1 of them a step).
    _batch_median: dict[int, dict[int, float]] = field(default_factory=dict, repr=False)
    # Prices worked out since the last pass was recorded: a step's scheduling asks the same few shapes
    # again and again (every decoding request prices k = 0 .. k_max against nearly the same batch).
    _priced: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)  # (seqs, tokens) -> s
    _interpolated: dict[int, float] = field(default_factory=dict, repr=False)  # tokens -> s
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_verify(self, num_tokens: int, seconds: float, num_seqs: int = 1) -> None:
        """One pass over num_tokens tokens of num_seqs sequences."""
        with self._lock:
            _average_in(self.verify_s, num_tokens, seconds)
            window = self.batch_s.setdefault(num_seqs, {}).setdefault(num_tokens, collections.deque(maxlen=_RECENT))
            window.append(seconds)
            self._batch_median.setdefault(num_seqs, {})[num_tokens] = statistics.median(window)
            self._priced.clear()
            self._interpolated.clear()

    def record_draft(self, drafter: str, num_draft_tokens: int, seconds: float) -> None:
        if num_draft_tokens <= 0:
            return
        per_token = seconds / num_draft_tokens
        with self._lock:
            old = self.draft_s.get(drafter)
            self.draft_s[drafter] = per_token if old is None else old + _EMA * (per_token - old)

    def verify_cost(self, num_tokens: int) -> float:
        """Seconds for a pass over num_tokens, interpolated linearly between measured sizes."""
        if num_tokens in self.verify_s:
            return self.verify_s[num_tokens]
        cost = self._interpolated.get(num_tokens)
        if cost is None:
            cost = self._interpolated[num_tokens] = _interpolate(self.verify_s, num_tokens)
        return cost

    def _added_by_tokens(self, base: int, num_tokens: int) -> float:
        """What num_tokens tokens cost over base tokens in passes of one sequence (calibration measures
        them; verify_cost also averages in passes of many sequences, whose 8 tokens are 8 decodes)."""
        with self._lock:
            single = dict(self._batch_median.get(1, {}))
        table = single if len(single) >= 2 else self.verify_s
        return max(0.0, _interpolate(table, num_tokens) - _interpolate(table, base))

    def pass_cost(self, num_seqs: int, num_tokens: int) -> float:
        """Seconds for a pass over num_tokens tokens of num_seqs sequences: measured for that shape, else
        the nearest measured pass of as many sequences and fewer tokens plus what the extra tokens add to
        a pass of one sequence (so a shape not yet seen is priced, and measured once it runs), else by
        tokens alone; never less than a measured pass of as many sequences and fewer tokens."""
        cost = self._priced.get((num_seqs, num_tokens))
        if cost is None:
            cost = self._priced[num_seqs, num_tokens] = self._price(num_seqs, num_tokens)
        return cost

    def _price(self, num_seqs: int, num_tokens: int) -> float:
        with self._lock:
            shape = {t: v for t, v in self._batch_median.get(num_seqs, {}).items() if t <= num_tokens}
        base = max((t for t in shape if t < num_tokens), default=None)
        # Never cheaper than a measured pass of fewer tokens: noise that inverts two shapes would make a
        # draft that is never accepted look like a gain.
        floor = max((v for t, v in shape.items() if t < num_tokens), default=0.0)
        if num_tokens in shape:
            return max(shape[num_tokens], floor)
        if base is None:
            return self.verify_cost(num_tokens)
        return max(shape[base] + self._added_by_tokens(base, num_tokens), floor)

    def num_passes(self, num_seqs: int, num_tokens: int) -> int:
        """How many recent passes of that shape pass_cost rests on (0: priced from other shapes)."""
        with self._lock:
            return len(self.batch_s.get(num_seqs, {}).get(num_tokens, ()))

    def draft_cost(self, drafter: str) -> float:
        return self.draft_s.get(drafter, 0.0)


def _interpolate(table: dict[int, float], num_tokens: int) -> float:
    """Seconds of a pass over num_tokens from the measured sizes in `table`: linear between two, in
    proportion below the smallest, along the last slope (never cheaper) past the largest."""
    if num_tokens in table:
        return table[num_tokens]
    known = sorted(table)
    if not known:
        return float(num_tokens)  # nothing measured: assume cost grows with tokens (no speculation)
    if num_tokens < known[0]:  # below every measured size: scale the smallest down, in proportion
        return table[known[0]] * num_tokens / known[0]
    lower = max(n for n in known if n < num_tokens)
    upper = min((n for n in known if n > num_tokens), default=None)
    if upper is None:  # extrapolate from the two largest sizes, never cheaper than the largest
        if len(known) < 2:
            return table[lower] * num_tokens / lower
        a, b = known[-2], known[-1]
        slope = max(0.0, (table[b] - table[a]) / (b - a))
        return table[b] + slope * (num_tokens - b)
    frac = (num_tokens - lower) / (upper - lower)
    return table[lower] + frac * (table[upper] - table[lower])


def _average_in(table: dict[int, float], key: int, seconds: float) -> None:
    """The first measurement of a key, then an exponential moving average."""
    old = table.get(key)
    table[key] = seconds if old is None else old + _EMA * (seconds - old)


def expected_tokens(chain: Sequence[float], k: int) -> float:
    """Tokens one step emits with k drafts, where chain[i] is the probability that draft i+1 is
    accepted given that drafts 1..i were (the last entry repeats for deeper positions):
    1 + c1 + c1*c2 + ... + c1*...*ck, the 1 being the recovered or bonus token.

    Conditioning on the previous draft captures bursty acceptance: a copied passage accepts in runs.
    """
    total, reach = 1.0, 1.0
    for i in range(k):
        reach *= chain[min(i, len(chain) - 1)]
        total += reach
    return total


def best_k(
    chain: Sequence[float], k_max: int, costs: CostModel, drafter: str, batch_tokens: int = 1, batch_size: int = 1
) -> int:
    """The k in [0, k_max] that maximises the batch's expected tokens per second.

    The request joins a pass of batch_tokens tokens (its own next token included) that emits
    batch_size tokens without drafts. Its k drafts make that pass longer for every request in it:
    rate(k) = (batch_size - 1 + expected_tokens(chain, k)) / (k * draft + verify(batch_tokens + k)).
    Alone (1, 1) that is the single-request trade-off; in a large batch on hardware whose pass cost
    grows with tokens, the extra tokens rarely pay, and speculation turns itself off.
    """
    draft = costs.draft_cost(drafter)
    others = batch_size - 1
    best, best_rate = 0, batch_size / costs.pass_cost(batch_size, batch_tokens)
    for k in range(1, k_max + 1):
        rate = (others + expected_tokens(chain, k)) / (k * draft + costs.pass_cost(batch_size, batch_tokens + k))
        if rate > best_rate * 1.02:  # demand a margin over noise before speculating deeper
            best, best_rate = k, rate
    return best


@dataclass
class KController:
    """Per-request conditional acceptance by draft position, and the k it implies (fixed if not adapt)."""

    k_max: int
    adapt: bool
    prior: float = 0.5
    reached: list[float] = field(default_factory=list)  # decayed count of drafts evaluated per position
    accepted: list[float] = field(default_factory=list)  # decayed count of those accepted
    probe_every: int = PROBE_EVERY
    _steps_at_zero: int = 0
    _probing: bool = False

    def __post_init__(self) -> None:
        self.reached = [0.0] * max(self.k_max, 1)
        self.accepted = [0.0] * max(self.k_max, 1)

    @property
    def chain(self) -> list[float]:
        # Beta-style estimates: the prior counts as 2 observed drafts at each position.
        return [(a + 2.0 * self.prior) / (r + 2.0) for a, r in zip(self.accepted, self.reached, strict=True)]

    def choose(self, costs: CostModel, drafter: str, batch_tokens: int = 1, batch_size: int = 1) -> int:
        """k for the next step, in a pass of batch_tokens tokens over batch_size decoding requests."""
        if not self.adapt or self.k_max == 0:
            return self.k_max
        k = best_k(self.chain, self.k_max, costs, drafter, batch_tokens, batch_size)
        self._probing = False
        if k == 0:
            self._steps_at_zero += 1
            if self._steps_at_zero >= self._interval(costs, drafter, batch_tokens, batch_size):
                self._steps_at_zero = 0
                self._probing = True
                return 1
        else:
            self._steps_at_zero = 0
        return k

    def _interval(self, costs: CostModel, drafter: str, batch_tokens: int, batch_size: int) -> int:
        """Steps at k = 0 before a probe: probe_every while one accepted draft would pay in this pass, or
        while the pass with one draft has been measured fewer than _STOP_AFTER times; else the longest
        interval (a probe that cannot pay even when accepted only costs the batch)."""
        measured = costs.num_passes(batch_size, batch_tokens + 1) >= _STOP_AFTER
        if not measured or best_k([1.0], 1, costs, drafter, batch_tokens, batch_size):
            return self.probe_every
        return _PROBE_MAX

    def update(self, num_draft_tokens: int, num_accepted: int) -> None:
        """Draft i+1 was evaluated iff drafts 1..i were accepted; decay so old text weighs less."""
        if num_draft_tokens <= 0:
            return
        if self._probing:  # a rejected probe waits twice as long next time; an accepted one resets
            self.probe_every = PROBE_EVERY if num_accepted else min(2 * self.probe_every, _PROBE_MAX)
        for i in range(len(self.reached)):
            self.reached[i] *= _DECAY
            self.accepted[i] *= _DECAY
        for i in range(min(num_draft_tokens, len(self.reached))):
            if i <= num_accepted:
                self.reached[i] += 1.0
            if i < num_accepted:
                self.accepted[i] += 1.0
