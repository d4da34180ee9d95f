"""Soak: many concurrent streams for minutes against one worker; nothing may leak or go wrong.

A private Redis (loopback), one `ollm worker` on the real default model and one `ollm serve`, as
separate processes so their memory is measured apart. ``--streams`` clients (default 64) each
run, until ``--minutes`` (default 5) are over, streamed Responses with ``store: true``: the text
streamed must equal the stored response's ``output_text``, read back afterwards, and no stream
may end in an error. The stored response is then deleted, so everything left in Redis afterwards
is what the jobs themselves left.

Measured from outside (psutil, Redis commands), at the start (after one warm-up request) and at
the end: server and worker RSS and open fds, Redis key counts by kind and how many of the keys
the run created have no expiry (a leak: everything a job creates must expire or be removed),
pub/sub channels (``PUBSUB CHANNELS``) and subscribers of the cancel channel (``NUMSUB``).

    python -m bench.soak                 # 64 streams, 5 minutes
    python -m bench.soak --minutes 1     # shorter
Exit status 1 when a stream failed or mismatched, or when keys or channels leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import psutil
import redis

from bench.stack import free_port, wait_for_model
from workers.redis_server import RedisServer

OLLM = [sys.executable, "-c", "from cli.main import main; main()"]
REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, in simple words.",
    "List five uses of a paperclip.",
    "Describe a walk through a winter forest.",
]


def _kind(key: str) -> str:
    """``rq:job:<id>`` -> ``rq:job``: keys grouped by what made them, ids left out."""
    parts = key.split(":")
    return ":".join(parts[:2]) if len(parts) > 2 else key


def redis_snapshot(connection: redis.Redis, namespace: str) -> dict[str, Any]:
    keys = [str(k) for k in connection.scan_iter(count=1000)]
    channels = [str(c) for c in connection.pubsub_channels()]
    cancel = f"{namespace}:cancel"
    return {
        "keys": len(keys),
        "by_kind": dict(sorted(Counter(_kind(k) for k in keys).items())),
        "channels": len(channels),
        "event_channels": sum(1 for c in channels if c.startswith(f"{namespace}:events:")),
        "cancel_subscribers": dict(connection.pubsub_numsub(cancel)).get(cancel, 0),
        "key_names": keys,
    }


def process_snapshot(pid: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    return {"rss_mib": round(process.memory_info().rss / 2**20, 1), "fds": process.num_fds()}


def leaks(before: dict[str, Any], after: dict[str, Any], without_expiry: list[str]) -> list[str]:
    """What the run left behind for good: keys it made that never expire, channels still open.
    Keys that expire (RQ keeps finished jobs and results for ``result_ttl``) are no leak."""
    found = [f"key without expiry: {key}" for key in without_expiry]
    if after["event_channels"]:
        found.append(f"{after['event_channels']} job event channel(s) still subscribed")
    if after["channels"] > before["channels"]:
        found.append(f"pub/sub channels grew from {before['channels']} to {after['channels']}")
    if after["cancel_subscribers"] > before["cancel_subscribers"]:
        found.append("more subscribers of the cancel channel than before")
    return found


class Totals:
    def __init__(self) -> None:
        self.completed = 0
        self.errors: list[str] = []
        self.mismatches = 0
        self.output_tokens = 0


async def one_stream(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, totals: Totals) -> None:
    try:
        stream = await client.responses.create(
            model=model, input=prompt, stream=True, store=True, max_output_tokens=max_tokens
        )
        pieces: list[str] = []
        response_id: str | None = None
        async for event in stream:
            if event.type == "response.output_text.delta":
                pieces.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):
                # Incomplete: cut at max_output_tokens, a normal end (any other reason is not).
                details = event.response.incomplete_details
                if details is not None and details.reason != "max_output_tokens":
                    totals.errors.append(f"incomplete: {details.reason}")
                    return
                response_id = event.response.id
                totals.output_tokens += event.response.usage.output_tokens if event.response.usage else 0
            elif event.type in ("error", "response.failed"):
                totals.errors.append(f"{event.type}: {event}")
                return
        if response_id is None:
            totals.errors.append("the stream ended without response.completed")
            return
        stored = await client.responses.retrieve(response_id)
        if stored.output_text != "".join(pieces):
            totals.mismatches += 1
        await client.responses.delete(response_id)
        totals.completed += 1
    except openai.OpenAIError as exc:
        totals.errors.append(f"{type(exc).__name__}: {exc}")


async def soak(base_url: str, model: str, streams: int, seconds: float, max_tokens: int, sample: Any) -> Totals:
    totals = Totals()
    deadline = time.monotonic() + seconds
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def client_loop(index: int) -> None:
        turn = 0
        while time.monotonic() < deadline:
            await one_stream(client, model, PROMPTS[(index + turn) % len(PROMPTS)], max_tokens, totals)
            turn += 1

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
            sample(totals)
        # Every client now finishes the response it is in: bounded by one response's time.

    await asyncio.gather(sampler(), *(client_loop(i) for i in range(streams)))
    await client.close()
    return totals


async def warm_up(base_url: str, model: str, max_tokens: int) -> Totals:
    totals = Totals()
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    await one_stream(client, model, PROMPTS[0], max_tokens, totals)
    await client.close()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32, help="Output tokens per response.")
    parser.add_argument("--max-batch", type=int, default=None, help="worker.max_batch (default: the setting's).")
    parser.add_argument("--out", type=Path, default=None, help="Also write the report here (JSON).")
    args = parser.parse_args()

    namespace = f"soak{uuid.uuid4().hex[:8]}"
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / namespace
    logs.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLM_")}
    env.update({"OLLM_REDIS__NAMESPACE": namespace, "OLLM_CONFIG_FILE": os.devnull, "PYTHONUNBUFFERED": "1"})
    if "OLLM_RUNTIME__MODELS_DIR" in os.environ:
        env["OLLM_RUNTIME__MODELS_DIR"] = os.environ["OLLM_RUNTIME__MODELS_DIR"]
    if args.max_batch is not None:
        env["OLLM_WORKER__MAX_BATCH"] = str(args.max_batch)
    store = RedisServer(port=free_port()).start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        commands = {
            "worker": [*OLLM, "worker", "--model", args.model, "--redis-url", store.url],
            "server": [*OLLM, "serve", "--redis-url", store.url, "--port", str(port), "--log-level", "warning"],
        }
        pids: dict[str, int] = {}
        for name, command in commands.items():
            with (logs / f"{name}.log").open("wb") as log:
                process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            processes.append(process)
            pids[name] = process.pid
        wait_for_model(base_url, args.model)
        connection = redis.Redis.from_url(store.url, decode_responses=True)
        # One request first: what a first request allocates once is no leak.
        warm = asyncio.run(warm_up(base_url, args.model, args.max_tokens))
        if warm.errors:
            raise SystemExit(f"warm-up failed: {warm.errors}")
        time.sleep(2)
        before = {"redis": redis_snapshot(connection, namespace), **{n: process_snapshot(p) for n, p in pids.items()}}
        print(f"soak: {args.streams} streams for {args.minutes:g} min on {args.model}; logs in {logs}")
        started = time.monotonic()

        samples: list[dict[str, Any]] = []

        def sample(totals: Totals) -> None:
            now = {n: process_snapshot(p) for n, p in pids.items()}
            samples.append({"seconds": round(time.monotonic() - started), "completed": totals.completed, **now})
            print(
                f"  {time.monotonic() - started:6.0f}s  completed {totals.completed}  errors {len(totals.errors)}  "
                f"server {now['server']['rss_mib']} MiB / {now['server']['fds']} fds  "
                f"worker {now['worker']['rss_mib']} MiB / {now['worker']['fds']} fds",
                flush=True,
            )

        totals = asyncio.run(soak(base_url, args.model, args.streams, args.minutes * 60, args.max_tokens, sample))
        elapsed = time.monotonic() - started
        time.sleep(3)  # the last jobs' bookkeeping and unsubscribes
        after = {"redis": redis_snapshot(connection, namespace), **{n: process_snapshot(p) for n, p in pids.items()}}
        new_keys = set(after["redis"]["key_names"]) - set(before["redis"]["key_names"])
        forever = sorted(k for k in new_keys if connection.pttl(k) == -1)
        connection.close()
        for snapshot in (before, after):
            del snapshot["redis"]["key_names"]
        report = {
            "streams": args.streams,
            "seconds": round(elapsed, 1),
            "model": args.model,
            "completed": totals.completed,
            "errors": len(totals.errors),
            "first_errors": totals.errors[:5],
            "mismatches": totals.mismatches,
            "responses_per_second": round(totals.completed / elapsed, 2),
            "output_tokens_per_second": round(totals.output_tokens / elapsed, 1),
            "before": before,
            "under_load": samples,
            "after": after,
            "new_keys_without_expiry": forever[:20],
            "new_keys_without_expiry_count": len(forever),
        }
        report["leaks"] = leaks(before["redis"], after["redis"], forever)
        print("leaks:", report["leaks"] or "none")
        print(json.dumps(report, indent=2))
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        if totals.errors or totals.mismatches or totals.completed == 0 or report["leaks"]:
            raise SystemExit(1)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        store.stop()


if __name__ == "__main__":
    main()
