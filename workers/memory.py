"""A worker's memory: its budget for models, and what a model counts against it.

A model counts as its plan's expected peak (``RuntimePlan.expected_peak_bytes()``: the weights it
holds, its KV cache, one forward's activations), not as its weights: a model that fits by its
weights can still run out of memory once its cache fills.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import psutil

from ollm.settings import Settings

if TYPE_CHECKING:
    from ollm.plan import RuntimePlan

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
    # Not imported here: a process that never imported torch holds no torch module, and an echo
    # worker must not pay torch's start-up to learn so.
    torch = sys.modules.get("torch")
    if torch is None:
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


def plan_for(reference: str, settings: Settings) -> RuntimePlan:
    """The model's plan as this worker would run it: its batch size and prefill step."""
    from ollm.plan import plan_model

    return plan_model(
        reference,
        settings.runtime,
        prefill_tokens=settings.worker.max_tokens_per_step,
        max_batch=settings.worker.max_batch,
    )


def planned_bytes(plan: RuntimePlan) -> int:
    """What the worker counts a model as taking before it loads: the plan's expected peak (the
    weights it holds, its KV cache, one forward's activations). Only when the plan cannot estimate
    it, the weights' size plus 10%, and the log says so."""
    peak = plan.expected_peak_bytes()
    if peak is not None:
        return peak
    from ollm import catalogue

    weights = catalogue.estimated_memory(plan.path, plan.dtype)
    if plan.path is not None:  # echo has nothing to estimate
        reason = plan.memory.reason or "the plan has no memory estimate"
        log.info("%s: %s; counting its weights instead (%d bytes)", plan.reference, reason, weights)
    return weights


def counted_bytes(plan: RuntimePlan, measured: int | None) -> int:
    """What a loaded model counts against the budget: its planned peak, or what its parameters and
    buffers really take if that is more; without a plan estimate, what they take."""
    peak = plan.expected_peak_bytes()
    if peak is not None:
        return max(peak, measured or 0)
    return measured if measured is not None else planned_bytes(plan)


def planned_peaks(settings: Settings) -> dict[str, int]:
    """The planned peak of every model under ``runtime.models_dir``, by directory name: what the
    server's scheduler sizes a model by on this worker (it cannot plan: that needs torch). Models
    the plan cannot estimate are left out (the scheduler then counts their weights)."""
    from ollm import catalogue

    peaks: dict[str, int] = {}
    for path in catalogue.directories_in(settings.runtime.resolved_models_dir()):
        if not catalogue.is_model_dir(path):
            continue
        try:
            peak = plan_for(str(path), settings).expected_peak_bytes()
        except Exception as exc:  # a broken directory is the scheduler's 404 to give, not a crash here
            log.debug("cannot plan %s: %s", path, exc)
            continue
        if peak is None:
            log.info("%s: the plan cannot estimate its memory; the scheduler will count its weights", path.name)
        else:
            peaks[path.name] = peak
    return peaks
