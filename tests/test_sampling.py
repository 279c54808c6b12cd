"""Sampling transforms and draws: each filter keeps what it should, draws are reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from verispec.request import SamplingParams
from verispec.sampling import Sampler, draw, position_seed, uniform, warp

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def kept(params: SamplingParams) -> list[int]:
    return [i for i, p in enumerate(warp(LOGITS, params)[0].tolist()) if p > 0]


def test_temperature_one_is_softmax() -> None:
    probs = warp(LOGITS, SamplingParams(temperature=1.0))
    assert torch.allclose(probs, torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]), atol=1e-6)


def test_top_k() -> None:
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, top_p=0.71)) == [0, 1, 2]
    assert kept(SamplingParams(temperature=1.0, top_p=0.01)) == [0]


def test_min_p() -> None:
    assert kept(SamplingParams(temperature=1.0, min_p=0.3)) == [0, 1, 2]


def test_typical_p_keeps_tokens_near_entropy() -> None:
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    entropy = float(-(probs * probs.log()).sum())
    distance = (-probs.log() - entropy).abs()
    closest = int(distance.argmin())
    assert kept(SamplingParams(temperature=1.0, typical_p=0.05)) == [closest]


def test_penalties_apply_to_history_and_drafts() -> None:
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0, presence_penalty=0.5)
    sampler = Sampler(params, 5, prompt_token_ids=[4])
    sampler.observe([0, 0])
    scores = sampler.scores(LOGITS.expand(2, -1), draft_token_ids=[1])
    assert math.isclose(float(scores[0, 0] - LOGITS[0, 0]), -2.5, abs_tol=1e-5)
    assert float(scores[0, 1]) == pytest.approx(float(LOGITS[0, 1]))
    assert math.isclose(float(scores[1, 1] - LOGITS[0, 1]), -1.5, abs_tol=1e-5), "row 1 sees draft 1"
    assert float(scores[0, 4]) == pytest.approx(float(LOGITS[0, 4])), "prompt is not frequency-penalised"


def test_repetition_penalty_covers_prompt() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=2.0), 5, prompt_token_ids=[4])
    scores = sampler.scores(LOGITS)
    assert float(scores[0, 4]) == pytest.approx(2.0 * float(LOGITS[0, 4]))  # negative logit: multiplied


def test_min_new_tokens_masks_suppressed_ids() -> None:
    sampler = Sampler(SamplingParams(), 5, [], suppress_token_ids=[0], min_new_tokens=2)
    scores = sampler.scores(LOGITS.expand(3, -1))
    assert scores[0, 0] == float("-inf") and scores[1, 0] == float("-inf")
    assert scores[2, 0] != float("-inf"), "the third token may end the sequence"


def test_draws_are_keyed_by_position() -> None:
    assert uniform(7, 3, 0) == uniform(7, 3, 0)
    assert uniform(7, 3, 0) != uniform(7, 4, 0) != uniform(8, 3, 0)
    assert position_seed(1, 2, 1) != position_seed(1, 2, 0)


def test_draw_follows_the_cdf() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0])
    assert draw(probs, 0.0) == 1
    assert draw(probs, 0.2499) == 1
    assert draw(probs, 0.26) == 3
    assert draw(probs, 0.999999) == 3, "never a zero-probability token"


def test_draw_frequencies_match_probabilities() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    counts = [0, 0, 0]
    trials = 6000
    for i in range(trials):
        counts[draw(probs, uniform(11, i, 0))] += 1
    for count, p in zip(counts, probs.tolist(), strict=True):
        assert abs(count / trials - p) < 4 * math.sqrt(p * (1 - p) / trials)
