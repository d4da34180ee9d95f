"""Peak memory of long prompts with the KV cache resident vs offloaded to disk (llama.kv-offload).

SmolLM2-135M's config stops at 8192 positions. To measure a 16k-token prompt this bench writes a
copy of the model directory (the weights hard-linked, or symlinked across filesystems: no second
copy) whose config.json extends the context to 16384 positions with linear RoPE scaling (factor
2.0, transformers' ``rope_type: linear``). The model was not trained for that: what is measured is
memory and speed, not the quality of the answer.

Each configuration runs in a child process (the model is loaded there); this process samples the
RSS of the child's whole process tree with psutil every ~20 ms, from outside, and the disk the
offloaded KV files use. Configurations: a baseline child (torch, transformers and ollm imported,
nothing loaded); the generic resident cache at each context; KV offload at each context under a
memory budget. The contract checked: with KV offload, peak RSS <= baseline + budget (+10%).

    python -m bench.kv_offload                        # 2k/4k/8k/16k, writes docs/benchmarks/
    python -m bench.kv_offload --contexts 2048 --no-json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.rss import ProcessTree
from ollm.memory import human, parse_size

MODEL = Path(os.environ.get("OLLM_RUNTIME__MODELS_DIR", "~/.ollm/models")).expanduser() / "smollm2-135m-instruct"
CONTEXT = 16384
ROPE_FACTOR = 2.0
SLACK = 1.10
OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"

_CHILD = r"""
import json, sys
import torch, transformers  # noqa: F401  (part of the baseline)
from ollm.engine.base import stream
from ollm.engine.loader import load_engine
from ollm.generation import GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import load_settings

model, mode, tokens, new_tokens, budget, kv_dir, dtype = sys.argv[1:8]
print("imported", flush=True); sys.stdin.readline()
if mode == "baseline":
    sys.exit(0)
settings = load_settings({
    "runtime": {"dtype": dtype, "memory_budget": budget, "kv_offload": "on" if mode == "offload" else "off",
                "kv_offload_dir": kv_dir},
    "worker": {"max_batch": 1, "kv_cache_max_tokens": 32768},
})
plan = plan_model(model, settings.runtime, context_tokens=int(tokens),
                  prefill_tokens=settings.worker.max_tokens_per_step, max_batch=1)
engine = load_engine(plan, settings)
print("loaded " + json.dumps({"memory": plan.memory.model_dump(), "applied_passes": plan.applied_passes,
                              "dtype": plan.dtype}), flush=True)
sys.stdin.readline()
# " hello" is one token: the prompt is the context less room for the answer.
request = GenerationRequest(model=model, prompt=" hello" * (int(tokens) - int(new_tokens) - 2),
                            sampling=SamplingParams(temperature=0.0, max_new_tokens=int(new_tokens)))
final = list(stream(engine, request))[-1]
assert final.type == "final", final
engine.close()
print("done " + json.dumps({"usage": final.usage.model_dump(), "timings": final.timings.model_dump(),
                            "applied_passes": final.execution.applied_passes}), flush=True)
"""


def extended_model(directory: Path, model: Path = MODEL) -> Path:
    """A copy of ``model``'s directory whose config allows CONTEXT positions through linear RoPE scaling."""
    target = directory / f"{model.name}-{CONTEXT // 1024}k-linear-rope"
    target.mkdir(parents=True)
    for source in model.iterdir():
        if source.name == "config.json":
            continue
        try:
            os.link(source, target / source.name)
        except OSError:  # another filesystem: a symlink, still no second copy
            (target / source.name).symlink_to(source)
    config = json.loads((model / "config.json").read_text())
    original = config["max_position_embeddings"]
    config["max_position_embeddings"] = CONTEXT
    config["rope_parameters"] = dict(config.get("rope_parameters") or {}, rope_type="linear", factor=ROPE_FACTOR)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    print(f"model: {target} = {model.name} with max_position_embeddings {original} -> {CONTEXT}, "
          f"rope_parameters {config['rope_parameters']} (memory is measured, not answer quality)")  # fmt: skip
    return target


class _DiskPeak:
    """The most disk used under a directory, read every fifth RSS sample (~100 ms): walking the
    directory costs more than reading RSS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.peak = 0

    def __call__(self, samples: int) -> None:
        if samples % 5 == 0:
            self.peak = max(self.peak, _disk_used(self.directory))


def _disk_used(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def measure(
    model: Path, mode: str, tokens: int, new_tokens: int, budget: str, dtype: str, threads: int = 1
) -> dict[str, Any]:
    kv_dir = Path(tempfile.mkdtemp(prefix="ollm-kv-bench-"))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(model), mode, str(tokens), str(new_tokens), budget, str(kv_dir), dtype],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": str(threads)},
    )
    assert child.stdin is not None and child.stdout is not None
    disk = _DiskPeak(kv_dir)
    tree = ProcessTree(child.pid, on_sample=disk)
    try:
        tree.peak_until("imported", child.stdout)
        time.sleep(0.3)
        baseline = tree.rss()
        result: dict[str, Any] = {"mode": mode, "context": tokens, "baseline_mib": baseline / 2**20}
        child.stdin.write("\n")
        child.stdin.flush()
        if mode == "baseline":
            child.wait(timeout=60)
            return result
        _, loaded_line = tree.peak_until("loaded ", child.stdout)
        loaded = tree.rss()
        child.stdin.write("\n")
        child.stdin.flush()
        peak, done_line = tree.peak_until("done ", child.stdout)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        leftover = _disk_used(kv_dir)
        shutil.rmtree(kv_dir, ignore_errors=True)
    plan, done = json.loads(loaded_line), json.loads(done_line)
    usage, timings = done["usage"], done["timings"]
    memory = plan["memory"]
    return result | {
        "dtype": plan["dtype"],
        "applied_passes": done["applied_passes"],
        "budget_mib": memory["budget_bytes"] / 2**20,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "loaded_mib": loaded / 2**20,
        "peak_mib": peak / 2**20,
        "peak_over_baseline_mib": (peak - baseline) / 2**20,
        "kv_cache_mib": memory["kv_cache_bytes"] / 2**20,
        "planned_peak_mib": memory["expected_peak_bytes"] / 2**20,
        "disk_peak_mib": disk.peak / 2**20,
        "disk_left_after_close_bytes": leftover,
        "prefill_s": timings["prompt_eval_ms"] / 1000,
        "prefill_tokens_per_s": usage["prompt_tokens"] / max(timings["prompt_eval_ms"] / 1000, 1e-9),
        "decode_tokens_per_s": usage["completion_tokens"] / max(timings["generation_ms"] / 1000, 1e-9),
    }


def _row(result: dict[str, Any]) -> str:
    return (
        f"{result['mode']:>8} {result['context']:>6} {result['prompt_tokens']:>6} "
        f"{result['baseline_mib']:>8.0f} {result['loaded_mib']:>7.0f} {result['peak_mib']:>7.0f} "
        f"{result['peak_over_baseline_mib']:>8.0f} {result['kv_cache_mib']:>6.0f} {result['disk_peak_mib']:>7.0f} "
        f"{result['prefill_tokens_per_s']:>8.0f} {result['decode_tokens_per_s']:>7.2f}  "
        + ",".join(result["applied_passes"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="2048,4096,8192,16384", help="Context lengths (prompt + answer).")
    parser.add_argument("--offload-contexts", default=None, help="Contexts for KV offload (default: --contexts).")
    parser.add_argument("--budget", default="800MiB", help="runtime.memory_budget for the KV offload runs.")
    parser.add_argument("--new-tokens", type=int, default=8, help="Tokens generated after the prompt.")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads in each child (OMP_NUM_THREADS).")
    parser.add_argument("--only", choices=["resident", "offload"], help="Run one mode (its own JSON file).")
    parser.add_argument("--no-json", action="store_true", help="Print only; write nothing under docs/benchmarks.")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    offload_contexts = [int(c) for c in (args.offload_contexts or args.contexts).split(",")]
    budget_bytes = parse_size(args.budget)
    assert isinstance(budget_bytes, int), "the contract needs an explicit budget"
    name = "kv-offload-smollm2-cpu-" + f"{datetime.now(UTC):%Y-%m-%d}" + (f"-{args.only}" if args.only else "")
    path = None if args.no_json else OUT_DIR / f"{name}.json"
    work = Path(tempfile.mkdtemp(prefix="ollm-kv-bench-model-"))
    try:
        model = extended_model(work)
        baseline = measure(model, "baseline", 0, 0, "auto", args.dtype)
        print(f"baseline child (imports only): {baseline['baseline_mib']:.0f} MiB; {args.threads} torch thread(s)")
        print(f"{'mode':>8} {'ctx':>6} {'prompt':>6} {'baseline':>8} {'loaded':>7} {'peak':>7} {'peak-bl':>8} "
              f"{'KV':>6} {'disk':>7} {'prefill':>8} {'decode':>7}  passes   (MiB; tokens/s)")  # fmt: skip
        results: list[dict[str, Any]] = []
        for mode, runs in (("resident", contexts), ("offload", offload_contexts)):
            if args.only not in (None, mode):
                continue
            for context in runs:
                budget = args.budget if mode == "offload" else "auto"
                result = measure(model, mode, context, args.new_tokens, budget, args.dtype, args.threads)
                results.append(result)
                print(_row(result), flush=True)
                # Written after every run: a long context that does not finish leaves the shorter ones.
                _report(path, args, baseline, budget_bytes, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report(
    path: Path | None, args: argparse.Namespace, baseline: dict[str, Any], budget: int, results: list[dict[str, Any]]
) -> None:
    limit = baseline["baseline_mib"] + budget / 2**20 * SLACK
    offloaded = [r for r in results if r["mode"] == "offload"]
    held = all(r["peak_mib"] <= limit for r in offloaded) if offloaded else None
    if offloaded:
        print(f"contract: KV offload peak <= baseline {baseline['baseline_mib']:.0f} MiB + budget "
              f"{human(budget)} x {SLACK} = {limit:.0f} MiB: "
              f"{'held' if held else 'BROKEN'} (worst {max(r['peak_mib'] for r in offloaded):.0f} MiB)")  # fmt: skip
    if path is None:
        return
    report = {
        "bench": "kv_offload",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": f"{MODEL.name}, config extended to {CONTEXT} positions with linear RoPE scaling x{ROPE_FACTOR}",
        "machine": {"cpus": os.cpu_count(), "ram_gib": psutil.virtual_memory().total / 2**30,
                    "note": "shared with other jobs: speeds are noisy"},
        "threads": args.threads,
        "dtype": args.dtype,
        "budget": args.budget,
        "baseline_child_mib": baseline["baseline_mib"],
        "contract": {"limit_mib": limit, "held": held},
        "results": results,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
