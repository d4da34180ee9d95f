"""The load generator: N concurrent streaming clients against an OpenAI-compatible chat endpoint.

Every stream records its time to first token and the time of each content chunk; a level's
numbers are computed from those, so the same code measures ollm and any peer server. The client is
aiohttp, as in vLLM's serving benchmark: httpx spends about a millisecond more per request in its
own request building and response parsing, which the echo run would report as serving latency.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROMPTS = [
    f"Write a long story about {topic}."
    for topic in (
        "a dragon who learns to cook",
        "a lighthouse keeper",
        "a robot exploring the ocean",
        "two friends crossing a desert",
        "a cat who becomes mayor",
        "the first city on Mars",
        "a lost violin",
        "a winter festival",
    )
]


@dataclass
class StreamResult:
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall_seconds: float
    output_tokens: int
    tokens_per_second: float
    requests_per_second: float
    ttft_p50: float | None
    ttft_p95: float | None
    itl_p50: float | None
    itl_p95: float | None
    itl_p99: float | None
    ttft_p99: float | None
    error_samples: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


async def stream_chat(
    client: aiohttp.ClientSession, base_url: str, model: str, prompt: str, max_tokens: int, headers: dict[str, str]
) -> StreamResult:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Fixed output lengths: servers that honour it (ollm, vLLM, llama.cpp) never stop early.
        "ignore_eos": True,
    }
    result = StreamResult()
    done = False
    start = time.perf_counter()
    try:
        async with client.post(f"{base_url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if line == b"data: [DONE]":
                    done = True
                if not line.startswith(b"data: ") or done:
                    continue
                now = time.perf_counter() - start
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    break
                if chunk.get("usage"):
                    result.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        if result.ttft is None:
                            result.ttft = now
                        result.token_times.append(now)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # llama-cpp-python's server (sse-starlette) can end a complete stream with a broken
        # chunked-encoding trailer; after [DONE] nothing was lost.
        if not done:
            result.error = f"{type(exc).__name__}: {exc}"
    if result.error is None and not done:
        result.error = "the stream ended before data: [DONE]"
    if not result.completion_tokens:
        result.completion_tokens = len(result.token_times)
    return result


async def run_level(
    base_url: str, model: str, concurrency: int, requests_per_client: int, max_tokens: int,
    api_key: str | None = None, prompts: list[str] = PROMPTS,
) -> LevelResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600.0)) as client:

        async def one_client(index: int) -> list[StreamResult]:
            out = []
            for turn in range(requests_per_client):
                prompt = prompts[(index + turn) % len(prompts)]
                out.append(await stream_chat(client, base_url, model, prompt, max_tokens, headers))
            return out

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    good = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in good if r.ttft is not None]
    gaps = [b - a for r in good for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    tokens = sum(r.completion_tokens for r in good)
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(good),
        wall_seconds=wall,
        output_tokens=tokens,
        tokens_per_second=tokens / wall if wall else 0.0,
        requests_per_second=len(good) / wall if wall else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(gaps, 50),
        itl_p95=percentile(gaps, 95),
        itl_p99=percentile(gaps, 99),
        error_samples=[r.error for r in results if r.error][:3],
    )
