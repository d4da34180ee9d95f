"""Llama family (Llama 3.x, SmolLM2 and other ``model_type: llama`` checkpoints)."""

from ollm.specialization import SpecializationProvider, register

register(
    SpecializationProvider(
        name="llama",
        model_types=frozenset({"llama"}),
        pass_ids=(
            "llama.fused-qkv",
            "llama.chunked-mlp",
            "llama.rope-cache",
            "llama.layer-offload",
            "llama.kv-offload",
        ),
        implemented_passes=frozenset({"llama.chunked-mlp", "llama.layer-offload", "llama.kv-offload"}),
        chunked_projection_pass="llama.chunked-mlp",
        layer_streaming_pass="llama.layer-offload",
        kv_offload_pass="llama.kv-offload",
    )
)
