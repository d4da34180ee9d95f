"""Llama family (Llama 3.x, SmolLM2 and other ``model_type: llama`` checkpoints)."""

from ollm.specialization import SpecializationProvider, register

register(
    SpecializationProvider(
        name="llama",
        model_types=frozenset({"llama"}),
        # No fused-QKV or rope-cache pass: measured, neither helps enough to keep (docs/memory.md).
        pass_ids=("llama.sdpa-attention", "llama.chunked-mlp", "llama.layer-offload", "llama.kv-offload"),
        implemented_passes=frozenset(
            {"llama.sdpa-attention", "llama.chunked-mlp", "llama.layer-offload", "llama.kv-offload"}
        ),
        attention_pass="llama.sdpa-attention",
        chunked_projection_pass="llama.chunked-mlp",
        layer_streaming_pass="llama.layer-offload",
        kv_offload_pass="llama.kv-offload",
    )
)
