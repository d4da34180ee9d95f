"""Runtime planning: reference -> how to run it (backend, device, dtype, specialization, memory).

Planning reads config files and safetensors headers only, never weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ollm import catalogue
from ollm.catalogue import ModelKind
from ollm.devices import resolve_device, resolve_dtype
from ollm.errors import ModelNotFoundError, UnsupportedModelError
from ollm.memory import (
    FULL_ATTENTION_SLACK,
    MemoryPlan,
    MemoryStrategy,
    TextShape,
    human,
    kv_offload_wanted,
    quantization_saved_bytes,
    resolve_budget,
    safetensors_weight_bytes,
)
from ollm.packed_index import planned_packed_layout
from ollm.references import ModelReference
from ollm.settings import Quantization, RuntimeSettings, Settings, WorkerSettings
from ollm.specialization import SpecializationProvider, provider_for, providers, streaming_layout
from ollm.tensor_index import LayerLayout

__all__ = ["ModelKind", "RuntimePlan", "SupportLevel", "plan_model"]

SupportLevel = Literal["optimized", "generic", "unsupported"]


class RuntimePlan(BaseModel):
    reference: str
    resolved_reference: str
    path: Path | None = Field(None, description="Materialized directory; None when not materialized.")
    materialized: bool
    kind: ModelKind
    architecture: str | None = None
    model_type: str | None = None
    support_level: SupportLevel
    backend: Literal["optimized-native", "transformers-generic", "echo"]
    specialization_state: Literal["applied", "planned", "not-applicable", "disabled"]
    specialization_provider: str | None = None
    planned_passes: list[str] = Field(default_factory=list)
    applied_passes: list[str] = Field(default_factory=list)
    device: str
    dtype: str
    batch_invariant: bool = False
    quantization: Quantization = Field("none", description="Weight-only quantization the loader applies.")
    context_length: int | None = None
    dense_projection_chunk_rows: int = 0
    max_batch: int = Field(1, description="Sequences decoded together at most (worker.max_batch, or sized here).")
    max_batch_reason: str | None = Field(None, description="Where max_batch comes from.")
    memory: MemoryPlan = Field(default_factory=MemoryPlan)
    fallback_reason: str | None = None

    def expected_peak_bytes(self) -> int | None:
        """What the model is expected to hold at its peak (weights held at once + KV + activations; with
        layer streaming the weights held are the resident parts, the layer slots and the staging
        buffer); None if unknown.

        Memory accounting (the worker's, a scheduler's) should count this, not the weights' size."""
        return self.memory.expected_peak_bytes


_DEFAULT_PREFILL_TOKENS = int(WorkerSettings.model_fields["max_tokens_per_step"].default)
# The most sequences ``worker.max_batch = auto`` decodes together. CPU: in-process, SmolLM2 on 2
# cores (2026-12-04), 64 streams gave 487 tok/s batched as 64 against 367 as two waves of 32, and
# 128 streams 450 against 359 as waves of 64; more rows only lengthen every step. Accelerators:
# vLLM's default max_num_seqs. Batch-invariant mode pads every projection to max_batch rows, so
# there a larger batch is pure cost: it keeps the former default.
BATCH_CAP = {"cpu": 128, "accelerator": 256, "batch-invariant": 32}


def batch_cap(device: str, batch_invariant: bool) -> int:
    """What ``worker.max_batch = auto`` allows at most before the memory plan is read."""
    if batch_invariant:
        return BATCH_CAP["batch-invariant"]
    return BATCH_CAP["cpu" if device == "cpu" else "accelerator"]


def max_batch_for(plan: RuntimePlan, worker: WorkerSettings) -> int:
    """The engine's batch: an explicit ``worker.max_batch``, else (auto) the plan's."""
    return plan.max_batch if worker.max_batch == "auto" else worker.max_batch


def jobs_at_once(settings: Settings) -> int:
    """Jobs a worker runs at once: an explicit ``worker.max_batch``, else (auto) the most any of its
    models' plans may batch on its device; each engine's own scheduler holds the rest waiting."""
    worker = settings.worker
    if worker.max_batch != "auto":
        return worker.max_batch
    return batch_cap(resolve_device(settings.runtime.device), settings.runtime.batch_invariant)


def plan_model(
    reference: str,
    runtime: RuntimeSettings,
    context_tokens: int | None = None,
    prefill_tokens: int = _DEFAULT_PREFILL_TOKENS,
    max_batch: int | Literal["auto"] = "auto",
) -> RuntimePlan:
    """Decide how ``reference`` would run under ``runtime``, without loading anything heavy.

    The memory estimate covers one request of ``context_tokens`` tokens (default: the model's
    context) prefilled ``prefill_tokens`` at a time, beside a decode batch of ``max_batch``
    (``auto``: as many sequences as the budget leaves KV room for, up to ``batch_cap``).

    Raises InvalidReferenceError / ModelNotFoundError for references that cannot be resolved
    (ModelNotMaterializedError for a repo ID that was never pulled: there is no config to read),
    UnsupportedModelError when ``runtime.backend`` forces a backend that cannot run the model,
    and SettingsError for a device that does not exist here.
    """
    ref = catalogue.resolve(reference, runtime)
    if catalogue.is_echo(ref):
        return _echo_plan(reference, runtime)
    facts = _model_facts(ref, runtime)
    device = resolve_device(runtime.device)
    plan = RuntimePlan(
        reference=reference,
        resolved_reference=ref.name,
        path=facts.path,
        materialized=facts.path is not None,
        kind=facts.kind,
        architecture=facts.architecture,
        model_type=facts.model_type,
        support_level="generic",
        backend="transformers-generic",
        specialization_state="not-applicable",
        device=device,
        dtype=resolve_dtype(runtime.dtype, device),
        batch_invariant=runtime.batch_invariant,
        context_length=facts.context_length,
    )
    unsupported = _unsupported_reason(facts)
    if unsupported is not None:
        plan.support_level = "unsupported"
        plan.fallback_reason = unsupported
        if runtime.backend != "auto":
            raise UnsupportedModelError(f"cannot run {reference!r} with backend {runtime.backend}: {unsupported}")
        return plan
    _choose_backend(plan, provider_for(facts.model_type), runtime)
    rows = batch_cap(device, runtime.batch_invariant) if max_batch == "auto" else max_batch
    _plan_memory(plan, provider_for(facts.model_type), facts, runtime, context_tokens, prefill_tokens, rows)
    _plan_max_batch(plan, facts.shape, max_batch, rows, prefill_tokens)
    _plan_batch_state(plan, facts.shape)
    return plan


def _plan_batch_state(plan: RuntimePlan, shape: TextShape | None) -> None:
    """Count what every other sequence of a full batch holds whatever its length (the KV estimate
    is one request's): a linear-attention layer's whole state."""
    memory = plan.memory
    if shape is None or memory.expected_peak_bytes is None or memory.budget_bytes is None:
        return
    one = shape.kv_bytes_by_kind(1, plan.dtype).get("linear_attention", 0)
    state = one * (plan.max_batch - 1)
    if not state:
        return
    memory.batch_state_bytes = state
    memory.expected_peak_bytes += state
    if memory.fits and memory.expected_peak_bytes > memory.budget_bytes:
        memory.fits = False
        why = (
            f"{plan.max_batch} sequences' linear-attention state ({human(one * plan.max_batch)}) "
            f"brings the expected peak to {human(memory.expected_peak_bytes)}, over the budget of "
            f"{human(memory.budget_bytes)}: lower worker.max_batch or raise the budget"
        )
        memory.reason = "; ".join(filter(None, [memory.reason, why]))
        plan.fallback_reason = "; ".join(filter(None, [plan.fallback_reason, why]))


def _plan_max_batch(
    plan: RuntimePlan, shape: TextShape | None, setting: int | Literal["auto"], cap: int, prefill_tokens: int
) -> None:
    """``plan.max_batch``: the setting, or (auto) ``cap`` sequences unless what the budget leaves
    beside the weights and one forward holds fewer, each sequence counted at one prefill step of
    cache. That count includes what does not shrink with tokens: a linear-attention layer's state
    (qwen3-next) is held whole by every sequence, so it bounds the batch where a token budget cannot."""
    if setting != "auto":
        plan.max_batch, plan.max_batch_reason = setting, "worker.max_batch"
        return
    memory = plan.memory
    held, activations, budget = memory.weights_in_memory_bytes, memory.activations_bytes, memory.budget_bytes
    if held is not None:
        held += memory.expert_cache_bytes or 0  # the experts kept ready take their share of the budget first
    plan.max_batch = cap
    plan.max_batch_reason = f"auto: {cap}, the most for {plan.device}" + (
        " in batch-invariant mode" if plan.batch_invariant else ""
    )
    if shape is None or held is None or activations is None or budget is None:
        return
    by_kind = shape.kv_bytes_by_kind(prefill_tokens, plan.dtype)
    if memory.kv_offload:  # full-attention layers' cache is on disk; the rest stays in memory
        by_kind.pop("full_attention", None)
        held += memory.kv_resident_bytes or 0
    per_sequence = sum(by_kind.values())
    room = max(budget - held - activations, 0)
    if per_sequence == 0 or room >= cap * per_sequence:
        return
    plan.max_batch = max(room // per_sequence, 1)
    plan.max_batch_reason = (
        f"auto: the budget leaves {human(room)} beside the weights and one forward, {human(per_sequence)} "
        f"a sequence at one prefill step ({prefill_tokens} tokens)"
    )


class _ModelFacts(BaseModel):
    path: Path | None
    kind: ModelKind
    architecture: str | None
    model_type: str | None
    context_length: int | None
    shape: TextShape | None = None


def _model_facts(ref: ModelReference, runtime: RuntimeSettings) -> _ModelFacts:
    path = catalogue.materialized_path(ref, runtime)
    if path is not None:
        config: dict[str, Any] = catalogue.read_json(path / "config.json") or {}
        architectures = config.get("architectures") or [None]
        return _ModelFacts(
            path=path,
            kind=catalogue.detect_kind(config, path),
            architecture=architectures[0],
            model_type=config.get("model_type"),
            context_length=catalogue.context_length(config, path),
            shape=TextShape.from_config(config),
        )
    entry = catalogue.find_alias(ref.name) if ref.kind == "alias" else None
    if entry is None:
        catalogue.require_materialized(ref, runtime)  # raises with the pull hint
        raise ModelNotFoundError(f"model {ref.raw!r} is not available")
    return _ModelFacts(
        path=None,
        kind=entry.kind,
        architecture=entry.architecture,
        model_type=entry.model_type,
        context_length=entry.context_length,
    )


def _unsupported_reason(facts: _ModelFacts) -> str | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if facts.model_type is None:
        return "config.json has no model_type, so Transformers cannot build the model"
    if facts.model_type not in CONFIG_MAPPING_NAMES:
        return f"model_type {facts.model_type!r} is not known to the installed Transformers"
    return None


def _choose_backend(plan: RuntimePlan, provider: SpecializationProvider | None, runtime: RuntimeSettings) -> None:
    if provider is not None:
        plan.specialization_provider = provider.name
        plan.planned_passes = list(provider.pass_ids)
    forced = runtime.backend
    if forced == "optimized-native":
        if not runtime.use_specialization:
            raise UnsupportedModelError(
                "backend optimized-native conflicts with use_specialization=false (--no-specialization)"
            )
        if provider is None:
            families = ", ".join(p.name for p in providers())
            raise UnsupportedModelError(
                f"no optimized-native provider applies to model_type {plan.model_type!r} "
                f"(providers exist for: {families}); use --backend auto or transformers-generic"
            )
        if provider.missing_passes():
            raise UnsupportedModelError(
                f"{provider.name} provider passes {provider.missing_passes()} are not implemented yet, so "
                f"optimized-native cannot run {plan.reference!r}; use --backend auto or transformers-generic"
            )
    if provider is None:
        return
    # Chunking the MLP changes the generic forward only: it applies whether or not the rest of the
    # provider's passes exist.
    chunked = provider.chunked_projection_pass
    if (
        chunked is not None
        and chunked in provider.implemented_passes
        and runtime.dense_projection_chunk_rows > 0
        and runtime.use_specialization
        and forced != "transformers-generic"
    ):
        plan.applied_passes.append(chunked)
        plan.dense_projection_chunk_rows = runtime.dense_projection_chunk_rows
    if not runtime.use_specialization:
        plan.specialization_state = "disabled"
        plan.fallback_reason = "specialization disabled (use_specialization=false); running transformers-generic"
    elif forced == "transformers-generic":
        plan.specialization_state = "disabled"
        plan.fallback_reason = "backend forced to transformers-generic"
    elif provider.missing_passes():
        plan.specialization_state = "planned"
        plan.fallback_reason = (
            f"{provider.name} provider passes {provider.missing_passes()} are not implemented yet; "
            "running transformers-generic"
        )
    else:
        plan.specialization_state = "applied"
        plan.support_level = "optimized"
        plan.backend = "optimized-native"
        if provider.attention_pass is not None:
            plan.applied_passes.insert(0, provider.attention_pass)


def _plan_memory(
    plan: RuntimePlan,
    provider: SpecializationProvider | None,
    facts: _ModelFacts,
    runtime: RuntimeSettings,
    context_tokens: int | None,
    prefill_tokens: int,
    max_batch: int,
) -> None:
    memory = plan.memory
    memory.budget_bytes, memory.budget_source = resolve_budget(runtime.memory_budget, plan.device)
    memory.enforced = runtime.memory_budget != "auto"
    layout = _streaming_layout(plan, provider, facts, runtime)
    forced = runtime.layer_streaming == "on"
    if forced and isinstance(layout, str):
        raise UnsupportedModelError(
            f"runtime.layer_streaming=on, but {plan.reference!r} cannot stream its layers: {layout}; "
            "set it to auto or off"
        )
    if facts.path is not None:
        memory.weights_bytes = safetensors_weight_bytes(facts.path, plan.dtype)
        _plan_quantization(plan, runtime, facts.path)
    # An encoder (embedding model) keeps no KV cache between forwards.
    tokens = 0 if plan.kind == "embedding" else context_tokens or facts.context_length
    shape = facts.shape
    if shape is not None and tokens is not None:
        memory.kv_cache_tokens = tokens
        # In memory, a full layer also holds the spare columns it grows into (slack_layer.py).
        by_kind = shape.kv_bytes_by_kind(tokens, plan.dtype, FULL_ATTENTION_SLACK)
        memory.kv_cache_bytes_by_layer_kind, memory.kv_cache_bytes = by_kind, sum(by_kind.values())
        step = min(prefill_tokens, tokens or prefill_tokens)
        memory.activations_bytes = shape.activation_bytes(
            step, max(tokens, step), plan.dense_projection_chunk_rows, max_batch, plan.dtype
        )
    weights, kv, activations = memory.weights_bytes, memory.kv_cache_bytes, memory.activations_bytes
    if weights is None or kv is None or activations is None or tokens is None or shape is None:
        if facts.path is None:
            missing = "the model is not materialized, so there are no files to read"
        elif weights is None:
            missing = "no safetensors files"
        else:
            missing = "config.json lacks the decoder's dimensions"
        memory.reason = f"cannot estimate memory: {missing}"
        return
    budget = memory.budget_bytes
    assert budget is not None
    held = weights
    if isinstance(layout, LayerLayout) and (forced or weights + activations > budget):
        assert provider is not None and facts.path is not None
        if plan.quantization != "none":
            # Quantized layers stream packed: their slots and reads are the packed bytes.
            layout = planned_packed_layout(facts.path, layout, plan.quantization, plan.dtype, plan.device.split(":")[0])
        held = _plan_streaming(plan, provider, layout, plan.dtype, plan.device)
    memory.weights_in_memory_bytes = held
    memory.expected_peak_bytes = held + kv + activations
    memory.fits = memory.expected_peak_bytes <= budget
    weights_text = _weights_text(memory, weights)
    # The one place the KV-offload decision is made. With it, one layer's cache is in memory several
    # times over while it runs: read back from its file, the keys/values handed to attention, and
    # their copy expanded to every query head (grouped-query attention with a mask repeats the KV heads).
    kv_pass = _kv_offload_pass(plan, provider, runtime)
    # Only full-attention layers offload; sliding-window and linear-attention layers stay in memory.
    # Offloaded layers hold exactly their tokens, on disk (no spare columns).
    exact = shape.kv_bytes_by_kind(tokens, plan.dtype)
    full_kv = exact.get("full_attention", 0)
    resident_kv = sum(exact.values()) - full_kv
    resident_kv += (2 + shape.heads // max(shape.kv_heads, 1)) * full_kv // max(shape.full_layers, 1)
    if kv_pass is not None and kv_offload_wanted(memory, runtime.kv_offload, held, resident_kv):
        plan.applied_passes.append(kv_pass)
        memory.kv_offload = True
        memory.kv_cache_bytes_by_layer_kind, memory.kv_cache_bytes = exact, sum(exact.values())
        kv = memory.kv_cache_bytes
        memory.kv_resident_bytes = resident_kv
        memory.expected_peak_bytes = held + activations + resident_kv
        memory.fits = memory.expected_peak_bytes <= budget
    if memory.fits:
        memory.strategy = _strategy(memory.layer_streaming, memory.kv_offload)
        cache_text = _plan_expert_cache(memory, budget)
        if memory.layer_streaming or memory.kv_offload:
            kv_text = (
                f"KV cache for {tokens} tokens {human(kv)} on disk, {human(resident_kv)} of it in memory"
                if memory.kv_offload
                else f"KV cache for {tokens} tokens {human(kv)}"
            )
            how = " and ".join(
                what
                for what, on in (
                    ("decoder layers stream from disk", memory.layer_streaming),
                    ("the KV cache is offloaded to disk", memory.kv_offload),
                )
                if on
            )
            memory.reason = (
                f"{how}: {weights_text}; {kv_text}; activations {human(activations)}{cache_text}: expected peak "
                f"{human(memory.expected_peak_bytes)}, within the budget of {human(budget)} ({memory.budget_source})"
            )
        return
    memory.strategy = "over-budget"
    # What one more token of context costs (the fixed parts, linear state and spare columns, cancel out).
    per_token = max(shape.kv_bytes(2, plan.dtype) - shape.kv_bytes(1, plan.dtype), 1)
    # With the cache offloaded there is nothing left to cap: the weights held and one forward are the overrun.
    memory.kv_cache_token_limit = 0 if memory.kv_offload else max(budget - held - activations, 0) // per_token
    layer_pass = (provider and provider.layer_streaming_pass) or "layer streaming (no pass for this family)"
    kv_name = (provider and provider.kv_offload_pass) or "KV offload (no pass for this family)"
    memory.required_passes = ([] if weights + activations <= budget else [layer_pass]) + [kv_name]
    kv_part = (
        f"{human(resident_kv)} of KV cache in memory ({human(kv)} for {tokens} tokens offloaded)"
        if memory.kv_offload
        else f"KV cache for {tokens} tokens {human(kv)}"
    )
    memory.reason = (
        f"expected peak {human(memory.expected_peak_bytes)} ({weights_text} + {kv_part} + activations "
        f"{human(activations)}) exceeds the budget of {human(budget)} ({memory.budget_source}). "
    )
    if held + activations > budget:
        if memory.layer_streaming:
            memory.reason += f"Even streamed ({layer_pass}), the weights held and one forward exceed it. "
        elif isinstance(layout, str):
            memory.reason += f"{layer_pass} would stream the layers, but cannot here: {layout}. "
    elif kv_pass is None:
        memory.reason += f"{kv_name} would keep the whole context under it, but cannot apply here. "
    elif runtime.kv_offload == "off":
        memory.reason += f"{kv_name} would keep the whole context under it, but runtime.kv_offload=off. "
    capped: MemoryStrategy = "streamed-layers-capped-kv" if memory.layer_streaming else "resident-capped-kv"
    running = "Running with the layers streamed" if memory.layer_streaming else "Running resident"
    if memory.kv_cache_token_limit > 0 and memory.enforced:
        memory.strategy = capped
        memory.reason += f"{running}, with the KV cache capped at {memory.kv_cache_token_limit} tokens across requests."
        memory.expected_peak_bytes = held + activations + memory.kv_cache_token_limit * per_token
        memory.fits = True
    elif memory.enforced:
        memory.reason += (
            "Loading refuses: raise runtime.memory_budget (--memory-budget) or use a smaller model or dtype."
        )
    else:
        memory.reason += f"{running} anyway: the system may swap or run out of memory."
    plan.fallback_reason = "; ".join(filter(None, [plan.fallback_reason, memory.reason]))


def _plan_quantization(plan: RuntimePlan, runtime: RuntimeSettings, path: Path) -> None:
    """Apply ``runtime.quantization`` to the plan: the packed size replaces the decoder weights' size."""
    mode = runtime.quantization
    if mode == "none":
        return
    if plan.kind != "causal-lm":
        _skip_quantization(plan, f"it applies to causal LMs, not {plan.kind} models", mode)
        return
    if plan.device.split(":")[0] not in ("cpu", "cuda"):
        _skip_quantization(plan, f"torch's packed kernels run on cpu or cuda, not {plan.device}", mode)
        return
    saved = quantization_saved_bytes(path, plan.dtype, mode)
    plan.quantization = mode
    plan.memory.quantization_saved_bytes = saved
    if plan.memory.weights_bytes is not None:
        plan.memory.weights_bytes -= saved


def _skip_quantization(plan: RuntimePlan, why: str, mode: str | None = None) -> None:
    note = f"runtime.quantization={mode or plan.quantization} ignored: {why}; the weights stay {plan.dtype}"
    plan.quantization = "none"
    plan.fallback_reason = "; ".join(filter(None, [plan.fallback_reason, note]))


STREAM_SLOTS = 2  # one layer computes while the next one fills


def _streaming_layout(
    plan: RuntimePlan, provider: SpecializationProvider | None, facts: _ModelFacts, runtime: RuntimeSettings
) -> LayerLayout | str:
    """Where each streamed layer's tensors are, or why the layers cannot stream (for the plan)."""
    if runtime.layer_streaming == "off":
        return "runtime.layer_streaming=off"
    streaming = provider.layer_streaming_pass if provider else None
    if provider is None or streaming is None or streaming not in provider.implemented_passes:
        return f"no layer-streaming pass is implemented for model_type {plan.model_type!r}"
    if not runtime.use_specialization:
        return "specialization is disabled (use_specialization=false, --no-specialization)"
    if runtime.backend == "transformers-generic":
        return "the backend is forced to transformers-generic"
    if plan.kind not in ("causal-lm", "image-text", "audio-text"):
        return f"layer streaming runs decoders, not {plan.kind} models"
    if plan.device.split(":")[0] not in ("cpu", "cuda"):
        return f"layer streaming runs on cpu or cuda, not {plan.device}"
    if facts.path is None:
        return "the model is not materialized"
    config = catalogue.read_json(facts.path / "config.json") or {}
    return streaming_layout(facts.path, config)


def _plan_streaming(
    plan: RuntimePlan, provider: SpecializationProvider, layout: LayerLayout, dtype: str, device: str
) -> int:
    """Fill in the streamed parts (and offloaded experts); returns the weights held at once."""
    memory = plan.memory
    memory.layer_streaming = True
    assert provider.layer_streaming_pass is not None  # a layout exists only for a family that streams
    plan.applied_passes.append(provider.layer_streaming_pass)
    experts = layout.has_experts()
    if experts and provider.expert_offload_pass is not None:
        plan.applied_passes.append(provider.expert_offload_pass)
        memory.expert_offload = True
        memory.experts_bytes = layout.expert_bytes(dtype)
        memory.expert_buffer_bytes = layout.expert_buffer_bytes(dtype)
        memory.expert_bytes_per_token = layout.expert_bytes_per_token(dtype)
    if layout.on_demand and provider.on_demand_pass is not None:
        plan.applied_passes.append(provider.on_demand_pass)
        memory.encoder_bytes = layout.on_demand_bytes(dtype)
    memory.resident_weights_bytes = layout.resident_bytes(dtype)
    memory.layer_bytes = layout.layer_bytes(dtype, experts)
    memory.stream_slots = min(STREAM_SLOTS, len(layout.layers))
    memory.slots_bytes = layout.slot_bytes(dtype, STREAM_SLOTS, experts)
    side = experts or bool(layout.on_demand)  # a second staging buffer for reads on the compute thread
    memory.staging_bytes = layout.staging_bytes(dtype, device.split(":")[0]) * (2 if side else 1)
    # Experts and an encoder are never read at once: the encoder runs before the decoder layers.
    on_compute = max(memory.expert_buffer_bytes or 0, memory.encoder_bytes or 0)
    return memory.resident_weights_bytes + memory.slots_bytes + memory.staging_bytes + on_compute


# What the expert cache leaves of the budget: the MoE peaks measured up to 177 MiB above the plan
# (docs/memory.md), so the cache never takes the last of it.
EXPERT_CACHE_MARGIN = 256 * 2**20


def _plan_expert_cache(memory: MemoryPlan, budget: int) -> str:
    """With expert offload, what the budget has room for beside the rest keeps the first experts used."""
    if not memory.expert_offload or memory.expected_peak_bytes is None:
        return ""
    room = budget - memory.expected_peak_bytes - EXPERT_CACHE_MARGIN
    memory.expert_cache_bytes = min(memory.experts_bytes or 0, max(room, 0))
    memory.expected_peak_bytes += memory.expert_cache_bytes
    return f"; experts cached as they are used: {human(memory.expert_cache_bytes)}" if memory.expert_cache_bytes else ""


def _weights_text(memory: MemoryPlan, weights: int) -> str:
    if memory.quantization_saved_bytes:
        return f"weights {human(weights)} (quantized, {human(memory.quantization_saved_bytes)} saved)"
    if not memory.layer_streaming:
        return f"weights {human(weights)}"
    assert memory.weights_in_memory_bytes is not None and memory.layer_bytes is not None
    experts = (
        f" + chosen experts at most {human(memory.expert_buffer_bytes or 0)} (of {human(memory.experts_bytes or 0)}"
        f" on disk; {human(memory.expert_bytes_per_token or 0)} read per decoded token)"
        if memory.expert_offload
        else ""
    )
    return (
        f"weights {human(weights)} streamed, {human(memory.weights_in_memory_bytes)} held: resident "
        f"{human(memory.resident_weights_bytes or 0)} + layer slots {human(memory.slots_bytes or 0)} "
        f"({memory.stream_slots} x {human(memory.layer_bytes)}) + staging {human(memory.staging_bytes or 0)}{experts}"
    )


def _kv_offload_pass(
    plan: RuntimePlan, provider: SpecializationProvider | None, runtime: RuntimeSettings
) -> str | None:
    """The family's KV offload pass when it can apply to this plan; with kv_offload=on, says why not."""
    kv_pass = provider.kv_offload_pass if provider else None
    why_not = None
    if kv_pass is None or provider is None or kv_pass not in provider.implemented_passes:
        why_not = f"no KV offload pass is implemented for model_type {plan.model_type!r}"
    elif not runtime.use_specialization or runtime.backend == "transformers-generic":
        why_not = "specialization is disabled"
    elif plan.kind != "causal-lm":
        why_not = f"it applies to causal LMs, not {plan.kind}"
    if why_not is None:
        return kv_pass
    if runtime.kv_offload == "on":
        note = f"runtime.kv_offload=on ignored: {why_not}; the KV cache stays in memory"
        plan.fallback_reason = "; ".join(filter(None, [plan.fallback_reason, note]))
    return None


def _strategy(streamed: bool, offloaded: bool) -> MemoryStrategy:
    if streamed and offloaded:
        return "streamed-layers-kv-offload"
    if streamed:
        return "streamed-layers"
    return "kv-offload" if offloaded else "resident"


def _echo_plan(reference: str, runtime: RuntimeSettings) -> RuntimePlan:
    # echo has no weights: it runs on the host whatever device is configured.
    return RuntimePlan(
        reference=reference,
        resolved_reference=catalogue.ECHO_ALIAS,
        path=None,
        materialized=True,
        kind="echo",
        architecture=None,
        model_type=None,
        support_level="generic",
        backend="echo",
        specialization_state="not-applicable",
        device="cpu",
        dtype="float32",
        context_length=None,
        fallback_reason=(
            None if runtime.backend == "auto" else f"backend {runtime.backend} does not apply to echo; running echo"
        ),
    )
