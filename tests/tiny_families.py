"""Tiny random checkpoints of the seed families, built from transformers' own configs.

Each has SmolLM2's tokenizer (from the pulled default model), 4 layers and random float32 weights,
saved with ``save_pretrained`` so the real loading code reads real files. Random weights say
nothing about quality; they exercise each family's cache layer kinds: sliding-window attention
(gemma3, gpt-oss), attention sinks and MoE (gpt-oss), linear-attention state and MoE (qwen3-next).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

# Small enough that a test's prompts reach well past it: a sliding layer then holds only the window.
WINDOW = 8
FAMILIES = ("gemma3", "gpt-oss", "qwen3-next")
_SHAPE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def _config(family: str, vocab_size: int, bos: int, eos: int) -> PretrainedConfig:
    ids = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    if family == "gemma3":
        layers = ["sliding_attention"] * 3 + ["full_attention"]
        return Gemma3TextConfig(
            **_SHAPE, **ids, intermediate_size=128, num_hidden_layers=4, sliding_window=WINDOW, layer_types=layers
        )
    if family == "gpt-oss":
        layers = ["sliding_attention", "full_attention"] * 2
        return GptOssConfig(
            **_SHAPE,
            **ids,
            intermediate_size=64,
            num_hidden_layers=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            layer_types=layers,
        )
    if family == "qwen3-next":
        layers = ["linear_attention"] * 3 + ["full_attention"]
        return Qwen3NextConfig(
            **_SHAPE,
            **ids,
            intermediate_size=64,
            num_hidden_layers=4,
            layer_types=layers,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
        )
    raise ValueError(f"no tiny builder for {family!r}; one of {FAMILIES}")


_MODELS: dict[str, type[PreTrainedModel]] = {
    "gemma3": Gemma3ForCausalLM,
    "gpt-oss": GptOssForCausalLM,
    "qwen3-next": Qwen3NextForCausalLM,
}


def build_tiny(family: str, path: Path, tokenizer_dir: Path) -> Path:
    """Save a tiny random ``family`` checkpoint (float32) with the tokenizer of ``tokenizer_dir`` at ``path``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = _MODELS[family](config).to(torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
