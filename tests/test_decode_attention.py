"""``ollm_sdpa``: a decode query is packed onto its key/value heads with or without a mask, and the
numbers are Transformers' SDPA's (the real SmolLM2, 9 query heads over 3 key/value heads, float32);
the loader gives it to every model with an SDPA pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.integrations import sdpa_attention

from ollm.engine.decode_attention import ATTENTION
from ollm.engine.loader import _attention
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings
from tests.conftest import DEFAULT_CHAT_MODEL


def _decode_logits(model: PreTrainedModel, mask: torch.Tensor) -> torch.Tensor:
    """Prefill two rows (the first left-padded by ``mask``), then three decode steps; every step's logits."""
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache(config=model.config)
    steps = []
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        for _ in range(3):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
            positions = mask.sum(dim=1, keepdim=True) - 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps)


@pytest.mark.parametrize("padded", [False, True])
def test_packed_decode_matches_transformers_sdpa(padded: bool, default_model_dir: Path, monkeypatch: Any) -> None:
    mask = torch.ones((2, 6), dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    layers = model.config.num_hidden_layers
    expected = _decode_logits(model.eval(), mask)
    # Without a mask Transformers would pass enable_gqa; ollm_sdpa must not reach that form.
    taken: list[bool] = []
    original = sdpa_attention.use_gqa_in_sdpa
    monkeypatch.setattr(
        sdpa_attention, "use_gqa_in_sdpa", lambda *a: taken.append(bool(original(*a))) or original(*a)
    )
    model.set_attn_implementation(ATTENTION)
    got = _decode_logits(model, mask)
    # The same attention summed in another order: float32 rounding through 30 layers (1.9e-5 measured).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-4)
    # Transformers' function sees the prefill (one call per layer) and, with padding, the masked
    # decode steps it packs itself (every layer, 3 steps); an unmasked decode never reaches it.
    assert len(taken) == (4 * layers if padded else layers)
    assert not any(taken[layers:])


def test_the_sdpa_pass_loads_packed_decode_attention(default_runtime: RuntimeSettings, default_model_dir: Any) -> None:
    plan = plan_model(DEFAULT_CHAT_MODEL, default_runtime)
    assert any(p.endswith(".sdpa-attention") for p in plan.applied_passes)
    assert _attention(plan) == ATTENTION
