"""gpt-oss (mixture-of-experts with MXFP4 expert weights)."""

from ollm.specialization import SpecializationProvider, register

register(
    SpecializationProvider(
        name="gpt-oss",
        model_types=frozenset({"gpt_oss"}),
        pass_ids=("gpt-oss.mxfp4-dequant-on-load", "gpt-oss.expert-offload", "gpt-oss.sliding-window-kv"),
    )
)
