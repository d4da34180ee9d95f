"""Random checkpoints of the seed families, and `python -m bench.families`: batched decode per family.

Each checkpoint is built from transformers' own config class with SmolLM2's tokenizer (from the
pulled default model) and saved with ``save_pretrained``, so the real loading code reads real
files. ``tiny`` (4 layers, hidden 64, float32) is what the tests use; ``0.5g`` is a synthetic
checkpoint of about half a gigabyte in bfloat16. Random weights say nothing about quality; they
exercise each family's cache layer kinds: sliding-window attention (gemma3, gpt-oss), attention
sinks and MoE (gpt-oss), linear-attention state and MoE (qwen3-next).

The benchmark runs each family's engine in process (no HTTP, so the numbers are the engine's) at 1
and 16 concurrent streams and prints aggregate decode tokens/s and the 16-to-1 ratio:

    python -m bench.families --size tiny --streams 1,16
    python -m bench.families --model smollm2-135m-instruct --streams 1,16,32
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

from bench.client import PROMPTS
from bench.synthetic import SMOLLM2
from ollm.engine.base import Engine, stream
from ollm.engine.loader import load_engine
from ollm.generation import FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import load_settings

# Small enough that a test's prompts reach well past it: a sliding layer then holds only the window.
WINDOW = 8
FAMILIES = ("gemma3", "gpt-oss", "qwen3-next")


@dataclass(frozen=True)
class Size:
    layers: int  # a multiple of 4: each family's layer pattern repeats every 4 (or 2) layers
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP (gemma3) and each expert's (gpt-oss, qwen3-next)
    experts: int
    window: int
    dtype: torch.dtype


SIZES = {
    "tiny": Size(4, 64, 4, 2, 16, 64, 4, WINDOW, torch.float32),
    # About 0.5 GB in bfloat16 for each family (the embedding alone is 49152 x 1024).
    "0.5g": Size(12, 1024, 16, 4, 64, 3072, 4, 512, torch.bfloat16),
}
# About 2.1-2.3 GB in bfloat16 for each family (bench.layer_streaming: a model four times its budget).
# The MoE families have 16 experts of which the router picks 2, so a decoded token needs an eighth
# of the expert bytes. Embeddings are tied, as small models' are, so the head is not a second copy;
# the context is 1024 tokens.
LARGE = {
    "gemma3": Size(36, 1024, 16, 4, 64, 4096, 0, 512, torch.bfloat16),
    "gpt-oss": Size(10, 1024, 16, 4, 64, 2048, 16, 512, torch.bfloat16),
    "qwen3-next": Size(12, 1024, 16, 4, 64, 3072, 16, 512, torch.bfloat16),
}


def size_of(family: str, size: str) -> Size:
    return LARGE[family] if size == "2g" else SIZES[size]


def _config(family: str, size: Size, vocab_size: int, bos: int, eos: int) -> PretrainedConfig:
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "hidden_size": size.hidden,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "head_dim": size.head_dim,
        "num_hidden_layers": size.layers,
    }
    if family == "gemma3":
        layers = (["sliding_attention"] * 3 + ["full_attention"]) * (size.layers // 4)
        return Gemma3TextConfig(
            **common, intermediate_size=2 * size.intermediate, sliding_window=size.window, layer_types=layers
        )
    if family == "gpt-oss":
        layers = ["sliding_attention", "full_attention"] * (size.layers // 2)
        return GptOssConfig(
            **common,
            intermediate_size=size.intermediate,
            num_local_experts=size.experts,
            num_experts_per_tok=2,
            sliding_window=size.window,
            layer_types=layers,
        )
    if family == "qwen3-next":
        layers = (["linear_attention"] * 3 + ["full_attention"]) * (size.layers // 4)
        return Qwen3NextConfig(
            **common,
            intermediate_size=size.intermediate,
            layer_types=layers,
            num_experts=size.experts,
            num_experts_per_tok=2,
            moe_intermediate_size=size.intermediate // 2,
            shared_expert_intermediate_size=size.intermediate // 2,
            linear_num_key_heads=size.kv_heads,
            linear_num_value_heads=size.heads,
            linear_key_head_dim=size.head_dim,
            linear_value_head_dim=size.head_dim,
            linear_conv_kernel_dim=4,
        )
    raise ValueError(f"no builder for {family!r}; one of {FAMILIES}")


_MODELS: dict[str, type[PreTrainedModel]] = {
    "gemma3": Gemma3ForCausalLM,
    "gpt-oss": GptOssForCausalLM,
    "qwen3-next": Qwen3NextForCausalLM,
}


def build_tiny(family: str, path: Path, tokenizer_dir: Path = SMOLLM2, size: str = "tiny") -> Path:
    """Save a random ``family`` checkpoint of ``size`` with the tokenizer of ``tokenizer_dir`` at ``path``."""
    shape = size_of(family, size)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _config(family, shape, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    if size == "2g":
        config.tie_word_embeddings = True
        config.max_position_embeddings = 1024  # as bench.layer_streaming's llama: a small KV cache beside the weights
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(shape.dtype)  # built in its dtype: a 2 GB model is not first made in float32
    try:
        model = _MODELS[family](config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _request(prompt: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        model="bench",
        prompt=prompt,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True),
    )


def decode_rate(engine: Engine, streams: int, max_tokens: int) -> float:
    """Aggregate tokens/s of ``streams`` concurrent greedy requests of ``max_tokens`` each."""
    counts = [0] * streams

    def run(index: int) -> None:
        final = list(stream(engine, _request(PROMPTS[index % len(PROMPTS)], max_tokens)))[-1]
        counts[index] = final.usage.completion_tokens if isinstance(final, FinalEvent) else 0

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def measure(reference: str, levels: list[int], max_tokens: int, dtype: str) -> dict[str, float]:
    settings = load_settings({"runtime": {"dtype": dtype}, "worker": {"max_batch": max(levels)}})
    engine = load_engine(plan_model(reference, settings.runtime, max_batch=settings.worker.max_batch), settings)
    try:
        decode_rate(engine, 1, 4)  # warm-up
        return {str(level): decode_rate(engine, level, max_tokens) for level in levels}
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[*sorted(SIZES), "2g"], default="tiny")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="Default: every family.")
    parser.add_argument("--model", help="Measure this model reference instead of the family checkpoints.")
    parser.add_argument("--streams", default="1,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    with tempfile.TemporaryDirectory(prefix="ollm-bench-families-") as root:
        if args.model:
            targets = {args.model: args.model}
        else:
            targets = {f: str(build_tiny(f, Path(root) / f, size=args.size)) for f in args.family or FAMILIES}
        for label, reference in targets.items():
            rates = measure(reference, levels, args.max_tokens, args.dtype)
            shown = " ".join(f"c={level} {rate:7.1f} tok/s" for level, rate in rates.items())
            ratio = rates[str(levels[-1])] / rates[str(levels[0])]
            print(f"{label:<24} {args.size if not args.model else '':<5} {shown}  ratio {ratio:4.1f}x", flush=True)


if __name__ == "__main__":
    main()
