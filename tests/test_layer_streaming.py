"""Layer streaming (llama.layer-offload) on real files: a small synthetic llama checkpoint and SmolLM2.

Streamed and resident runs are compared within one test run (never against stored text): float32
greedy tokens are equal; in bfloat16 the documented tolerance holds (docs/memory.md).
"""

from __future__ import annotations

import json
import os
import queue
from math import prod
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from bench.synthetic import LlamaShape, write_llama_checkpoint
from ollm.engine.base import Engine
from ollm.engine.layer_streaming import load_streamed, streamer_of
from ollm.engine.loader import load_engine
from ollm.engine.positioned_io import tensor_bytes
from ollm.errors import MemoryBudgetError, UnsupportedModelError
from ollm.generation import ChatMessage, ErrorEvent, Event, FinalEvent, GenerationRequest, SamplingParams
from ollm.memory import FULL_ATTENTION_SLACK
from ollm.plan import RuntimePlan, plan_model
from ollm.settings import Settings, load_settings
from server.app import create_app
from tests.conftest import DEFAULT_CHAT_MODEL
from tests.test_server_routes import services_for

# Five layers (odd: layer 4 and layer 0 share a slot, so the wrap-around fill waits for layer 4),
# layers large against the embeddings so that streaming frees a measurable share of the weights.
SHAPE = LlamaShape(layers=5, hidden=64, intermediate=512, heads=4, kv_heads=2, context=256)
KV_PER_TOKEN_F32 = 2 * 5 * 2 * 16 * 4
# bfloat16: a streamed forward's logits stay within this fraction of the largest logit of the
# resident forward's, and greedy picks agree wherever the resident top two are further apart than
# twice that. The kernels and weights are the same, so on the CPUs measured the logits are identical.
BFLOAT16_TOLERANCE = 1 / 64
PROMPTS = ["Hello", "The sky is", "One two three four", "word " * 40]  # the last one prefills in chunks


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("synthetic"), SHAPE, "bfloat16", shard_bytes=2**20)


@pytest.fixture(scope="module")
def resident(synthetic: Path) -> list[FinalEvent]:
    """The resident engine's greedy answers to PROMPTS, the reference the streamed runs must equal
    (computed once: several tests compare against it)."""
    return _answers(synthetic, PROMPTS)


def _settings(path: Path | str, worker: dict[str, Any] | None = None, **runtime: Any) -> Settings:
    return load_settings(
        {
            "runtime": {"model_reference": str(path), "dtype": "float32"} | runtime,
            "worker": {"max_batch": 4, "max_tokens_per_step": 16} | (worker or {}),
        }
    )


def _plan(path: Path | str, **runtime: Any) -> RuntimePlan:
    settings = _settings(path, **runtime)
    return plan_model(settings.runtime.model_reference, settings.runtime)


def _answers(
    path: Path | str, prompts: list[str], worker: dict[str, Any] | None = None, chat: bool = False, **runtime: Any
) -> list[FinalEvent]:
    """Every prompt submitted at once (so they share batches), greedy, through the real engine."""
    settings = _settings(path, worker, **runtime)
    engine = load_engine(plan_model(settings.runtime.model_reference, settings.runtime), settings)
    try:
        finals = _run_together(engine, [_request(str(path), prompt, chat) for prompt in prompts])
        streamer = streamer_of(engine.runner.model)  # type: ignore[attr-defined]
        fills = streamer.fills if streamer else 0
    finally:
        engine.close()
    for final in finals:
        assert final.execution is not None
        assert ("llama.layer-offload" in final.execution.applied_passes) == (fills > 0)
    return finals


def _request(model: str, prompt: str, chat: bool = False) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
    if chat:
        return GenerationRequest(model=model, messages=[ChatMessage(role="user", content=prompt)], sampling=sampling)
    return GenerationRequest(model=model, prompt=prompt, sampling=sampling)


def _run_together(engine: Engine, requests: list[GenerationRequest]) -> list[FinalEvent]:
    inboxes: list[queue.Queue[Event]] = [queue.Queue() for _ in requests]
    for request, inbox in zip(requests, inboxes, strict=True):
        engine.submit(request, inbox.put)
    finals = []
    for inbox in inboxes:
        while not isinstance(event := inbox.get(timeout=300), FinalEvent):
            assert event.type == "token", event
        finals.append(event)
    return finals


def _layer_bytes(dtype_bytes: int) -> int:
    return sum(prod(shape) for shape in SHAPE.layer_tensors(0).values()) * dtype_bytes


# -- the plan ------------------------------------------------------------------------------------


def test_plan_streams_the_layers_when_the_weights_do_not_fit(synthetic: Path) -> None:
    roomy = _plan(synthetic, memory_budget="1GiB").memory
    assert roomy.strategy == "resident" and not roomy.layer_streaming
    assert roomy.weights_bytes == SHAPE.parameters() * 4 and roomy.activations_bytes is not None
    resident = (SHAPE.vocab * SHAPE.hidden + SHAPE.hidden) * 4  # tied head: embeddings and final norm
    staging = 512 * 64 * 2  # the largest bfloat16 tensor of a layer, read and cast to float32
    held = resident + 2 * _layer_bytes(4) + staging
    kv = (256 + FULL_ATTENTION_SLACK) * KV_PER_TOKEN_F32  # the context and its spare columns
    budget = held + kv + roomy.activations_bytes
    assert budget < roomy.weights_bytes + roomy.activations_bytes  # resident, it would not fit

    plan = _plan(synthetic, memory_budget=budget)
    memory = plan.memory
    assert (memory.strategy, memory.layer_streaming, memory.fits, memory.kv_offload) == (
        "streamed-layers", True, True, False
    )  # fmt: skip
    assert (memory.resident_weights_bytes, memory.layer_bytes, memory.stream_slots, memory.staging_bytes) == (
        resident, _layer_bytes(4), 2, staging
    )  # fmt: skip
    assert memory.weights_in_memory_bytes == held
    assert plan.expected_peak_bytes() == held + kv + roomy.activations_bytes == budget
    assert plan.applied_passes == ["llama.sdpa-attention", "llama.layer-offload"]
    assert memory.reason is not None and "decoder layers stream from disk" in memory.reason

    # bfloat16 files read into bfloat16 slots need no staging buffer.
    assert _plan(synthetic, dtype="bfloat16", layer_streaming="on").memory.staging_bytes == 0


def test_budget_below_the_streaming_floor_refuses_with_numbers(synthetic: Path) -> None:
    roomy = _plan(synthetic, memory_budget="1GiB").memory
    assert roomy.activations_bytes is not None
    floor = (SHAPE.vocab * SHAPE.hidden + SHAPE.hidden) * 4 + 2 * _layer_bytes(4) + 512 * 64 * 2
    settings = _settings(synthetic, memory_budget=floor + roomy.activations_bytes - 1)
    plan = plan_model(str(synthetic), settings.runtime)
    assert (plan.memory.strategy, plan.memory.layer_streaming, plan.memory.kv_cache_token_limit) == (
        "over-budget", True, 0
    )  # fmt: skip
    assert plan.memory.refuses_load()
    with pytest.raises(MemoryBudgetError, match=r"resident 12\.0 MiB \+ layer slots 865\.0 KiB \(2 x 432\.5 KiB\) "
                       r"\+ staging 64\.0 KiB.*Even streamed \(llama\.layer-offload\).*Loading refuses"):  # fmt: skip
        load_engine(plan, settings)


def test_kv_cache_is_capped_beside_streamed_layers(synthetic: Path) -> None:
    streamed = _plan(synthetic, layer_streaming="on").memory
    assert streamed.weights_in_memory_bytes is not None and streamed.activations_bytes is not None
    budget = streamed.weights_in_memory_bytes + streamed.activations_bytes + 100 * KV_PER_TOKEN_F32
    # KV offload off: the cache is capped to what the budget leaves beside the streamed layers.
    memory = _plan(synthetic, memory_budget=budget, kv_offload="off").memory
    assert (memory.strategy, memory.kv_cache_token_limit, memory.kv_offload) == (
        "streamed-layers-capped-kv", 100, False
    )  # fmt: skip
    assert memory.required_passes == ["llama.layer-offload", "llama.kv-offload"]
    assert memory.expected_peak_bytes == budget
    # auto, with room for the running layer's cache (its resident part): the whole context's cache
    # goes to disk instead, both passes apply, and nothing is capped.
    offloaded = _plan(synthetic, layer_streaming="on", kv_offload="on").memory
    assert offloaded.kv_resident_bytes is not None
    budget = streamed.weights_in_memory_bytes + streamed.activations_bytes + offloaded.kv_resident_bytes
    plan = _plan(synthetic, memory_budget=budget)
    memory = plan.memory
    assert (memory.strategy, memory.kv_cache_token_limit, memory.kv_offload) == (
        "streamed-layers-kv-offload", None, True
    )  # fmt: skip
    assert plan.applied_passes == ["llama.sdpa-attention", "llama.layer-offload", "llama.kv-offload"]
    assert memory.kv_resident_bytes is not None and memory.expected_peak_bytes is not None
    held = streamed.weights_in_memory_bytes + streamed.activations_bytes
    assert memory.expected_peak_bytes == held + memory.kv_resident_bytes
    assert memory.expected_peak_bytes <= budget


def test_layers_that_cannot_stream_fall_back_or_refuse(synthetic: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in synthetic.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(file)
            tensors.pop("model.layers.3.mlp.up_proj.weight", None)
            save_file(tensors, str(broken / file.name))
        else:
            (broken / file.name).write_bytes(file.read_bytes())
    why = "layer 3 is not like layer 0, the first full_attention layer (missing ['mlp.up_proj.weight']"
    auto = _plan(broken)
    assert (
        not auto.memory.layer_streaming
        and auto.applied_passes == ["llama.sdpa-attention"]
        and auto.memory.strategy == "resident"
    )
    tight = _plan(broken, memory_budget="8MiB").memory
    assert not tight.layer_streaming and tight.refuses_load()
    assert why in (tight.reason or "")
    with pytest.raises(UnsupportedModelError, match=r"layer_streaming=on, but .* cannot stream its layers: layer 3"):
        _plan(broken, layer_streaming="on")


def test_no_specialization_forces_the_generic_path(synthetic: Path) -> None:
    tight = _plan(synthetic, memory_budget="13MiB", use_specialization=False)
    assert not tight.memory.layer_streaming and tight.applied_passes == []
    assert tight.memory.refuses_load() and "specialization is disabled" in (tight.memory.reason or "")
    with pytest.raises(UnsupportedModelError, match="specialization is disabled"):
        _plan(synthetic, layer_streaming="on", use_specialization=False)
    assert not _plan(synthetic, layer_streaming="off", memory_budget="13MiB").memory.layer_streaming


def test_cli_and_plan_route_show_the_streamed_plan(synthetic: Path, cli: Any, clean_settings_env: Path) -> None:
    info = cli("models", "info", str(synthetic), "--plan-json", "--dtype", "float32", "--layer-streaming", "on")
    assert info.exit_code == 0, info.output
    memory = json.loads(info.stdout)["memory"]
    assert (memory["strategy"], memory["layer_streaming"], memory["stream_slots"]) == ("streamed-layers", True, 2)
    table = cli("models", "info", str(synthetic), "--dtype", "float32", "--layer-streaming", "on")
    assert "streamed:" in table.stdout and "llama.layer-offload" in table.stdout
    doctor = cli("doctor", "--json", "--model", str(synthetic), "--layer-streaming", "on")
    assert json.loads(doctor.stdout)["plan"]["applied_passes"] == ["llama.sdpa-attention", "llama.layer-offload"]
    env = cli("doctor", "--plan-json", "--model", str(synthetic), env={"OLLM_RUNTIME__LAYER_STREAMING": "on"})
    assert json.loads(env.stdout)["memory"]["layer_streaming"] is True

    settings = Settings(redis={"url": "redis://fake", "namespace": "unit"})
    settings.runtime.models_dir = synthetic.parent  # the server plans directories under its models dir only
    # The route alone, without the app's lifespan (the batch runner): once, beside another test
    # process, its shutdown over fakeredis hung until pytest-timeout (600 s; never seen alone).
    client = TestClient(create_app(settings, services_for(settings)))
    body = {"model": str(synthetic), "dtype": "float32", "layer_streaming": "on", "context_tokens": 100}
    answer = client.post("/v1/plan", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["memory"]["weights_in_memory_bytes"] == memory["weights_in_memory_bytes"]


def test_prompt_command_streams_the_layers(synthetic: Path, cli: Any) -> None:
    def prompt(mode: str) -> dict[str, Any]:
        result = cli("prompt", "Hello there", "--model", str(synthetic), "--dtype", "float32", "--json",
                     "-t", "0", "-n", "6", "--layer-streaming", mode)  # fmt: skip
        assert result.exit_code == 0, result.output
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer

    streamed, resident = prompt("on"), prompt("off")
    assert streamed["execution"]["applied_passes"] == ["llama.sdpa-attention", "llama.layer-offload"]
    assert resident["execution"]["applied_passes"] == ["llama.sdpa-attention"]
    assert streamed["text"] == resident["text"] and streamed["usage"] == resident["usage"]


def test_layers_are_read_with_positioned_reads_not_mapped(tmp_path: Path) -> None:
    path = write_llama_checkpoint(tmp_path / "unmapped", SHAPE, "bfloat16", shard_bytes=2**20)
    model = load_streamed(path, torch.float32, "cpu")
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    # Mapped pages would count against the process: no file of the checkpoint may be mapped.
    assert str(path) not in Path("/proc/self/maps").read_text()
    streamer = streamer_of(model)
    assert streamer is not None and streamer.fills >= SHAPE.layers


def test_a_checkpoint_truncated_under_a_running_engine_fails_requests_clearly(tmp_path: Path) -> None:
    path = write_llama_checkpoint(tmp_path / "truncated", SHAPE, "bfloat16", shard_bytes=2**20)
    settings = _settings(path, layer_streaming="on")
    engine = load_engine(plan_model(str(path), settings.runtime), settings)
    try:
        assert isinstance(_run_together(engine, [_request(str(path), "Hello")])[0], FinalEvent)
        last = sorted(path.glob("*.safetensors"))[-1]
        whole = last.read_bytes()
        os.truncate(last, len(whole) // 2)
        events: queue.Queue[Event] = queue.Queue()
        engine.submit(_request(str(path), "Hello again"), events.put)
        while (event := events.get(timeout=120)).type == "token":
            pass
        assert isinstance(event, ErrorEvent), event
        assert "the checkpoint is truncated" in event.message and last.name in event.message
        # The engine survives: once the file is whole again (the same file: it stays open), requests run.
        with last.open("r+b") as handle:
            handle.write(whole)
        assert isinstance(_run_together(engine, [_request(str(path), "Hello")])[0], FinalEvent)
    finally:
        engine.close()


def _open_files_under(path: Path) -> list[str]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


def test_a_load_that_fails_leaves_no_file_open(tmp_path: Path) -> None:
    path = write_llama_checkpoint(tmp_path / "broken", SHAPE, "bfloat16", shard_bytes=2**20)
    # The resident tensors (embeddings first) cannot be read whole: the load fails after opening every shard.
    for shard in path.glob("*.safetensors"):
        os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(OSError, match="truncated"):
        load_streamed(path, torch.float32, "cpu")
    assert _open_files_under(path) == []


def test_positioned_reads_refuse_a_tensor_whose_bytes_would_be_a_copy() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        tensor_bytes(torch.zeros(4, 4).t())


# -- the tokens ----------------------------------------------------------------------------------


def test_streamed_greedy_tokens_equal_resident_in_float32(synthetic: Path, resident: list[FinalEvent]) -> None:
    budget = _plan(synthetic, layer_streaming="on").memory.expected_peak_bytes
    streamed = _answers(synthetic, PROMPTS, memory_budget=budget)  # auto: the weights do not fit, so they stream
    assert [f.usage.prompt_tokens for f in streamed][-1] > 16  # prefilled over several steps
    assert [f.text for f in streamed] == [f.text for f in resident]
    assert [f.usage.completion_tokens for f in streamed] == [f.usage.completion_tokens for f in resident]


def test_streamed_layers_with_offloaded_kv_equal_resident_in_float32(
    synthetic: Path, resident: list[FinalEvent], tmp_path: Path
) -> None:
    both = _answers(synthetic, PROMPTS, layer_streaming="on", kv_offload="on", kv_offload_dir=tmp_path / "kv")
    assert [f.text for f in both] == [f.text for f in resident]
    assert both[0].execution is not None
    assert both[0].execution.applied_passes == ["llama.sdpa-attention", "llama.layer-offload", "llama.kv-offload"]
    assert not any((tmp_path / "kv").iterdir())  # the engine's KV files went with it


def test_streaming_composes_with_chunked_mlp_and_batch_invariant_mode(synthetic: Path) -> None:
    modes = {"dense_projection_chunk_rows": 8, "batch_invariant": True}
    resident = _answers(synthetic, PROMPTS, **modes)
    streamed = _answers(synthetic, PROMPTS, layer_streaming="on", **modes)
    assert [f.text for f in streamed] == [f.text for f in resident]
    assert streamed[0].execution is not None
    assert streamed[0].execution.applied_passes == ["llama.sdpa-attention", "llama.chunked-mlp", "llama.layer-offload"]


def test_an_untied_head_streams_in_bfloat16_within_tolerance(tmp_path: Path) -> None:
    shape = LlamaShape(layers=3, hidden=64, intermediate=256, tie_embeddings=False)
    path = write_llama_checkpoint(tmp_path / "untied", shape, "bfloat16", seed=3)
    _assert_bfloat16_tolerance(path, steps=6)


def _assert_bfloat16_tolerance(path: Path, steps: int) -> None:
    """Teacher-forced on the resident model's greedy tokens: every step's logits within the tolerance."""
    streamed = load_streamed(path, torch.bfloat16, "cpu")
    resident = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 282]])
    with torch.inference_mode():
        for _ in range(steps):
            expected = resident(input_ids=ids).logits[0, -1].float()
            got = streamed(input_ids=ids).logits[0, -1].float()
            tolerance = BFLOAT16_TOLERANCE * float(expected.abs().max())
            assert float((got - expected).abs().max()) <= tolerance
            top = expected.topk(2).values
            if float(top[0] - top[1]) > 2 * tolerance:
                assert int(got.argmax()) == int(expected.argmax())
            ids = torch.cat([ids, expected.argmax().view(1, 1)], dim=1)
    streamer = streamer_of(streamed)
    assert streamer is not None and streamer.fills >= steps * 2  # read again at every forward


@pytest.mark.slow
def test_smollm2_streamed_equals_resident_in_float32(default_model_dir: Path, tmp_path: Path) -> None:
    questions = ["What is the capital of France?", "Name three colours.", "Count to five.",
                 "Summarize: " + " ".join(f"item {i} is red;" for i in range(30))]  # fmt: skip
    worker, models = {"max_tokens_per_step": 64}, {"models_dir": default_model_dir.parent, "chat": True}
    resident = _answers(DEFAULT_CHAT_MODEL, questions, worker, layer_streaming="off", **models)
    streamed = _answers(DEFAULT_CHAT_MODEL, questions, worker, layer_streaming="on", **models)
    assert streamed[-1].usage.prompt_tokens > 64  # prefilled over several steps
    assert [f.text for f in streamed] == [f.text for f in resident]
    assert streamed[0].execution is not None and streamed[0].execution.applied_passes == [
        "llama.sdpa-attention",
        "llama.layer-offload",
    ]
    both = _answers(
        DEFAULT_CHAT_MODEL, questions, worker, layer_streaming="on", kv_offload="on",
        kv_offload_dir=tmp_path / "kv", **models,
    )  # fmt: skip
    assert [f.text for f in both] == [f.text for f in resident]
    assert both[0].execution is not None and "llama.kv-offload" in both[0].execution.applied_passes


@pytest.mark.slow
def test_smollm2_bfloat16_within_tolerance(default_model_dir: Path) -> None:
    _assert_bfloat16_tolerance(default_model_dir, steps=8)
