"""Per-sequence token selection: penalties, constraint mask, temperature, top-k/top-p/min-p, seed.

Every sequence in a batch carries its own Sampler, so batching never mixes settings; the
engine hands each one its own row of the batch's logits.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import torch

from ollm.generation import SamplingParams, TokenLogprob, TopLogprob

# Applies a grammar's allowed-token mask to one row of logits in place.
LogitsMask = Callable[[torch.Tensor], None]


class Sampler:
    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, device: torch.device):
        self.params = params
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        # The penalty's window of recent tokens, when it looks back over only the last n.
        self._recent: deque[int] | None = None
        if params.repetition_penalty != 1.0 and params.repeat_last_n != 0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            window = prompt_ids
            if params.repeat_last_n > 0:
                self._recent = deque(prompt_ids[-params.repeat_last_n :], maxlen=params.repeat_last_n)
                window = list(self._recent)
            if window:
                self._seen[torch.tensor(window, device=device)] = True
        if params.frequency_penalty or params.presence_penalty:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    @property
    def plain_greedy(self) -> bool:
        """True when the choice is argmax of the raw logits, so a whole batch can share one argmax."""
        return self.params.greedy and self._seen is None and self._counts is None

    def observe(self, token_id: int) -> None:
        if self._recent is not None and self._seen is not None:
            if len(self._recent) == self._recent.maxlen:
                dropped = self._recent[0]
                self._recent.append(token_id)
                if dropped not in self._recent:
                    self._seen[dropped] = False
            else:
                self._recent.append(token_id)
        if self._seen is not None:
            self._seen[token_id] = True
        if self._counts is not None:
            self._counts[token_id] += 1

    def choose(self, logits: torch.Tensor, mask: LogitsMask | None = None) -> int:
        """Pick the next token from one row of float32 logits.

        Penalties and the mask are applied to ``logits`` in place, so log-probabilities read from
        it afterwards describe the distribution the token was drawn from (before temperature).
        """
        params = self.params
        if self._seen is not None:
            penalty = params.repetition_penalty
            # Dense, not boolean indexing: indexing by a mask syncs with the device to count it.
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(self._seen, penalized, logits))
        if self._counts is not None:
            logits -= params.frequency_penalty * self._counts
            logits -= params.presence_penalty * (self._counts > 0).float()
        if mask is not None:
            mask(logits)
        if params.greedy:
            return int(torch.argmax(logits))
        return self._sample(logits.clone())

    def _sample(self, logits: torch.Tensor) -> int:
        params = self.params
        logits /= params.temperature
        if params.top_k > 0 and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if params.min_p > 0.0:
            probs[probs < params.min_p * probs.max()] = 0.0
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cumulative - sorted_probs > params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))


def token_logprob(logits: torch.Tensor, token: int, top_n: int, decode: Callable[[int], str]) -> TokenLogprob:
    """Log-probability of the chosen token and the ``top_n`` most likely alternatives.

    Ties are ordered by one rule: the chosen token first among equals, then lower token ids first,
    which is also the order greedy choice breaks ties in (argmax returns the first maximal index).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top: list[TopLogprob] = []
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        candidates = dict(zip(ids.tolist(), values.tolist(), strict=True))
        cutoff = float(values[-1])
        if cutoff > float("-inf"):
            # topk picks arbitrarily among tokens tied at its cut: take them all, then order them.
            tied = (logprobs == cutoff).nonzero().flatten().tolist()
            candidates.update(dict.fromkeys(tied, cutoff))
        ranked = sorted(candidates.items(), key=lambda item: (-item[1], item[0] != token, item[0]))[:top_n]
        top = [TopLogprob(token=decode(i), token_id=i, logprob=v) for i, v in ranked]
    return TokenLogprob(token=decode(token), token_id=token, logprob=float(logprobs[token]), top=top)
