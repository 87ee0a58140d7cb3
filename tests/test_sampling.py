"""Logits processing equals transformers' processors; sampling is seeded; parameters are validated."""

from __future__ import annotations

import pytest
import torch

from kataru.engine.outputs import held_back
from kataru.errors import KataruError
from kataru.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    pick_token,
    process_logits,
)


def random_logits(seed: int = 0, vocab: int = 300) -> torch.Tensor:
    return torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("penalty", [0.8, 1.05, 1.3])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = random_logits()
    ids = torch.randint(0, 300, (4, 25), generator=torch.Generator().manual_seed(1))
    expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(apply_repetition_penalty(logits, seen, penalty), expected)


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_matches_transformers(top_k: int) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = random_logits(2)
    assert torch.equal(apply_top_k(logits, top_k), TopKLogitsWarper(top_k)(None, logits.clone()))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95])
def test_top_p_matches_transformers(top_p: float) -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = random_logits(3)
    assert torch.equal(apply_top_p(logits, top_p), TopPLogitsWarper(top_p)(None, logits.clone()))


def test_full_processor_chain_matches_transformers_order() -> None:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.1), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    logits = random_logits(4)
    ids = torch.randint(0, 300, (4, 30), generator=torch.Generator().manual_seed(5))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.allclose(process_logits(logits, seen, params), chain(ids, logits.clone()))


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = random_logits(6)[0] / 3  # flat enough that different seeds disagree
    seen = torch.zeros(300, dtype=torch.bool)
    params = SamplingParams(temperature=1.0, top_k=0)

    def draws(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [pick_token(logits, seen, params, g) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    assert pick_token(logits, seen, SamplingParams(do_sample=False), None) == int(logits.argmax())


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -3},
                                 {"repetition_penalty": 0}, {"max_new_tokens": 0}, {"stop": [""]},
                                 {"temperature": float("nan")}])
def test_invalid_sampling_parameters_are_refused(bad: dict) -> None:
    name = next(iter(bad))
    with pytest.raises(KataruError, match=f"invalid sampling parameter: {name}"):
        SamplingParams().updated(**bad)
    with pytest.raises(KataruError, match="unknown sampling parameter"):
        SamplingParams().updated(temprature=1.0)


def test_stop_string_hold_back() -> None:
    assert held_back("答えは###", ["### 指示"]) == 3
    assert held_back("答えは#", ["##"]) == 1
    assert held_back("答えは", ["##"]) == 0


def test_openai_penalties_follow_the_openai_formula() -> None:
    from kataru.sampling import apply_openai_penalties

    logits = random_logits(8)[0]
    counts = torch.zeros(300).index_add_(0, torch.tensor([3, 7, 7, 7]), torch.ones(4))
    got = apply_openai_penalties(logits, counts, 0.5, 1.5)
    expected = logits.clone()
    expected[3] -= 0.5 * 1 + 1.5
    expected[7] -= 0.5 * 3 + 1.5
    assert torch.allclose(got, expected)
    assert apply_openai_penalties(logits, None, 0.5, 1.5) is logits


def test_greedy_pick_is_torchs_argmax_ties_and_masks_included() -> None:
    """numpy's argmax (the CPU's greedy pick) takes the first of equal logits, as torch.argmax does, on rows
    from bf16 (many ties), with masked (-inf) logits and on a non-contiguous row."""
    from kataru.sampling import first_max

    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(64, 99584, generator=g) * 4).bfloat16().float()
    rows[:, ::3] = -float("inf")
    rows[7, [5, 900, 77777]] = 1000.0  # a three-way tie
    assert [first_max(r) for r in rows] == rows.argmax(-1).tolist()
    assert first_max(rows[7]) == 5
    assert first_max(rows.t()[11]) == int(rows.t()[11].argmax())
    half = rows[:4].bfloat16()  # numpy has no bf16: torch's argmax then
    assert [first_max(r) for r in half] == half.argmax(-1).tolist()
