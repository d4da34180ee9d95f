"""Interactive latency with and without a Batch API batch running on the same worker.

One embedded stack (`ollm serve --ephemeral`, one worker, the default chat model). The same
interactive load (``--clients`` streaming clients, ``--requests`` each, ``--max-tokens`` fixed
with ignore_eos) runs three times: on an idle worker, while a batch of ``--lines`` chat requests
runs on it, and idle again once the batch is cancelled (the two idle runs together are the
baseline; apart, they show how much the machine itself drifted). Printed: time to first token,
whole-request latency and inter-token latency (p50, p95), their ratios, and how far the batch got
meanwhile (it must still be running when the loaded run ends, or that run did not overlap it).

    python -m bench.batch_priority                      # 200 lines, default settings
    python -m bench.batch_priority --batch-slots 16     # no slots kept for interactive requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai

from bench.client import PROMPTS, StreamResult, percentile, stream_chat
from bench.stack import embedded_stack
from ollm.settings import RuntimeSettings


async def interactive(base_url: str, model: str, clients: int, requests: int, max_tokens: int) -> list[StreamResult]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600.0)) as session:

        async def one_client(index: int) -> list[StreamResult]:
            return [
                await stream_chat(session, base_url, model, PROMPTS[(index + turn) % len(PROMPTS)], max_tokens, {})
                for turn in range(requests)
            ]

        per_client = await asyncio.gather(*(one_client(i) for i in range(clients)))
    return [result for results in per_client for result in results]


def summary(results: list[StreamResult]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.ttft is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    latency = [r.token_times[-1] for r in ok if r.token_times]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "latency_p50": percentile(latency, 50),
        "latency_p95": percentile(latency, 95),
        "itl_p50": percentile(itl, 50),
        "itl_p95": percentile(itl, 95),
    }


def batch_file(model: str, lines: int, max_tokens: int) -> bytes:
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
            },
        }
        for i in range(lines)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def counts(client: openai.OpenAI, batch_id: str) -> tuple[str, int, int]:
    batch = client.batches.retrieve(batch_id)
    done = batch.request_counts
    return batch.status, (done.completed if done else 0), (done.total if done else 0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or RuntimeSettings().model_reference
    files = Path(tempfile.mkdtemp(prefix="ollm-bench-files-"))
    env = {"OLLM_SERVER__FILES_DIR": str(files), "OLLM_SERVER__BATCH_CONCURRENCY": str(args.batch_concurrency)}
    if args.batch_slots is not None:
        env["OLLM_WORKER__BATCH_SLOTS"] = str(args.batch_slots)
    report: dict[str, Any] = {"model": model, "settings": env, "lines": args.lines}
    with embedded_stack(model, args.max_batch, args.log_dir / "batch_priority.log", env) as base_url:
        load = (model, args.clients, args.requests, args.max_tokens)
        asyncio.run(interactive(base_url, model, 1, 1, 4))  # warm-up
        idle_before = asyncio.run(interactive(base_url, *load))

        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        upload = client.files.create(
            file=("bench.jsonl", batch_file(model, args.lines, args.batch_tokens)), purpose="batch"
        )
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        started = time.monotonic()
        while counts(client, batch.id)[1] < 2:  # the batch is really running: its lines occupy the worker
            time.sleep(0.2)
        before = counts(client, batch.id)
        report["with_batch"] = summary(asyncio.run(interactive(base_url, *load)))
        after = counts(client, batch.id)
        report["batch_during_loaded_run"] = {"status_after": after[0], "completed_before": before[1],
                                             "completed_after": after[1], "total": after[2]}  # fmt: skip
        if not args.wait_batch:
            client.batches.cancel(batch.id)
        while counts(client, batch.id)[0] not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(1.0)
        final = counts(client, batch.id)
        report["batch"] = {"status": final[0], "completed": final[1], "seconds": time.monotonic() - started}
        idle_after = asyncio.run(interactive(base_url, *load))
    report["idle"] = summary(idle_before + idle_after)
    report["idle_before"], report["idle_after"] = summary(idle_before), summary(idle_after)
    return report


def ratio(loaded: float | None, idle: float | None) -> str:
    return f"{loaded / idle:.2f}x" if loaded is not None and idle else "-"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: runtime.model_reference")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--batch-tokens", type=int, default=32, help="max_tokens of each batch line")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8, help="per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-slots", type=int, help="worker.batch_slots (default: the setting's default)")
    parser.add_argument("--batch-concurrency", type=int, default=8)
    parser.add_argument("--wait-batch", action="store_true", help="let the batch finish (else it is cancelled)")
    parser.add_argument("--log-dir", type=Path, default=Path("bench-logs"))
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    report = run(args)
    idle, loaded = report["idle"], report["with_batch"]
    print(f"model {report['model']}, {args.clients} clients x {args.requests} requests, {args.max_tokens} tokens each")
    before, after = report["idle_before"], report["idle_after"]
    print(f"{'ms':<12}{'idle':>10}{'w/ batch':>10}{'ratio':>8}{'idle 1st':>10}{'idle 2nd':>10}")
    for key in ("ttft_p50", "ttft_p95", "latency_p50", "latency_p95", "itl_p50", "itl_p95"):
        print(
            f"{key:<12}{ms(idle[key]):>10}{ms(loaded[key]):>10}{ratio(loaded[key], idle[key]):>8}"
            f"{ms(before[key]):>10}{ms(after[key]):>10}"
        )
    print(f"errors: idle {idle['errors']}, with batch {loaded['errors']}")
    print(f"batch during the loaded run: {json.dumps(report['batch_during_loaded_run'])}")
    print(f"batch at the end: {json.dumps(report['batch'])}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
