"""Family specialization providers, found by ``model_type`` through one registry.

A provider declares the optimization passes it would apply to a family. The planner looks the
provider up here instead of branching on model families in a loader, and only selects the
``optimized-native`` backend when every declared pass is implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollm.tensor_index import (
    LayerLayout,
    LayerParams,
    LayerParamsOf,
    TensorEntry,
    decoder_layout,
    direct_params,
    index_tensors,
    text_config,
)


def _direct(layer: dict[str, TensorEntry], config: dict[str, Any]) -> LayerParams | str:
    return direct_params(layer)


@dataclass(frozen=True)
class SpecializationProvider:
    name: str
    model_types: frozenset[str]
    pass_ids: tuple[str, ...]
    implemented_passes: frozenset[str] = field(default_factory=frozenset)
    # The roles the planner asks for by name; each is one of pass_ids or None.
    attention_pass: str | None = None  # attention through SDPA's fused kernels, never [tokens x tokens]
    chunked_projection_pass: str | None = None
    layer_streaming_pass: str | None = None
    kv_offload_pass: str | None = None
    expert_offload_pass: str | None = None
    # How a layer's tensors in the files fill the layer's parameters (the layout layer streaming reads).
    layer_params: LayerParamsOf = _direct
    # The config.json key of the router's top-k, for mixture-of-experts families.
    experts_per_token_key: str | None = None
    # Encoders (image, audio) that, when the layers stream, are read when they run and dropped after.
    on_demand_modules: tuple[str, ...] = ()
    on_demand_pass: str | None = None

    def missing_passes(self) -> list[str]:
        return [pass_id for pass_id in self.pass_ids if pass_id not in self.implemented_passes]


_REGISTRY: dict[str, SpecializationProvider] = {}


def register(provider: SpecializationProvider) -> None:
    for model_type in provider.model_types:
        existing = _REGISTRY.get(model_type)
        if existing is not None and existing.name != provider.name:
            raise ValueError(f"model_type {model_type!r} already belongs to provider {existing.name!r}")
        _REGISTRY[model_type] = provider


def provider_for(model_type: str | None) -> SpecializationProvider | None:
    if model_type is None:
        return None
    return _REGISTRY.get(model_type)


def streaming_layout(path: Path, config: dict[str, Any]) -> LayerLayout | str:
    """The family provider's layout of ``path``'s tensors (what layer streaming reads), or why none."""
    provider = provider_for(config.get("model_type"))
    if provider is None:
        return f"no family provider for model_type {config.get('model_type')!r}"
    key = provider.experts_per_token_key
    top_k = int(text_config(config).get(key) or 0) if key else 0
    return decoder_layout(index_tensors(path), config, provider.layer_params, top_k, provider.on_demand_modules)


def providers() -> list[SpecializationProvider]:
    return sorted({provider.name: provider for provider in _REGISTRY.values()}.values(), key=lambda p: p.name)


# Imported last: each module registers its provider on import.
from ollm.specialization import gemma3, gpt_oss, llama, qwen3_next, voxtral  # noqa: E402, F401
