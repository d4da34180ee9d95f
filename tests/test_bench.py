"""The benchmark's own arithmetic (its numbers come from running it, never from a unit test)."""

from __future__ import annotations

from pathlib import Path

from bench.client import percentile
from bench.run import check_targets
from bench.soak import leaks


def level(concurrency: int, tps: float, ttft: float = 0.5, itl: float = 0.05) -> dict[str, object]:
    return {"concurrency": concurrency, "tokens_per_second": tps, "ttft_p50": ttft, "itl_p50": itl}


def test_percentiles() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.5
    assert percentile(values, 95) == 95.05


def test_targets_are_judged_from_the_report() -> None:
    report = {
        "stack": [level(1, 25.0), level(16, 200.0, ttft=1.2)],
        "stack_max_batch_1": [level(16, 40.0)],
        "in_process_generate": {"tokens_per_second": 26.0},
        "echo": [level(1, 0.0, ttft=0.004, itl=0.0001)],
    }
    met = {t["target"]: t["met"] for t in check_targets(report)}
    assert met == {
        "aggregate tok/s at 16 vs single stream, same stack": True,
        "TTFT p50 at 16 streams (s)": True,
        "aggregate tok/s at 16 vs max_batch=1 stack at 16": True,
        "single-stream tok/s vs in-process generate": True,
        "echo: added latency to first token p50 (ms)": True,
        "echo: added latency per token p50 (ms)": True,
    }
    report["stack"] = [level(1, 25.0), level(16, 100.0, ttft=2.0)]
    missed = {t["target"] for t in check_targets(report) if not t["met"]}
    assert missed == {
        "aggregate tok/s at 16 vs single stream, same stack",
        "aggregate tok/s at 16 vs max_batch=1 stack at 16",
        "TTFT p50 at 16 streams (s)",
    }


def test_soak_calls_only_what_never_goes_away_a_leak() -> None:
    quiet = {"channels": 3, "event_channels": 0, "cancel_subscribers": 1}
    assert leaks(quiet, dict(quiet), []) == []
    assert leaks(quiet, {**quiet, "channels": 4, "event_channels": 1}, ["ollm:x"]) == [
        "key without expiry: ollm:x",
        "1 job event channel(s) still subscribed",
        "pub/sub channels grew from 3 to 4",
    ]


def test_kv_offload_bench_model_copy_extends_the_context_without_copying_weights(
    tmp_path: Path, default_model_dir: Path
) -> None:
    from transformers import AutoConfig

    from bench.kv_offload import extended_model

    copy = extended_model(tmp_path, default_model_dir)
    config = AutoConfig.from_pretrained(copy)
    assert config.max_position_embeddings == 16384
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    weights = copy / "model.safetensors"
    assert weights.resolve().samefile(default_model_dir / "model.safetensors")  # a link, not a second copy
