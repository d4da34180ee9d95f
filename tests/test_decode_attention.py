"""``ollm_sdpa``: a decode query is packed onto its key/value heads with or without a mask, and the
numbers are Transformers' SDPA's; the loader gives it to every model with an SDPA pass."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.integrations import sdpa_attention

from ollm.engine.decode_attention import ATTENTION
from ollm.engine.loader import _attention
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings
from tests.conftest import DEFAULT_CHAT_MODEL


def _with(config: LlamaConfig, attention: str) -> LlamaForCausalLM:
    config._attn_implementation = attention
    return LlamaForCausalLM(config).eval()


def _decode_logits(model: LlamaForCausalLM, mask: torch.Tensor) -> torch.Tensor:
    """Prefill two rows (the first left-padded by ``mask``), then three decode steps; every step's logits."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
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
def test_packed_decode_matches_transformers_sdpa(padded: bool, monkeypatch: Any) -> None:
    mask = torch.ones((2, 6), dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    expected = _decode_logits(_with_seeded("sdpa"), mask)
    # Without a mask Transformers would pass enable_gqa; ollm_sdpa must not reach that form.
    taken: list[bool] = []
    original = sdpa_attention.use_gqa_in_sdpa
    monkeypatch.setattr(
        sdpa_attention, "use_gqa_in_sdpa", lambda *a: taken.append(bool(original(*a))) or original(*a)
    )
    got = _decode_logits(_with_seeded(ATTENTION), mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Transformers' function sees the prefill (one call per layer) and, with padding, the masked
    # decode steps it packs itself (2 layers x 3 steps); an unmasked decode never reaches it.
    assert len(taken) == (8 if padded else 2)
    assert not any(taken[2:])


def _with_seeded(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return _with(config, attention)


def test_the_sdpa_pass_loads_packed_decode_attention(default_runtime: RuntimeSettings, default_model_dir: Any) -> None:
    plan = plan_model(DEFAULT_CHAT_MODEL, default_runtime)
    assert any(p.endswith(".sdpa-attention") for p in plan.applied_passes)
    assert _attention(plan) == ATTENTION
