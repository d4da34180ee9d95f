"""Qwen3-Next (hybrid linear attention with sparse mixture-of-experts).

Its checkpoints keep one tensor per expert and projection (``mlp.experts.<e>.gate_proj.weight``...);
the model fuses them into ``[experts, ...]`` parameters (``gate_up_proj``: gate rows then up rows).
The layout maps each expert's tensors onto its slice of the fused parameters, so expert offload
reads just the experts the router picks. Linear-attention and full-attention layers have different
parameters: each kind streams through its own slots. The linear-attention state is the cache
manager's ``LinearState`` (fixed size per sequence, kept in memory).
"""

import re
from typing import Any

from ollm.specialization import SpecializationProvider, register
from ollm.tensor_index import FLOATING_BYTES, LayerParam, LayerParams, Piece, TensorEntry, direct_params

_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def layer_params(layer: dict[str, TensorEntry], config: dict[str, Any]) -> LayerParams | str:
    rest: dict[str, TensorEntry] = {}
    found: dict[str, dict[int, TensorEntry]] = {"gate": {}, "up": {}, "down": {}}
    for suffix, entry in layer.items():
        match = _EXPERT.fullmatch(suffix)
        if match is None:
            rest[suffix] = entry
            continue
        if entry.dtype not in FLOATING_BYTES:
            return f"{entry.name} is {entry.dtype}; only floating tensors stream"
        found[match[2]][int(match[1])] = entry
    params = direct_params(rest, experts="mlp.experts")  # checkpoints already in the fused form, too
    if isinstance(params, str) or not any(found.values()):
        return params
    count = int(config.get("num_experts") or 0)
    for projection, experts in found.items():
        if sorted(experts) != list(range(count)):
            covered = sorted(experts)
            return f"mlp.experts.*.{projection}_proj.weight covers experts {covered}, not the {count} of config.json"
    inter, hidden = found["gate"][0].shape
    gate_up = tuple(
        piece for e in range(count) for piece in (Piece(found["gate"][e], e), Piece(found["up"][e], e, row=inter))
    )
    params["mlp.experts.gate_up_proj"] = LayerParam((count, 2 * inter, hidden), gate_up, experts=count)
    down = tuple(Piece(found["down"][e], e) for e in range(count))
    params["mlp.experts.down_proj"] = LayerParam((count, hidden, inter), down, experts=count)
    return params


_PASSES = (
    "qwen3-next.sdpa-attention",
    "qwen3-next.linear-attention-state",
    "qwen3-next.layer-offload",
    "qwen3-next.expert-offload",
    "qwen3-next.kv-offload",
)

register(
    SpecializationProvider(
        name="qwen3-next",
        model_types=frozenset({"qwen3_next"}),
        pass_ids=_PASSES,
        implemented_passes=frozenset(_PASSES),
        attention_pass="qwen3-next.sdpa-attention",
        layer_streaming_pass="qwen3-next.layer-offload",
        kv_offload_pass="qwen3-next.kv-offload",
        expert_offload_pass="qwen3-next.expert-offload",
        layer_params=layer_params,
        experts_per_token_key="num_experts_per_tok",
    )
)
