"""Chunked dense projections (the ``<family>.chunked-mlp`` pass): bounded activations on long prefills.

A gated MLP computes ``down(act(gate(x)) * up(x))``; over a prefill of T tokens the generic forward
holds three ``[T x intermediate]`` tensors at once (gate, up and their product), several times the
hidden states' size. Each row of the MLP depends on its own token only, so the rows can run in
chunks of ``rows``: the output is the same tensor, and at most ``[rows x intermediate]`` is alive.

The LM head needs no chunking here: the engine asks for the last position's logits only
(``logits_to_keep=1``), so a long prompt never produces ``[tokens x vocab]``.

The pass calls the projections as modules, so it composes with batch-invariant mode, which
replaces each ``nn.Linear``'s forward: every chunk then runs at its fixed row count.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj"))


def _chunked_forward(mlp: nn.Module, rows: int, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= rows:
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(flat)) * mlp.up_proj(flat)).reshape(x.shape)  # type: ignore[operator]
    out = torch.empty_like(flat)
    for start in range(0, flat.shape[0], rows):
        part = flat[start : start + rows]
        out[start : start + rows] = mlp.down_proj(mlp.act_fn(mlp.gate_proj(part)) * mlp.up_proj(part))  # type: ignore[operator]
    return out.reshape(x.shape)


def chunk_mlps(model: nn.Module, rows: int) -> int:
    """Run every gated MLP of ``model`` over at most ``rows`` tokens at a time; returns how many."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    count = 0
    for module in model.modules():
        if _is_gated_mlp(module) and callable(getattr(module, "act_fn", None)):
            # An instance attribute: nn.Module.__call__ looks forward up on the instance first.
            module.forward = partial(_chunked_forward, module, rows)
            count += 1
    return count
