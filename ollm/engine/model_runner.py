"""The model runner: builds a forward's inputs (ids, positions, masks) from the scheduler's decision.

A batch's attention mask is ``[rows, columns]``: 1 over each row's real tokens, 0 over its left
padding. Positions come from the mask, so every sequence sees the positions it would see alone;
the cache's layers are padded to the same columns (cache_manager.py). Each method returns the
mask the batch has after the forward and the logits of each row's last token.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel


class ModelRunner:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._device = model.device

    def prefill(
        self, prompts: list[list[int]], cache: DynamicCache, inputs: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts left-padded into one forward over a fresh ``cache``; ``inputs``: one prompt's images
        or audio (pixel values, features), encoded in this forward."""
        length = max(len(ids) for ids in prompts)
        # Padding positions are masked out, so the id placed there is irrelevant.
        input_ids = torch.zeros((len(prompts), length), dtype=torch.long, device=self._device)
        mask = torch.zeros((len(prompts), length), dtype=torch.long, device=self._device)
        for row, ids in enumerate(prompts):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, device=self._device)
            mask[row, length - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return mask, self._forward(input_ids, mask, positions, cache, logits_to_keep=1, **(inputs or {}))

    def prefill_chunk(self, ids: list[int], done: int, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The next chunk of one long prompt whose first ``done`` tokens are in ``cache``."""
        input_ids = torch.tensor([ids], device=self._device)
        mask = torch.ones((1, done + len(ids)), dtype=torch.long, device=self._device)
        positions = torch.arange(done, done + len(ids), device=self._device).unsqueeze(0)
        return mask, self._forward(input_ids, mask, positions, cache, logits_to_keep=1)

    def decode(
        self, tokens: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every row of the running batch."""
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        return mask, self._forward(tokens.unsqueeze(1), mask, positions, cache)

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        logits_to_keep: int = 0,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **inputs,
        )
        return out.logits[:, -1, :]
