"""Qwen3-Next (hybrid linear attention with sparse mixture-of-experts)."""

from ollm.specialization import SpecializationProvider, register

register(
    SpecializationProvider(
        name="qwen3-next",
        model_types=frozenset({"qwen3_next"}),
        pass_ids=(
            "qwen3-next.expert-offload",
            "qwen3-next.linear-attention-state",
            "qwen3-next.layer-offload",
        ),
    )
)
