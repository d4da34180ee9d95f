"""`python -m bench.run`: throughput and latency of the whole stack against concurrency.

By default it starts the stacks it measures (embedded `ollm serve`: private Redis + one worker):
the batching stack, the same stack with ``max_batch=1``, an echo-model stack for pipeline
overhead, and a stack that loads models on demand (a cold request and a model switch); plus
in-process ``generate`` as the baseline. Then, side by side at 1, 4, 16 and 32 streams, llama.cpp's
own ``llama-server`` on the model's published GGUF (bench/peer.py builds it when it is not
installed) and ollm with ``runtime.quantization`` none, int8 and int4, with the quality each
setting costs (bench/quality.py). ``--url`` measures an already running server instead. Writes a
JSON file and a PNG plot, prints tables, and checks the targets of issues #4 and #20.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bench.baselines import generate_one_at_a_time
from bench.client import PROMPTS, LevelResult, run_level
from bench.loading import loading_rows, measure_loading
from bench.peer import llama_cpp_peer
from bench.quality import TEXT_SOURCE, measure_quality, quality_row
from bench.stack import embedded_stack
from ollm.devices import resolve_device, resolve_dtype
from ollm.plan import plan_model
from ollm.settings import load_settings

ECHO_PROMPT_WORDS = 200


def measure(
    base_url: str,
    model: str,
    levels: list[int],
    per_client: int,
    max_tokens: int,
    prompts: list[str] = PROMPTS,
    label: str | None = None,
) -> list[LevelResult]:
    results = []
    for concurrency in levels:
        level = asyncio.run(run_level(base_url, model, concurrency, per_client, max_tokens, prompts=prompts))
        print(_row(label or model, level), flush=True)
        results.append(level)
    return results


def _row(label: str, level: LevelResult) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:8.2f}"

    return (
        f"{label:<28} c={level.concurrency:<3} tok/s={level.tokens_per_second:8.1f} "
        f"ttft p50/p95 ms={ms(level.ttft_p50)}/{ms(level.ttft_p95)} "
        f"itl p50/p95 ms={ms(level.itl_p50)}/{ms(level.itl_p95)} req/s={level.requests_per_second:6.2f} "
        f"errors={level.errors}"
    )


def echo_overhead(log_dir: Path, levels: list[int], per_client: int) -> list[LevelResult]:
    """The echo model does no work, so its latencies are what HTTP + RQ + pub/sub cost."""
    prompts = [" ".join(f"w{i}" for i in range(ECHO_PROMPT_WORDS))]
    with embedded_stack("echo", 16, log_dir / "echo.log") as url:
        # Warm-up: the first request pays for connection set-up and imports.
        asyncio.run(run_level(url, "echo", 1, 3, ECHO_PROMPT_WORDS, prompts=prompts))
        return measure(url, "echo", levels, per_client * 5, ECHO_PROMPT_WORDS, prompts)


def loading(model: str, embedding_model: str, out: Path) -> dict[str, Any]:
    print("loading on demand: cold request and model switch next to a warm request…", flush=True)
    result = measure_loading(model, embedding_model, out)
    for row in loading_rows(result):
        print(f"  {row}", flush=True)
    return result


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    stack = {level["concurrency"]: level for level in report.get("stack", [])}
    single = {level["concurrency"]: level for level in report.get("stack_max_batch_1", [])}
    echo = {level["concurrency"]: level for level in report.get("echo", [])}
    generate = report.get("in_process_generate", {}).get("tokens_per_second")
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, target: str, ok: bool | None) -> None:
        checks.append({"target": name, "value": value, "wanted": target, "met": ok})

    if 16 in stack and 1 in stack:
        ratio = stack[16]["tokens_per_second"] / stack[1]["tokens_per_second"]
        check("aggregate tok/s at 16 vs single stream, same stack", ratio, ">= 6x", ratio >= 6)
        ttft = stack[16]["ttft_p50"]
        check("TTFT p50 at 16 streams (s)", ttft, "< 1.5 s", ttft is not None and ttft < 1.5)
    if 16 in stack and 16 in single:
        ratio = stack[16]["tokens_per_second"] / single[16]["tokens_per_second"]
        check("aggregate tok/s at 16 vs max_batch=1 stack at 16", ratio, ">= 4x", ratio >= 4)
    if 1 in stack and generate:
        ratio = stack[1]["tokens_per_second"] / generate
        check("single-stream tok/s vs in-process generate", ratio, ">= 0.9", ratio >= 0.9)
    invariant_key = "stack_batch_invariant" if "stack_batch_invariant" in report else "stack"
    variant_key = "stack_batch_variant" if "stack_batch_variant" in report else "stack"
    if invariant_key != variant_key:
        invariant = {level["concurrency"]: level for level in report[invariant_key]}
        variant = {level["concurrency"]: level for level in report[variant_key]}
        for streams in sorted(set(invariant) & set(variant)):
            ratio = invariant[streams]["tokens_per_second"] / variant[streams]["tokens_per_second"]
            # Under 15% of aggregate throughput at 16 streams is the price at which it is the default.
            wanted = ">= 0.85 to be the default" if streams == 16 else "reported"
            check(f"batch-invariant vs variant tok/s at {streams} streams", ratio, wanted,
                  ratio >= 0.85 if streams == 16 else None)  # fmt: skip
    if 1 in echo:
        ttft, itl = echo[1]["ttft_p50"], echo[1]["itl_p50"]
        check("echo: added latency to first token p50 (ms)", ttft * 1000 if ttft else None, "< 5 ms",
              ttft is not None and ttft < 0.005)  # fmt: skip
        check("echo: added latency per token p50 (ms)", itl * 1000 if itl is not None else None, "< 0.5 ms",
              itl is not None and itl < 0.0005)  # fmt: skip
    return checks


def quantization_comparison(model: str, levels: list[int], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """llama.cpp's server, then ollm at each runtime.quantization, at the same levels; and their quality."""
    settings = load_settings({"runtime": {"model_reference": model}})
    result: dict[str, Any] = {"levels": levels, "ollm_max_batch": settings.worker.max_batch, "ollm": {}}
    with llama_cpp_peer(model, settings.runtime, out / "llama-server.log", build=not args.skip_peer) as peer:
        if peer is not None:
            url, peer_model = peer
            asyncio.run(run_level(url, peer_model, 1, 1, 8))  # warm-up
            result["llama_cpp_server"] = [lv.as_dict() for lv in measure(url, peer_model, levels, 1, args.max_tokens,
                                                                         label="llama.cpp server")]  # fmt: skip
    for mode in args.quantization.split(","):
        env = {"OLLM_RUNTIME__QUANTIZATION": mode}
        with embedded_stack(model, settings.worker.max_batch, out / f"stack-{mode}.log", env) as url:
            asyncio.run(run_level(url, model, 1, 1, 8))
            result["ollm"][mode] = [lv.as_dict() for lv in measure(url, model, levels, 1, args.max_tokens,
                                                                   label=f"ollm {mode}")]  # fmt: skip
    if not args.skip_quality:
        print(f"quality on {args.quality_tokens} tokens of {TEXT_SOURCE}…", flush=True)
        result["quality"] = measure_quality(model, args.quality_tokens)
    return result


def comparison_rows(comparison: dict[str, Any]) -> list[str]:
    """The side-by-side table: tok/s and TTFT p50 per setting, and each setting's ratio to llama.cpp."""
    peer = {lv["concurrency"]: lv for lv in comparison.get("llama_cpp_server", [])}
    modes = comparison["ollm"]
    header = (
        "| streams | llama.cpp tok/s (TTFT p50) | "
        + " | ".join(f"ollm {mode} tok/s (TTFT p50) | {mode} / llama.cpp" for mode in modes)
        + " |"
    )
    rows = [header, "|" + " --- |" * (2 + 2 * len(modes))]
    for streams in comparison["levels"]:
        theirs = peer.get(streams)
        cells = [str(streams), _cell(theirs)]
        for levels in modes.values():
            ours = next((lv for lv in levels if lv["concurrency"] == streams), None)
            ratio = ours["tokens_per_second"] / theirs["tokens_per_second"] if ours and theirs else None
            cells += [_cell(ours), "-" if ratio is None else f"{ratio:.2f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _cell(level: dict[str, Any] | None) -> str:
    if level is None:
        return "-"
    ttft = level["ttft_p50"]
    return f"{level['tokens_per_second']:.1f} ({'-' if ttft is None else f'{ttft:.2f} s'})"


def check_quantization_targets(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    peer = {lv["concurrency"]: lv for lv in comparison.get("llama_cpp_server", [])}
    int4 = {lv["concurrency"]: lv for lv in comparison["ollm"].get("int4", [])}
    checks = []
    for streams, wanted in ((1, 1.0), (16, 1.5), (32, 1.5)):
        if streams in peer and streams in int4:
            ratio = int4[streams]["tokens_per_second"] / peer[streams]["tokens_per_second"]
            checks.append({"target": f"ollm int4 vs llama.cpp server tok/s at {streams} streams", "value": ratio,
                           "wanted": f">= {wanted}x", "met": ratio >= wanted})  # fmt: skip
    if 32 in int4:
        ttft = int4[32]["ttft_p50"]
        checks.append({"target": "ollm int4 TTFT p50 at 32 streams (s)", "value": ttft, "wanted": "< 1 s",
                       "met": ttft is not None and ttft < 1})  # fmt: skip
    return checks


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    comparison = report.get("quantization") or {}
    series = [
        ("ollm (continuous batching)", report.get("stack")),
        ("ollm max_batch=1", report.get("stack_max_batch_1")),
        ("llama.cpp server", comparison.get("llama_cpp_server")),
    ]
    batch = comparison.get("ollm_max_batch", "auto")
    series += [(f"ollm {mode}, max_batch {batch}", levels) for mode, levels in (comparison.get("ollm") or {}).items()]
    for label, levels in series:
        levels = levels or []
        if not levels:
            continue
        xs = [lv["concurrency"] for lv in levels]
        left.plot(xs, [lv["tokens_per_second"] for lv in levels], marker="o", label=label)
        right.plot(xs, [(lv["ttft_p50"] or 0) * 1000 for lv in levels], marker="o", label=f"{label} TTFT p50")
        right.plot(xs, [(lv["itl_p50"] or 0) * 1000 for lv in levels], marker="x", linestyle="--",
                   label=f"{label} ITL p50")  # fmt: skip
    generate = report.get("in_process_generate", {}).get("tokens_per_second")
    if generate:
        left.axhline(generate, color="grey", linestyle=":", label="in-process generate, 1 at a time")
    left.set(xlabel="concurrent streams", ylabel="aggregate output tokens/s", title="Throughput")
    right.set(xlabel="concurrent streams", ylabel="ms", title="Latency", yscale="log")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.suptitle(f"{report['model']} on {report['machine']['device']} ({report['machine']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Measure this running server instead of starting stacks.")
    parser.add_argument("--model", default=None, help="Model reference (default: the configured default).")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--baseline-levels", default="1,16", help="Levels for the max_batch=1 stack and peer.")
    parser.add_argument("--skip-baselines", action="store_true", help="Only the batching stack.")
    parser.add_argument("--skip-echo", action="store_true", help="No pipeline-overhead run.")
    parser.add_argument("--skip-loading", action="store_true", help="No cold-request / model-switch run.")
    parser.add_argument("--only-loading", action="store_true", help="Only the cold-request / model-switch run.")
    parser.add_argument("--quantization", default="none,int8,int4", help="runtime.quantization settings to compare.")
    parser.add_argument("--comparison-levels", default="1,4,16,32", help="Levels for llama.cpp vs quantized ollm.")
    parser.add_argument("--skip-comparison", action="store_true", help="No llama.cpp vs quantized ollm run.")
    parser.add_argument("--skip-peer", action="store_true", help="No llama-server build (one already built runs).")
    parser.add_argument("--skip-quality", action="store_true", help="No perplexity / agreement run.")
    parser.add_argument("--quality-tokens", type=int, default=10240, help="Tokens of the fixed text to score.")
    parser.add_argument("--out", default="bench/results", help="Directory for the JSON, PNG and logs.")
    args = parser.parse_args()

    settings = load_settings({"runtime": {"model_reference": args.model}})
    model = settings.runtime.model_reference
    levels = [int(x) for x in args.concurrency.split(",")]
    baseline_levels = [int(x) for x in args.baseline_levels.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.runtime.device)
    report: dict[str, Any] = {
        "model": model,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": device,
            "dtype": resolve_dtype(settings.runtime.dtype, device),
            "batch_invariant": settings.runtime.batch_invariant,
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.only_loading:
        report["loading"] = loading(model, settings.runtime.embedding_model_reference, out)
    elif args.url:
        report["stack"] = [lv.as_dict() for lv in measure(args.url, model, levels, args.requests_per_client,
                                                          args.max_tokens)]  # fmt: skip
    else:
        plan = plan_model(model, settings.runtime)
        if not args.skip_baselines and plan.path is not None:
            print("in-process generate, one request at a time…", flush=True)
            report["in_process_generate"] = generate_one_at_a_time(plan.path, plan.dtype, args.max_tokens, 4)
            print(f"  {report['in_process_generate']['tokens_per_second']:.1f} tok/s", flush=True)
        with embedded_stack(model, settings.worker.max_batch, out / "stack.log") as url:
            asyncio.run(run_level(url, model, 1, 1, 8))  # warm-up
            report["stack"] = [lv.as_dict() for lv in measure(url, model, levels, args.requests_per_client,
                                                              args.max_tokens)]  # fmt: skip
        if not args.skip_baselines:
            # The other batch-invariance mode, for the price of reproducibility (docs/engine.md).
            other = not settings.runtime.batch_invariant
            env = {"OLLM_RUNTIME__BATCH_INVARIANT": str(other).lower()}
            with embedded_stack(model, settings.worker.max_batch, out / "stack-other-mode.log", env) as url:
                asyncio.run(run_level(url, model, 1, 1, 8))
                report["stack_batch_invariant" if other else "stack_batch_variant"] = [
                    lv.as_dict() for lv in measure(url, model, baseline_levels, args.requests_per_client,
                                                   args.max_tokens)
                ]  # fmt: skip
            with embedded_stack(model, 1, out / "stack-max-batch-1.log") as url:
                asyncio.run(run_level(url, model, 1, 1, 8))
                report["stack_max_batch_1"] = [
                    lv.as_dict() for lv in measure(url, f"{model}", baseline_levels, 1, args.max_tokens)
                ]
        if not args.skip_comparison:
            levels_compared = [int(x) for x in args.comparison_levels.split(",")]
            report["quantization"] = quantization_comparison(model, levels_compared, args, out)
        if not args.skip_echo:
            report["echo"] = [lv.as_dict() for lv in echo_overhead(out, [1, 16], args.requests_per_client)]
        if not args.skip_loading:
            report["loading"] = loading(model, settings.runtime.embedding_model_reference, out)
    report["targets"] = check_targets(report)
    if report.get("quantization"):
        report["targets"] += check_quantization_targets(report["quantization"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    png_path = out / f"bench-{stamp}.png"
    if report.get("stack"):
        plot(report, png_path)
    print()
    if report.get("quantization"):
        print("\n".join(comparison_rows(report["quantization"])))
        for mode, row in (report["quantization"].get("quality") or {}).get("modes", {}).items():
            print(quality_row(mode, row))
        print()
    for target in report["targets"]:
        value = target["value"]
        shown = "-" if value is None else f"{value:.2f}"
        verdict = {True: "MET ", False: "MISS", None: "    "}[target["met"]]
        print(f"{verdict} {target['target']}: {shown} (wanted {target['wanted']})")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if report.get("stack") else ""))


if __name__ == "__main__":
    main()
