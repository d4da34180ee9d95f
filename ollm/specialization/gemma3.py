"""Gemma 3 (text-only and image-text checkpoints).

Every layer has the same parameters (sliding and full attention differ in their cache only), so
layers stream through one set of slots; the sliding-window layers' KV is held at the window by the
engine's cache manager (``SlidingWindow`` in ollm/engine/cache_manager.py). Image-text checkpoints
keep their decoder under ``language_model.model``; when its layers stream, the vision tower is read
when an image request's prefill runs it and dropped after (``gemma3.vision-encoder-offload``).
"""

from ollm.specialization import SpecializationProvider, register

_PASSES = (
    "gemma3.sdpa-attention",
    "gemma3.sliding-window-kv",
    "gemma3.chunked-mlp",
    "gemma3.layer-offload",
    "gemma3.vision-encoder-offload",
    "gemma3.kv-offload",
)

register(
    SpecializationProvider(
        name="gemma3",
        model_types=frozenset({"gemma3", "gemma3_text"}),
        pass_ids=_PASSES,
        implemented_passes=frozenset(_PASSES),
        attention_pass="gemma3.sdpa-attention",
        chunked_projection_pass="gemma3.chunked-mlp",
        layer_streaming_pass="gemma3.layer-offload",
        kv_offload_pass="gemma3.kv-offload",
        on_demand_modules=("vision_tower",),  # as the files name it; the model nests it under model.
        on_demand_pass="gemma3.vision-encoder-offload",
    )
)
