"""A worker's memory: its budget for models, and what a loaded model really takes."""

from __future__ import annotations

import logging
from typing import Any

import psutil

log = logging.getLogger(__name__)

# Of the memory available when the worker starts, the share models may take: the rest is for the
# KV caches, activations and everything else on the machine.
DEFAULT_SHARE = 0.8


def default_budget(device: str, sharing: int = 1) -> int:
    """80% of the memory available now (the GPU's own on a CUDA device), split ``sharing`` ways
    (the embedded workers of one `ollm serve` share one machine)."""
    available = psutil.virtual_memory().available
    if device.startswith("cuda"):
        try:
            import torch

            index = int(device.split(":", 1)[1]) if ":" in device else 0
            available, _total = torch.cuda.mem_get_info(index)
        except Exception as exc:  # no usable device: the planner will say so when loading
            log.warning("could not read %s memory (%s); budgeting from RAM", device, exc)
    return int(available * DEFAULT_SHARE / max(1, sharing))


def resident_bytes(model: Any) -> int | None:
    """Bytes of the torch parameters and buffers a loaded engine or embedder holds, counted once
    each; None when it holds no torch module (the echo engine)."""
    try:
        import torch
    except ImportError:
        return None
    modules = [value for value in _attributes(model) if isinstance(value, torch.nn.Module)]
    if not modules:
        return None
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            pointer = tensor.data_ptr()
            if pointer in seen:
                continue
            seen.add(pointer)
            total += tensor.numel() * tensor.element_size()
    return total


def _attributes(model: Any, depth: int = 2) -> list[Any]:
    """The object and what its attributes hold, ``depth`` levels down (engines wrap their model)."""
    found = [model]
    if depth and hasattr(model, "__dict__"):
        for value in vars(model).values():
            found += _attributes(value, depth - 1)
    return found
