"""A tiny random gpt-oss checkpoint that speaks harmony, built from transformers' own GptOssConfig.

Its tokenizer is SmolLM2's (the pulled default model's) with harmony's special tokens added, and
``<|return|>`` / ``<|call|>`` as its end-of-sequence tokens, as gpt-oss's generation_config has them.
No chat template: ollm renders harmony itself (ollm.harmony). Random weights answer nothing
sensible, so tests steer the output (ollm.engine.steering) to known harmony sequences.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, GptOssConfig, GptOssForCausalLM

from ollm import harmony
from ollm.engine.steering import STEERING_ENV

# Steered outputs, by a trigger the last user message contains.
ANSWER = "capital of France"
CALL = "weather in Paris"
REASONING = "The user asks for the capital. Easy."
STEERED = {
    ANSWER: f"<|channel|>analysis<|message|>{REASONING}<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Paris is the capital.<|return|>",
    CALL: "<|channel|>analysis<|message|>Need the weather tool.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
}


def build(path: Path, smollm_dir: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(harmony.MARKERS)})
    tokenizer.chat_template = None
    eos = [tokenizer.convert_tokens_to_ids(harmony.RETURN), tokenizer.convert_tokens_to_ids(harmony.CALL)]
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=64, max_position_embeddings=4096, eos_token_id=eos, pad_token_id=eos[0],
        layer_types=["sliding_attention", "full_attention"], dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    GptOssForCausalLM(config).save_pretrained(path)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[0]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def steering_env(directory: Path) -> dict[str, str]:
    """The worker environment that steers this model's output to ``STEERED``."""
    script = directory / "steering.json"
    script.write_text(json.dumps(STEERED), encoding="utf-8")
    return {STEERING_ENV: str(script)}
