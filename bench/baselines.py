"""Baselines measured in-process, without any server: what the stack is compared against."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.client import PROMPTS


def generate_one_at_a_time(model_dir: Path, dtype: str, max_tokens: int, requests: int) -> dict[str, float]:
    """Plain ``model.generate``, greedy, one request after another: tokens/s and seconds/request."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    tokens = 0
    with torch.inference_mode():
        # One warm-up so that one-time kernel selection is not charged to the measurement.
        _generate(model, tokenizer, PROMPTS[0], 4)
        start = time.perf_counter()
        for index in range(requests):
            tokens += _generate(model, tokenizer, PROMPTS[index % len(PROMPTS)], max_tokens)
        elapsed = time.perf_counter() - start
    return {"tokens_per_second": tokens / elapsed, "seconds_per_request": elapsed / requests, "tokens": tokens}


def _generate(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> int:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return int(output.shape[1] - inputs["input_ids"].shape[1])
