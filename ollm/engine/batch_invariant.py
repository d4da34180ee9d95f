"""Batch-invariant execution: a request's tokens do not depend on what else runs beside it.

A sequence's numbers can change with its neighbours in a batch in three places, and each is closed
by giving every kernel call the same shape alone or batched:

- **Matrix multiplications.** BLAS libraries pick kernels and blocking by the row count M, so a
  row rounds differently at M=1 than at M=8 (bfloat16 on CPUs with AMX differs by up to 0.55 in a
  logit). Every linear layer here runs with at least ``rows`` rows, padding with zeros, so a
  decode step always has the same M; within one shape, a row's result does not depend on its
  position or on the other rows' values.
- **Attention.** In a batch each sequence's cache is left-padded to the longest one; a masked
  kernel over a longer, padded key range sums in another order. Attention here runs per sequence
  over its own unpadded keys, the very call it would get alone.
- **Prefill.** Prompts are prefilled one per forward (the engine's job), never padded together.

The cost is the padded rows' compute (small against reading the weights at low batch sizes) and
one attention call per sequence and layer; `bench.run` measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ollm.engine.decode_attention import packed_decode_sdpa
from ollm.engine.quantize import QuantizedLinear

ATTENTION = "ollm_batch_invariant"


def _per_sequence_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if query.shape[2] > 1:
        # Prefill: the engine runs one sequence per forward, so this is the call it gets alone.
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # sdpa_mask gives a boolean [batch, 1, queries, keys] mask (True = attend) or None when nothing
    # is masked; the engine pads on the left, so a row's padding is its leading run of False.
    starts = [0] * query.shape[0] if attention_mask is None else (~attention_mask[:, 0, -1, :]).sum(dim=-1).tolist()
    # One decode query per row attends to all of that row's own keys, unmasked: the call it gets alone.
    outputs = [
        packed_decode_sdpa(
            module,
            query[row : row + 1],
            key[row : row + 1, :, start:],
            value[row : row + 1, :, start:],
            None,
            scaling=scaling,
            **kwargs,
        )[0]
        for row, start in enumerate(starts)
    ]
    return torch.cat(outputs), None


def _fixed_rows_linear(forward: Callable[[torch.Tensor], torch.Tensor], rows: int, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    count = flat.shape[0]
    if count < rows:
        flat = torch.cat([flat, flat.new_zeros(rows - count, flat.shape[1])])
    out = forward(flat)[:count]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def make_batch_invariant(model: PreTrainedModel, rows: int) -> None:
    """Run ``model`` so that each sequence's logits are the same in any batch of up to ``rows``."""
    AttentionInterface.register(ATTENTION, _per_sequence_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
    for module in model.modules():
        # Quantized layers too: torch's packed kernels also block by the row count.
        if isinstance(module, (nn.Linear, QuantizedLinear)):
            # An instance attribute: nn.Module.__call__ looks forward up on the instance first.
            module.forward = partial(_fixed_rows_linear, module.forward, rows)  # type: ignore[method-assign]
