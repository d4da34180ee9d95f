"""Token choice and the log-probabilities reported for it agree, ties included."""

from __future__ import annotations

import torch

from ollm.engine.sampling import Sampler, token_logprob
from ollm.generation import SamplingParams


def _greedy(logits: torch.Tensor) -> int:
    params = SamplingParams(temperature=0.0)
    return Sampler(params, [], logits.numel(), torch.device("cpu")).choose(logits.clone())


def test_greedy_takes_the_lowest_id_among_tied_maxima_and_lists_it_first() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0, 2.0])
    chosen = _greedy(logits)
    assert chosen == 1
    top = token_logprob(logits, chosen, 4, str).top
    assert [t.token_id for t in top] == [1, 3, 4, 5]
    assert top[0].logprob == top[1].logprob == top[2].logprob


def test_the_chosen_token_comes_first_among_equals_even_when_sampled() -> None:
    logits = torch.tensor([3.0, 1.0, 3.0, 3.0])
    top = token_logprob(logits, 3, 2, str).top
    assert [t.token_id for t in top] == [3, 0]


def test_tokens_tied_at_the_cut_are_ordered_by_id_not_dropped_at_random() -> None:
    logits = torch.zeros(1000)
    logits[10] = 5.0
    logits[[700, 20, 999]] = 4.0
    top = token_logprob(logits, 10, 3, str).top
    assert [t.token_id for t in top] == [10, 20, 700]
    # The chosen token tied at the cut is kept even though a lower id ties with it.
    assert [t.token_id for t in token_logprob(logits, 999, 2, str).top] == [10, 999]


def test_masked_tokens_never_outrank_allowed_ones() -> None:
    logits = torch.full((50,), float("-inf"))
    logits[[7, 3]] = torch.tensor([1.0, 2.0])
    top = token_logprob(logits, 3, 4, str).top
    assert [t.token_id for t in top][:2] == [3, 7]
    assert all(t.logprob == float("-inf") for t in top[2:])


def test_repetition_penalty_looks_back_over_the_last_n_tokens_only() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, repeat_last_n=2)
    sampler = Sampler(params, [0, 1, 2], 4, torch.device("cpu"))
    logits = torch.tensor([4.0, 3.0, 3.0, 2.5])
    # Tokens 1 and 2 are the last two: penalized (3 -> 1.5); token 0 fell out of the window.
    assert sampler.choose(logits.clone()) == 0
    sampler.observe(0)
    sampler.observe(3)
    # The window is now [0, 3]: 0 -> 2.0 and 3 -> 1.25; 1 and 2 are back to 3.0.
    assert sampler.choose(logits.clone()) == 1
    cpu = torch.device("cpu")
    everything = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), [0, 1, 2], 4, cpu)
    assert everything.choose(logits.clone()) == 3
    none = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0, repeat_last_n=0), [0], 4, cpu)
    assert none.plain_greedy and none.choose(logits.clone()) == 0
