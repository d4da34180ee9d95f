"""The ``<family>.sdpa-attention`` pass's attention: Transformers' SDPA, with every decode query packed.

With grouped-query attention and one query per row, Transformers' SDPA path takes one of two forms.
With a padding mask it packs the query heads that share a key/value head into the query-length
dimension and attends over the key/value heads as they are (``pack_gqa``). Without one (a sequence
alone, or a batch with no padding) it passes ``enable_gqa=True`` instead, and torch's CPU kernel is
slower that way: measured on SmolLM2 (9 query heads over 3 key/value heads, 2-core AVX-512 CPU, one
run), the int4 decode step took 19.5 -> 18.1 ms at one row and 57.6 -> 45.5 ms at 16 unpadded rows
once packed; bf16 67.4 -> 59.6 ms at 16. So ``ollm_sdpa`` packs a decode query whatever the mask,
and a sequence alone takes the very kernel form it takes in a padded batch. Every other call
(prefill, a mask, softcap or position bias, no grouping) is Transformers' ``sdpa`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "ollm_sdpa"


def packed_decode_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    plain = all(kwargs.get(name) is None for name in ("softcap", "position_bias"))
    if queries != 1 or kv_heads == heads or attention_mask is not None or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    packed = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(packed, key, value, scale=kwargs.get("scaling"))
    # [batch, 1, heads, value dim], the layout Transformers' attention functions return.
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_decode_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
