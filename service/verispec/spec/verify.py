"""One speculative step's verification: greedy prefix match or rejection sampling, exact either way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verispec.sampling import STREAM_ACCEPT, Sampler, finite_rows


@dataclass(frozen=True)
class Proposal:
    """Draft tokens and, for a sampling drafter, the distributions they were drawn from."""

    token_ids: list[int]  # k draft tokens d_1..d_k
    probs: torch.Tensor | None = None  # [k, vocab] q_i; None when drafts are deterministic


@dataclass(frozen=True)
class Verdict:
    """Accepted drafts plus the one token the target adds (recovered on rejection, bonus otherwise)."""

    token_ids: list[int]
    num_accepted: int
    num_draft_tokens: int

    @property
    def bonus(self) -> bool:
        """True when every draft was accepted, so the last token is the target's bonus."""
        return 0 < self.num_draft_tokens == self.num_accepted


def verify(
    sampler: Sampler, logits: torch.Tensor, proposal: Proposal, position: int, target_ids: Sequence[int] | None = None
) -> Verdict:
    """Checks k drafts against the target's logits [k+1, vocab] scored in one pass.

    Row i of `logits` is the target's prediction after the context plus d_1..d_i; `position` is
    the output index of the first token this step emits (it keys the random draws). `target_ids`, when
    given, are the argmaxes of those rows already taken (greedy_argmax, for a batch-greedy sampler).
    """
    draft = proposal.token_ids
    k = len(draft)
    if sampler.greedy:
        # Greedy: accept while d_i equals the target's argmax; the argmax at the first mismatch
        # (recovered) or after the last draft (bonus) comes from the same pass.
        target = list(target_ids) if target_ids is not None else sampler.scores(logits, draft).argmax(-1).tolist()
        n = next((i for i in range(k) if draft[i] != target[i]), k)
        return Verdict([*draft[:n], target[n]], n, k)
    p = sampler.probs(sampler.scores(logits, draft))  # [k+1, vocab] target distribution per position
    if proposal.probs is None:
        # Deterministic drafts are q = one-hot(d_i). Drawing t_i ~ p_i and accepting iff t_i == d_i
        # accepts with probability p_i(d_i) = min(1, p/q); a rejected t_i is distributed as
        # p_i(. | t != d_i) = norm(max(0, p_i - q_i)). That is rejection sampling, and with draws
        # keyed by position it emits exactly the tokens plain sampling would.
        for i in range(k + 1):
            t = sampler.sample(p[i], position + i)
            if i == k or t != draft[i]:
                return Verdict([*draft[:i], t], i, k)
    q = proposal.probs
    assert q is not None
    for i, d in enumerate(draft):
        # Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)).
        if sampler.uniform(position + i, STREAM_ACCEPT) * float(q[i, d]) < float(p[i, d]):
            continue
        # Rejected: draw the replacement from the residual norm(max(0, p_i - q_i)).
        residual = (p[i] - q[i].to(p.device)).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: the residual is p itself
            residual = p[i]
        return Verdict([*draft[:i], sampler.sample(residual, position + i)], i, k)
    # All k accepted: the bonus token is a plain draw from p_{k+1}.
    return Verdict([*draft, sampler.sample(p[k], position + k)], k, k)


def greedy_argmax(
    rows: Sequence[torch.Tensor], vocab_size: int, suppressed: Sequence[tuple[int, Sequence[int]]]
) -> list[list[int] | None]:
    """The argmax of every row of each logits tensor [n_i, vocab] in one reduction and one wait for the
    device (rather than one of each per request). suppressed[i] = (r, token_ids): the first r rows of
    tensor i never pick those tokens (Sampler.suppressed_rows). None for a tensor with a row that cannot be
    sampled from (sampling.finite_rows), which its request's own verify() then reports. The argmax of
    the logits is the greedy token whichever float type they come in (fp16 widens to fp32 exactly).
    """
    if not rows:
        return []
    stacked = torch.cat(list(rows))[:, :vocab_size]  # a copy: the suppression below writes into it
    marked_rows: list[int] = []
    marked_ids: list[int] = []
    offset = 0
    for r, (num_rows, token_ids) in zip(rows, suppressed, strict=True):
        for row in range(offset, offset + num_rows):
            marked_rows.extend([row] * len(token_ids))
            marked_ids.extend(token_ids)
        offset += r.shape[0]
    if marked_rows:
        stacked[marked_rows, marked_ids] = float("-inf")
    best = torch.where(finite_rows(stacked), stacked.argmax(-1), -1).tolist()
    result: list[list[int] | None] = []
    offset = 0
    for r in rows:
        ids = best[offset : offset + r.shape[0]]
        offset += r.shape[0]
        result.append(None if -1 in ids else ids)
    return result
