"""What runtime.quantization costs in quality: perplexity and greedy top-1 agreement on a fixed text.

The text is the Python Language Reference's topics as they ship with Python itself
(``pydoc_data.topics``, every topic in sorted order), cut to ``tokens`` tokens: fixed on a given
Python version, English prose with code, and on every machine without a download. Each setting is
loaded the way a worker loads it (the loader's own ``quantize_weights``: int4 uses a kept Q4_1
GGUF's bits when the model directory has one), scored in windows of ``window`` tokens, and
compared position by position with the unquantized model's top-1 token (teacher-forced: every
position sees the same true prefix).

``python -m bench.quality [--tokens 10240]`` prints a table; bench.run calls :func:`measure_quality`.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ollm.engine.loader import quantize_weights
from ollm.plan import plan_model
from ollm.settings import load_settings

TEXT_SOURCE = "pydoc_data.topics (the Python Language Reference topics shipped with Python), sorted by topic"
MODES = ("none", "int8", "int4")


def reference_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def _score(model: Any, ids: torch.Tensor, window: int) -> tuple[float, torch.Tensor]:
    """Summed negative log-likelihood of every token after the first of each window, and the top-1 ids."""
    nll = 0.0
    top1 = []
    with torch.no_grad():
        for start in range(0, ids.shape[0], window):
            chunk = ids[start : start + window].unsqueeze(0)
            logits = model(input_ids=chunk).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item()
            top1.append(logits[:-1].argmax(-1))
    return nll, torch.cat(top1)


def measure_quality(model_ref: str, tokens: int = 10240, window: int = 1024, dtype: str = "auto") -> dict[str, Any]:
    settings = load_settings({"runtime": {"model_reference": model_ref, "dtype": dtype}})
    base = plan_model(model_ref, settings.runtime)
    assert base.path is not None, f"{model_ref} is not materialized"
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    ids = torch.tensor(tokenizer(reference_text())["input_ids"][:tokens])
    scored = ids.shape[0] - math.ceil(ids.shape[0] / window)
    result: dict[str, Any] = {"text": TEXT_SOURCE, "tokens": int(ids.shape[0]), "window": window, "modes": {}}
    reference: torch.Tensor | None = None
    for mode in MODES:
        runtime = settings.runtime.model_copy(update={"quantization": mode})
        plan = plan_model(model_ref, runtime)
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=getattr(torch, plan.dtype)).eval()
        quantize_weights(model, plan, getattr(torch, plan.dtype))
        started = time.perf_counter()
        nll, top1 = _score(model, ids, window)
        if reference is None:
            reference = top1
        result["modes"][mode] = {
            "dtype": plan.dtype,
            "perplexity": math.exp(nll / scored),
            "top1_agreement_with_none": (top1 == reference).float().mean().item(),
            "weights_bytes": plan.memory.weights_bytes,
            "seconds": time.perf_counter() - started,
        }
        print(quality_row(mode, result["modes"][mode]), flush=True)
    return result


def quality_row(mode: str, row: dict[str, Any]) -> str:
    return (
        f"quality {mode:<5} ({row['dtype']}): perplexity {row['perplexity']:7.3f}  "
        f"top-1 agreement with none {row['top1_agreement_with_none'] * 100:6.2f}%  "
        f"weights {row['weights_bytes'] / 2**20:6.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=10240)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    settings = load_settings({"runtime": {"model_reference": args.model}})
    print(f"text: {TEXT_SOURCE}, {args.tokens} tokens, windows of {args.window}")
    measure_quality(settings.runtime.model_reference, args.tokens, args.window, args.dtype)


if __name__ == "__main__":
    main()
