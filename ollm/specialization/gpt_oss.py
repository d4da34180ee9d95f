"""gpt-oss (mixture-of-experts with MXFP4 expert weights, sliding-window layers with attention sinks).

Real gpt-oss checkpoints keep each expert tensor as MXFP4: ``<name>_blocks`` (uint8, two 4-bit values
a byte, ``[experts, rows, groups, 16]``) and ``<name>_scales`` (one power-of-two exponent per group
of 32). The layout maps such a pair onto the model's float parameter ``<name>``, one expert a
piece, so streaming and expert offload dequantize an expert as they read it, never the whole model.

No SDPA pass: gpt-oss's attention sinks need transformers' eager attention (its model class does
not support SDPA), so the plan's activation estimate counts the attention scores.
"""

from typing import Any

from ollm.specialization import SpecializationProvider, register
from ollm.tensor_index import MXFP4_BLOCKS, MXFP4_SCALES, LayerParam, LayerParams, Piece, TensorEntry, direct_params


def layer_params(layer: dict[str, TensorEntry], config: dict[str, Any]) -> LayerParams | str:
    rest = dict(layer)
    params: LayerParams = {}
    for name in [n for n in layer if n.endswith(MXFP4_BLOCKS)]:
        base = name[: -len(MXFP4_BLOCKS)]
        blocks, scales = rest.pop(name), rest.pop(base + MXFP4_SCALES, None)
        if scales is None or len(blocks.shape) != 4 or scales.shape != blocks.shape[:3]:
            return f"{blocks.name} has no matching {base}{MXFP4_SCALES} beside it"
        experts, rows, groups, _ = blocks.shape
        pieces = tuple(Piece(blocks.index(e), expert=e, scales=scales.index(e)) for e in range(experts))
        params[base] = LayerParam((experts, groups * 32, rows), pieces, experts=experts)
    plain = direct_params(rest, experts="mlp.experts")
    return plain if isinstance(plain, str) else params | plain


_PASSES = (
    "gpt-oss.mxfp4-dequant-on-load",
    "gpt-oss.layer-offload",
    "gpt-oss.expert-offload",
    "gpt-oss.sliding-window-kv",
    "gpt-oss.kv-offload",
)

register(
    SpecializationProvider(
        name="gpt-oss",
        model_types=frozenset({"gpt_oss"}),
        pass_ids=_PASSES,
        implemented_passes=frozenset(_PASSES),
        layer_streaming_pass="gpt-oss.layer-offload",
        kv_offload_pass="gpt-oss.kv-offload",
        expert_offload_pass="gpt-oss.expert-offload",
        layer_params=layer_params,
        experts_per_token_key="num_experts_per_tok",
    )
)
