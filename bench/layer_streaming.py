"""Layer streaming against its contract: peak RSS <= baseline + budget, and decode throughput at 1 and 16 streams.

Writes (or reuses) a synthetic llama checkpoint of about 2.2 GB of bfloat16 weights under /tmp,
then runs the model in a child process per configuration while this process samples the RSS of
the child's whole process tree with psutil every 20 ms, from outside:

- baseline: the child with torch, transformers and ollm imported, nothing loaded;
- streamed: `runtime.memory_budget` at most an eighth of the weights (the planner streams the
  layers because the weights do not fit); greedy decode at 1 and 16 concurrent streams through
  the BatchingEngine;
- generic: the same model loaded whole (layer streaming off, budget auto), for comparison.

    python -m bench.layer_streaming [--budget 256MiB] [--keep]

Prints one JSON object per configuration and writes them all to docs/benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import psutil

from bench.rss import SAMPLE_SECONDS, ProcessTree
from bench.synthetic import LlamaShape, write_llama_checkpoint
from ollm.memory import parse_size

# 52 layers of hidden 768 and intermediate 8192 (12 heads, 4 KV heads) over SmolLM2's vocabulary:
# 1.10 G parameters, 2.2 GB in bfloat16. A 1024-token context keeps the KV cache small beside them.
SHAPE = LlamaShape(layers=52, hidden=768, intermediate=8192, heads=12, kv_heads=4, context=1024)
CHECKPOINT = Path("/tmp/ollm-bench-llama-2g")

_CHILD = r"""
import json, sys, queue, time
import torch, transformers  # noqa: F401  (part of the baseline)
from ollm.engine.loader import load_engine
from ollm.generation import FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import load_settings

args = json.loads(sys.argv[1])
print("imported", flush=True); sys.stdin.readline()
settings = load_settings({
    "runtime": {"model_reference": args["model"], "dtype": "bfloat16", "memory_budget": args["budget"],
                "layer_streaming": args["layer_streaming"]},
    "worker": {"max_batch": 16},
})
plan = plan_model(args["model"], settings.runtime)
engine = load_engine(plan, settings)
print("loaded " + json.dumps({"memory": plan.memory.model_dump(), "applied_passes": plan.applied_passes}), flush=True)
for streams in args["streams"]:
    sys.stdin.readline()
    inboxes = [queue.Queue() for _ in range(streams)]
    start = time.perf_counter()
    for i, inbox in enumerate(inboxes):
        request = GenerationRequest(model=args["model"], prompt=f"Stream {i} says hello to the reader",
                                    sampling=SamplingParams(temperature=0.0, max_new_tokens=args["tokens"],
                                                            ignore_eos=True))
        engine.submit(request, inbox.put)
    first, tokens = None, 0
    for inbox in inboxes:
        while True:
            event = inbox.get()
            if event.type == "token":
                first = first or time.perf_counter()
            elif isinstance(event, FinalEvent):
                tokens += event.usage.completion_tokens
                break
            else:
                raise SystemExit(f"error: {event}")
    end = time.perf_counter()
    decoded = tokens - streams  # each stream's first token comes from its prefill
    print("run " + json.dumps({"streams": streams, "tokens": tokens, "seconds": end - start,
                               "decode_seconds": end - first, "decode_tokens_per_second": decoded / (end - first)}),
          flush=True)
engine.close()
print("done", flush=True)
"""


class _TreeSampler(threading.Thread):
    """RSS of a process and all its descendants, every SAMPLE_SECONDS; the peak per phase."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.tree = ProcessTree(pid)
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._halt = threading.Event()

    def rss(self) -> int:
        return self.tree.rss()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                rss = self.rss()
            except psutil.NoSuchProcess:
                return
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self.samples += 1
            time.sleep(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _expect(child: subprocess.Popen[str], prefix: str) -> str:
    assert child.stdout is not None
    while True:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the child ended before printing {prefix!r}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


def _go(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.write("\n")
    child.stdin.flush()


def measure(model: Path, budget: str, layer_streaming: str, streams: list[int], tokens: int) -> dict[str, Any]:
    args = {"model": str(model), "budget": budget, "layer_streaming": layer_streaming, "streams": streams,
            "tokens": tokens}  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, json.dumps(args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    sampler = _TreeSampler(child.pid)
    sampler.start()
    try:
        _expect(child, "imported")
        time.sleep(1.0)
        baseline = sampler.rss()
        sampler.phase = "load"
        started = time.perf_counter()
        _go(child)
        plan = json.loads(_expect(child, "loaded "))
        load_seconds = time.perf_counter() - started
        loaded = sampler.rss()
        runs = []
        for count in streams:
            sampler.phase = f"{count} streams"
            _go(child)
            runs.append(json.loads(_expect(child, "run ")))
            print(f"{layer_streaming}: {runs[-1]}", flush=True)
        _expect(child, "done")
    finally:
        sampler.stop()
        child.wait(timeout=600)
    peak = max(sampler.peaks.values())
    memory = plan["memory"]
    return {
        "layer_streaming": layer_streaming,
        "budget": budget,
        "applied_passes": plan["applied_passes"],
        "strategy": memory["strategy"],
        "baseline_mib": baseline / 2**20,
        "loaded_mib": loaded / 2**20,
        "load_seconds": load_seconds,
        "peak_mib": peak / 2**20,
        "peak_above_baseline_mib": (peak - baseline) / 2**20,
        "peaks_mib": {phase: value / 2**20 for phase, value in sampler.peaks.items()},
        "samples": sampler.samples,
        "plan_mib": {
            key: (memory[key] or 0) / 2**20
            for key in (
                "weights_bytes",
                "weights_in_memory_bytes",
                "kv_cache_bytes",
                "activations_bytes",
                "expected_peak_bytes",
                "budget_bytes",
            )
        },  # fmt: skip
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="256MiB", help="runtime.memory_budget of the streamed run.")
    parser.add_argument("--tokens", type=int, default=16, help="Tokens each stream generates.")
    parser.add_argument("--skip-generic", action="store_true", help="Do not load the whole model for comparison.")
    parser.add_argument("--keep", action="store_true", help=f"Keep {CHECKPOINT} (else it is deleted at the end).")
    args = parser.parse_args()
    if not (CHECKPOINT / "synthetic.json").exists():
        print(f"writing {CHECKPOINT} ...", flush=True)
        write_llama_checkpoint(CHECKPOINT, SHAPE, "bfloat16", seed=0)
    disk = sum(file.stat().st_size for file in CHECKPOINT.glob("*.safetensors"))
    weights = SHAPE.parameters() * 2
    budget = parse_size(args.budget)
    assert isinstance(budget, int)
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, CPU, bfloat16",
        "checkpoint": {
            "parameters": SHAPE.parameters(),
            "weights_bytes": weights,
            "disk_bytes": disk,
            "layers": SHAPE.layers,
            "hidden": SHAPE.hidden,
            "intermediate": SHAPE.intermediate,
            "context": SHAPE.context,
        },  # fmt: skip
        "budget_fraction_of_weights": budget / weights,
    }
    streamed = measure(CHECKPOINT, args.budget, "auto", [1, 16], args.tokens)
    print(json.dumps(streamed), flush=True)
    report["streamed"] = streamed
    limit = streamed["baseline_mib"] + budget / 2**20 * 1.1
    single, sixteen = (run["decode_tokens_per_second"] for run in streamed["runs"])
    report["contract"] = {
        "peak_mib": streamed["peak_mib"],
        "baseline_plus_budget_plus_10pct_mib": limit,
        "met": streamed["peak_mib"] <= limit,
        "decode_tokens_per_second_1": single,
        "decode_tokens_per_second_16": sixteen,
        "ratio_16_to_1": sixteen / single,
        "ratio_met": sixteen / single >= 8,
    }
    if not args.skip_generic:
        generic = measure(CHECKPOINT, "auto", "off", [1, 16], args.tokens)
        print(json.dumps(generic), flush=True)
        report["generic"] = generic
    print(json.dumps(report["contract"]), flush=True)
    out = Path("docs/benchmarks") / f"layer-streaming-cpu-{report['date']}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(CHECKPOINT)


if __name__ == "__main__":
    main()
