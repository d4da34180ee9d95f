"""Peak RSS of one long prefill through the real engine, with and without chunked MLP projections.

Each configuration runs in a child process; this process samples the child's RSS with psutil
every few milliseconds (from outside, as the OS sees it) and prints, per configuration: the
baseline (torch, transformers and ollm imported, nothing loaded), RSS after loading, and the peak
during the prefill, with the plan's estimates beside them.

    python -m bench.prefill_memory --tokens 4096 --chunk-rows 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.rss import ProcessTree

_CHILD = r"""
import json, sys
import torch, transformers  # noqa: F401  (part of the baseline)
from ollm.engine.base import stream
from ollm.engine.loader import load_engine
from ollm.generation import GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import load_settings

tokens, rows, dtype = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print("imported", flush=True); sys.stdin.readline()
settings = load_settings({
    "runtime": {"dtype": dtype, "dense_projection_chunk_rows": rows},
    # The whole prompt in one forward: the worst case chunking exists for.
    "worker": {"max_tokens_per_step": tokens + 16, "max_batch": 1},
})
plan = plan_model(settings.runtime.model_reference, settings.runtime, context_tokens=tokens + 1,
                  prefill_tokens=tokens, max_batch=1)
engine = load_engine(plan, settings)
print("loaded " + plan.memory.model_dump_json(), flush=True); sys.stdin.readline()
request = GenerationRequest(model=plan.reference, prompt=" hello" * (tokens - 1),
                            sampling=SamplingParams(temperature=0.0, max_new_tokens=1))
final = list(stream(engine, request))[-1]
print("done " + json.dumps({"prompt_tokens": final.usage.prompt_tokens,
                            "applied_passes": final.execution.applied_passes}), flush=True)
engine.close()
"""


def measure(tokens: int, rows: int, dtype: str) -> dict[str, Any]:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tokens), str(rows), dtype],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    sampler = ProcessTree(child.pid)
    try:
        sampler.peak_until("imported", child.stdout)
        time.sleep(0.2)
        baseline = sampler.rss()
        child.stdin.write("\n")
        child.stdin.flush()
        _, memory = sampler.peak_until("loaded ", child.stdout)
        loaded = sampler.rss()
        child.stdin.write("\n")
        child.stdin.flush()
        peak, done = sampler.peak_until("done ", child.stdout)
    finally:
        child.wait(timeout=600)
    estimate = json.loads(memory)
    return {
        "chunk_rows": rows,
        "baseline_mib": baseline / 2**20,
        "loaded_mib": loaded / 2**20,
        "prefill_peak_mib": peak / 2**20,
        "prefill_growth_mib": (peak - loaded) / 2**20,
        "estimated_activations_mib": estimate["activations_bytes"] / 2**20,
        "estimated_peak_mib": estimate["expected_peak_bytes"] / 2**20,
    } | json.loads(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="Prompt length, prefilled in one forward.")
    parser.add_argument("--chunk-rows", type=int, default=256, help="dense_projection_chunk_rows to compare with 0.")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    for rows in (0, args.chunk_rows):
        print(json.dumps(measure(args.tokens, rows, args.dtype)), flush=True)


if __name__ == "__main__":
    main()
