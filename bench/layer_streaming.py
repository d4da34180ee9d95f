"""Layer streaming against its contract: peak RSS <= baseline + budget, and decode throughput at 1 and 16 streams.

Writes (or reuses) a synthetic checkpoint of 2.1-2.3 GB of bfloat16 weights under /tmp (llama from
bench.synthetic; gemma3, gpt-oss and qwen3-next from bench.families, gpt-oss's experts in MXFP4 as
real gpt-oss ships them), then runs the model in a child process per configuration while this
process samples the RSS of the child's whole process tree with psutil every 20 ms, from outside:

- baseline: the child with torch, transformers and ollm imported, nothing loaded;
- streamed: `runtime.memory_budget` a fraction of the weights (the planner streams the layers
  because the weights do not fit, and offloads a mixture-of-experts model's experts); greedy
  decode at 1 and 16 concurrent streams through the BatchingEngine; for MoE families, the expert
  bytes read per decoded token;
- generic: the same model loaded whole (layer streaming off, budget auto), for comparison;
- text: with --text-check, streamed and whole in float32 on one greedy prompt: the same text.

    python -m bench.layer_streaming [--family gpt-oss] [--budget 256MiB] [--text-check] [--keep]

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

from bench.families import FAMILIES, build_tiny
from bench.mxfp4_checkpoint import write_mxfp4_twin
from bench.rss import SAMPLE_SECONDS, ProcessTree
from bench.synthetic import LlamaShape, write_llama_checkpoint
from ollm.memory import parse_size, safetensors_weight_bytes

# 52 layers of hidden 768 and intermediate 8192 (12 heads, 4 KV heads) over SmolLM2's vocabulary:
# 1.10 G parameters, 2.2 GB in bfloat16. A 1024-token context keeps the KV cache small beside them.
SHAPE = LlamaShape(layers=52, hidden=768, intermediate=8192, heads=12, kv_heads=4, context=1024)


def checkpoint(family: str) -> Path:
    """The family's 2 GB checkpoint under /tmp, written on first use."""
    path = Path(f"/tmp/ollm-bench-{family}-2g")
    if (path / "config.json").exists():
        return path
    print(f"writing {path} ...", flush=True)
    if family == "llama":
        write_llama_checkpoint(path, SHAPE, "bfloat16", seed=0)
    elif family == "gpt-oss":
        floats = path.with_name(path.name + "-float")
        build_tiny(family, floats, size="2g")
        write_mxfp4_twin(floats, path)
        shutil.rmtree(floats)
    else:
        build_tiny(family, path, size="2g")
    return path


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
    "runtime": {"model_reference": args["model"], "dtype": args["dtype"], "memory_budget": args["budget"],
                "layer_streaming": args["layer_streaming"], "quantization": args["quantization"]},
    "worker": {"max_batch": 16},
})
plan = plan_model(args["model"], settings.runtime, max_batch=settings.worker.max_batch)
engine = load_engine(plan, settings)
from ollm.engine.layer_streaming import streamer_of
streamer = streamer_of(engine.runner.model)
experts = streamer.experts if streamer else []
print("loaded " + json.dumps({"memory": plan.memory.model_dump(), "applied_passes": plan.applied_passes}), flush=True)
for streams in args["streams"]:
    sys.stdin.readline()
    inboxes = [queue.Queue() for _ in range(streams)]
    texts = [""] * streams
    read_before = sum(offload.bytes_read for offload in experts)
    start = time.perf_counter()
    for i, inbox in enumerate(inboxes):
        request = GenerationRequest(model=args["model"], prompt=f"Stream {i} says hello to the reader",
                                    sampling=SamplingParams(temperature=0.0, max_new_tokens=args["tokens"],
                                                            ignore_eos=True))
        engine.submit(request, inbox.put)
    first, tokens = None, 0
    for i, inbox in enumerate(inboxes):
        while True:
            event = inbox.get()
            if event.type == "token":
                first = first or time.perf_counter()
            elif isinstance(event, FinalEvent):
                tokens += event.usage.completion_tokens
                texts[i] = event.text
                break
            else:
                raise SystemExit(f"error: {event}")
    end = time.perf_counter()
    decoded = tokens - streams  # each stream's first token comes from its prefill
    read = sum(offload.bytes_read for offload in experts) - read_before
    print("run " + json.dumps({"streams": streams, "tokens": tokens, "seconds": end - start,
                               "decode_seconds": end - first, "decode_tokens_per_second": decoded / (end - first),
                               "expert_bytes_read": read, "text": texts[0]}),
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


def measure(
    model: Path,
    budget: str,
    layer_streaming: str,
    streams: list[int],
    tokens: int,
    dtype: str = "bfloat16",
    quantization: str = "none",
) -> dict[str, Any]:
    args = {"model": str(model), "budget": budget, "layer_streaming": layer_streaming, "streams": streams,
            "tokens": tokens, "dtype": dtype, "quantization": quantization}  # fmt: skip
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
        "quantization": quantization,
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
                "experts_bytes",
                "expert_buffer_bytes",
                "expert_bytes_per_token",
            )
        },  # fmt: skip
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["llama", *FAMILIES], default="llama")
    parser.add_argument("--budget", default="256MiB", help="runtime.memory_budget of the streamed run.")
    parser.add_argument("--tokens", type=int, default=16, help="Tokens each stream generates.")
    parser.add_argument("--skip-generic", action="store_true", help="Do not load the whole model for comparison.")
    parser.add_argument("--text-check", action="store_true", help="Compare streamed and whole greedy text in float32.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint under /tmp (else it is deleted).")
    parser.add_argument("--quantization", choices=["none", "int8", "int4"], default="none",
                        help="runtime.quantization of the streamed run (its layers stream packed; the first load "
                        "writes the packed file, so its load_seconds include quantizing).")  # fmt: skip
    args = parser.parse_args()
    path = checkpoint(args.family)
    disk = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    weights = safetensors_weight_bytes(path, "bfloat16") or 0
    budget = parse_size(args.budget)
    assert isinstance(budget, int)
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "family": args.family,
        "machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, CPU, bfloat16",
        "checkpoint": {"weights_bytes": weights, "disk_bytes": disk, **json.loads((path / "config.json").read_text())},
        "budget_fraction_of_weights": budget / weights,
    }
    streamed = measure(path, args.budget, "auto", [1, 16], args.tokens, quantization=args.quantization)
    print(json.dumps(streamed), flush=True)
    report["streamed"] = streamed
    limit = streamed["baseline_mib"] + budget / 2**20 * 1.1
    single, sixteen = (run["decode_tokens_per_second"] for run in streamed["runs"])
    report["contract"] = {
        "family": args.family,
        "quantization": args.quantization,
        "weights_mib": weights / 2**20,
        "budget_mib": budget / 2**20,
        "peak_mib": streamed["peak_mib"],
        "baseline_plus_budget_plus_10pct_mib": limit,
        "met": streamed["peak_mib"] <= limit,
        "decode_tokens_per_second_1": single,
        "decode_tokens_per_second_16": sixteen,
        "ratio_16_to_1": sixteen / single,
        "ratio_met": sixteen / single >= 8,
    }
    one = streamed["runs"][0]
    if one["expert_bytes_read"]:
        # One stream: every decode step after the prefill reads the top-k experts of each layer.
        decode_steps = one["tokens"] - 1
        per_token = streamed["plan_mib"]["expert_bytes_per_token"]
        report["contract"]["expert_mib_per_token_planned"] = per_token
        report["contract"]["expert_mib_of_the_model"] = streamed["plan_mib"]["experts_bytes"]
        report["contract"]["expert_mib_read_1_stream_incl_prefill"] = one["expert_bytes_read"] / 2**20
        report["contract"]["decode_steps_1_stream"] = decode_steps
    if not args.skip_generic:
        generic = measure(path, "auto", "off", [1, 16], args.tokens)
        print(json.dumps(generic), flush=True)
        report["generic"] = generic
    if args.text_check:
        texts = [measure(path, "auto", mode, [1], args.tokens, "float32")["runs"][0]["text"] for mode in ("on", "off")]
        report["contract"]["float32_text_streamed_equals_whole"] = texts[0] == texts[1]
        report["float32_texts"] = texts
    print(json.dumps(report["contract"]), flush=True)
    mode = "" if args.quantization == "none" else f"-{args.quantization}"
    out = Path("docs/benchmarks") / f"layer-streaming-{args.family}{mode}-cpu-{report['date']}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(path)


if __name__ == "__main__":
    main()
