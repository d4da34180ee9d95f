"""Attention never materializes [tokens x tokens] on long prompts: SDPA takes a fused kernel.

torch's SDPA falls back to its math kernel (which builds the full scores matrix) when no fused
kernel accepts the inputs, e.g. an unsupported mask. Restricting SDPA to the fused kernels turns
that silent fallback into an error, so a long prefill that succeeds under the restriction never
held the matrix (on this prompt, 9 heads x 1500 x 1500 float32 = 77 MiB per layer).
"""

from __future__ import annotations

from typing import Any

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel

from ollm.engine.base import stream
from ollm.engine.loader import load_engine
from ollm.generation import FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings, load_settings
from tests.conftest import DEFAULT_CHAT_MODEL

pytestmark = pytest.mark.slow

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _answers(runtime: RuntimeSettings, prompts: list[str], restricted: bool) -> list[Any]:
    settings = load_settings(
        {"runtime": {"models_dir": runtime.models_dir, "dtype": "float32"}, "worker": {"max_tokens_per_step": 4096}}
    )
    engine = load_engine(plan_model(DEFAULT_CHAT_MODEL, settings.runtime), settings)
    try:
        requests = [
            GenerationRequest(
                model=DEFAULT_CHAT_MODEL, prompt=p, sampling=SamplingParams(temperature=0.0, max_new_tokens=4)
            )
            for p in prompts
        ]
        # The backend flags are process-wide, so they hold on the engine's thread too.
        if restricted:
            with sdpa_kernel(FUSED):
                return [list(stream(engine, r))[-1] for r in requests]
        return [list(stream(engine, r))[-1] for r in requests]
    finally:
        engine.close()


def test_long_prefill_and_decode_use_fused_attention(default_runtime: RuntimeSettings, default_model_dir: Any) -> None:
    prompts = [" ".join(f"word{i}" for i in range(600)), "A short one."]
    fused = _answers(default_runtime, prompts, restricted=True)
    free = _answers(default_runtime, prompts, restricted=False)
    for answer in fused + free:
        assert isinstance(answer, FinalEvent), answer  # the math-only fallback would be an error here
    assert fused[0].usage.prompt_tokens > 1000
    assert [a.text for a in fused] == [a.text for a in free]


@pytest.mark.filterwarnings("ignore:Both fused kernels")
def test_the_restriction_does_refuse_the_math_kernel() -> None:
    # The check above is only meaningful if an input that needs the math kernel fails under it.
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, 2, 8, 16)
    with sdpa_kernel(FUSED), pytest.raises(RuntimeError):
        # Dropout in training mode and a float64 input: no fused CPU kernel takes these.
        F.scaled_dot_product_attention(q.double(), q.double(), q.double(), dropout_p=0.5)
