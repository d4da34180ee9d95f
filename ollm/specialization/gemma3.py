"""Gemma 3 (text-only and image-text checkpoints)."""

from ollm.specialization import SpecializationProvider, register

register(
    SpecializationProvider(
        name="gemma3",
        model_types=frozenset({"gemma3", "gemma3_text"}),
        pass_ids=("gemma3.sliding-window-kv", "gemma3.chunked-mlp", "gemma3.layer-offload"),
    )
)
