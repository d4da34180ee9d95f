"""llama.kv-offload: the KV cache in per-layer files, one layer in memory; same tokens as the resident cache."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from ollm.engine.base import Engine, stream
from ollm.engine.kv_offload import KVOffloadStore, OffloadedLayer, release, remove_leftovers
from ollm.engine.loader import load_engine
from ollm.generation import ChatMessage, ErrorEvent, Event, FinalEvent, GenerationRequest, SamplingParams, TokenEvent
from ollm.memory import FULL_ATTENTION_SLACK
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings, load_settings
from tests.conftest import DEFAULT_CHAT_MODEL
from tests.test_memory import LLAMA, TENSORS, runtime

# bfloat16: teacher-forced logits with the KV cache offloaded stay within this of the resident
# cache's (absolute; two bfloat16 steps at the magnitude of SmolLM2's logits, about 32). Both paths
# hand attention the same bytes in the same layout, so the difference measured here is 0.
BFLOAT16_LOGIT_TOLERANCE = 0.5


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _forwards(model: Any, cache: DynamicCache, ids: torch.Tensor, forced: list[torch.Tensor] | None = None) -> Any:
    """Prefill in two chunks, then 8 greedy (or forced) decode steps, then drop a row and crop: logits of each step."""
    logits, chosen = [], []
    with torch.inference_mode():
        model(input_ids=ids[:, :40], cache=cache, use_cache=True)
        out = model(input_ids=ids[:, 40:], cache=cache, use_cache=True)
        for step in range(8):
            logits.append(out.logits[:, -1].float())
            token = out.logits[:, -1].argmax(-1) if forced is None else forced[step]
            chosen.append(token)
            out = model(input_ids=token[:, None], cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([1]))
        cache.crop(-3)
        out = model(input_ids=chosen[-1][1:, None], cache=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.cat(logits), chosen


def test_offloaded_cache_gives_the_resident_logits_and_keeps_one_file_per_layer(tmp_path: Path) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(1))
    resident, _ = _forwards(model, DynamicCache(config=model.config), ids)
    store = KVOffloadStore(tmp_path / "kv", "cpu")
    cache = store.new_cache(model.config)
    assert all(isinstance(layer, OffloadedLayer) for layer in cache.layers)
    offloaded, _ = _forwards(model, cache, ids)
    assert torch.equal(offloaded, resident)
    assert store.directory is not None
    files = sorted(p.name for p in store.directory.glob("*.kv"))
    assert files == ["cache0-layer000.kv", "cache0-layer001.kv", "cache0-layer002.kv"]
    # 1 row left, 70 + 8 - 3 + 1 tokens, keys and values of 2 KV heads x 16 dims in float32, per layer.
    assert cache.get_seq_length() == 76
    assert store.disk_bytes() == 3 * 76 * 2 * 1 * 2 * 16 * 4
    release(cache)
    assert list(store.directory.glob("*.kv")) == []
    store.close()
    assert not store.directory.exists()


def test_bfloat16_logits_within_the_documented_tolerance(tmp_path: Path, default_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 49000, (2, 120), generator=torch.Generator().manual_seed(2))
    resident, tokens = _forwards(model, DynamicCache(config=model.config), ids)
    store = KVOffloadStore(tmp_path / "kv", "cpu")
    try:
        # Teacher-forced with the resident run's tokens, so a near-tie cannot make the runs diverge.
        offloaded, _ = _forwards(model, store.new_cache(model.config), ids, forced=tokens)
    finally:
        store.close()
    assert (offloaded - resident).abs().max().item() <= BFLOAT16_LOGIT_TOLERANCE
    # Wherever the resident top-2 margin exceeds the tolerance, the greedy token is the same.
    top2 = resident.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BFLOAT16_LOGIT_TOLERANCE
    assert clear.any()
    assert torch.equal(offloaded.argmax(-1)[clear], resident.argmax(-1)[clear])


def test_store_removes_directories_of_dead_engines_not_live_ones(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    live = KVOffloadStore(root, "cpu")
    dead = root / "engine-99999999-leftover"
    dead.mkdir()
    (dead / "lock").write_text("")
    (dead / "cache0-layer000.kv").write_bytes(b"\0" * 64)
    assert live.directory is not None
    old = time.time() - 3600
    for directory in (dead, live.directory):
        os.utime(directory, (old, old))
    fresh = KVOffloadStore(root, "cpu")  # cleans on start
    assert not dead.exists()
    assert live.directory.exists()  # its lock is held
    assert remove_leftovers(root) == []
    for store in (live, fresh):
        store.close()
    assert list(root.iterdir()) == []


# -- through the engine, on SmolLM2 -----------------------------------------------------------

PROMPTS = [f"Write a short story about a {thing}." for thing in ("cat", "car", "ship")]
# About 200 tokens: with 32 prompt tokens per step, prefilled in 7 chunks while others decode.
LONG = "Summarize this list: " + " ".join(f"item {i} is {('red', 'blue', 'green')[i % 3]};" for i in range(40))


def _engine(runtime: RuntimeSettings, tmp_path: Path, kv_offload: str) -> Engine:
    settings = load_settings(
        {
            "runtime": {"models_dir": runtime.models_dir, "dtype": "float32", "kv_offload": kv_offload,
                        "kv_offload_dir": tmp_path / "kv"},
            "worker": {"max_tokens_per_step": 32, "max_batch": 6},
        }
    )  # fmt: skip
    return load_engine(plan_model(DEFAULT_CHAT_MODEL, settings.runtime), settings)


def ask(question: str, max_new_tokens: int, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        id=request_id,
        model=DEFAULT_CHAT_MODEL,
        messages=[ChatMessage(role="user", content=question)],
        sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
    )


class _Collector:
    def __init__(self, engine: Engine, on_token: Any = None) -> None:
        self.engine = engine
        self.events: dict[str, list[Event]] = {}
        self.done: dict[str, threading.Event] = {}
        self.on_token = on_token

    def submit(self, request: GenerationRequest) -> str:
        self.events[request.id] = []
        self.done[request.id] = threading.Event()

        def sink(event: Event) -> None:
            self.events[request.id].append(event)
            if isinstance(event, TokenEvent) and self.on_token is not None:
                self.on_token(request.id, self.tokens_seen(request.id))
            if isinstance(event, FinalEvent | ErrorEvent):
                self.done[request.id].set()

        self.engine.submit(request, sink)
        return request.id

    def tokens_seen(self, request_id: str) -> int:
        return sum(isinstance(e, TokenEvent) for e in self.events[request_id])

    def wait_tokens(self, request_id: str, count: int) -> None:
        deadline = time.monotonic() + 120
        while self.tokens_seen(request_id) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def final(self, request_id: str) -> FinalEvent:
        assert self.done[request_id].wait(180)
        final = self.events[request_id][-1]
        assert isinstance(final, FinalEvent), final
        return final


@pytest.fixture(scope="module")
def resident_answers(default_runtime: RuntimeSettings, default_model_dir: Path, tmp_path_factory: Any) -> Any:
    """Each request alone through the resident cache: what the offloaded runs must reproduce."""
    engine = _engine(default_runtime, tmp_path_factory.mktemp("resident"), "off")
    try:
        answers = {
            name: list(stream(engine, ask(question, tokens, f"alone-{name}")))[-1]
            for name, question, tokens in _REQUESTS
        }
    finally:
        engine.close()
    return answers


# Different lengths, so sequences leave the batch at different steps. The cancelled request's
# reference is its first 12 tokens.
_REQUESTS = [("p0", PROMPTS[0], 8), ("p1", PROMPTS[1], 14), ("p2", PROMPTS[2], 10), ("long", LONG, 8)]
DRAGON = "Write a long story about a dragon."
_REQUESTS += [("cancelled", DRAGON, 12)]


@pytest.mark.slow
def test_offloaded_engine_gives_the_resident_greedy_tokens_with_joins_leaves_chunks_and_cancel(
    default_runtime: RuntimeSettings, resident_answers: dict[str, Event], tmp_path: Path
) -> None:
    engine = _engine(default_runtime, tmp_path, "on")
    store_dirs: list[Path] = []
    files_while_decoding: list[int] = []

    def look(request_id: str, seen: int) -> None:
        # Runs in the engine thread between steps, so the batch's cache is alive.
        if request_id == "p0" and seen == 4:
            store_dirs.extend((tmp_path / "kv").glob("engine-*"))
            files_while_decoding.append(sum(len(list(d.glob("*.kv"))) for d in store_dirs))

    collector = _Collector(engine, look)
    requests = {name: ask(question, tokens, name) for name, question, tokens in _REQUESTS}
    requests["cancelled"] = ask(DRAGON, 200, "cancelled")
    try:
        first = [collector.submit(requests[name]) for name in ("p0", "p1", "cancelled")]
        collector.wait_tokens("p0", 3)
        # Join a batch that is decoding: a short prompt in one prefill, the long one chunk by chunk.
        late = [collector.submit(requests[name]) for name in ("p2", "long")]
        collector.wait_tokens("cancelled", 6)
        engine.cancel("cancelled")
        finals = {name: collector.final(name) for name in first + late}
    finally:
        engine.close()
    assert finals["cancelled"].finish_reason == "cancelled"
    cancelled, expected = finals["cancelled"].text, resident_answers["cancelled"]
    assert isinstance(expected, FinalEvent) and cancelled
    assert expected.text.startswith(cancelled) or cancelled.startswith(expected.text)
    for name in first + late:
        if name != "cancelled":
            assert finals[name].text == resident_answers[name].text, name  # type: ignore[union-attr]
        assert finals[name].execution is not None
        assert finals[name].execution.applied_passes == ["llama.sdpa-attention", "llama.kv-offload"]  # type: ignore[union-attr]
    assert finals["long"].usage.prompt_tokens > 150
    # One file per layer (30) for the running batch while it decodes; the store is gone after close.
    assert len(store_dirs) == 1 and files_while_decoding and files_while_decoding[0] >= 30
    assert not store_dirs[0].exists() and list((tmp_path / "kv").iterdir()) == []


# -- the plan and the setting --------------------------------------------------------------------


@pytest.fixture
def llama_dir(make_model_dir: Any, tmp_path: Path) -> Path:
    # 8 layers in the config (the plan reads the cache's shape there), so one layer is an eighth of the cache.
    path: Path = make_model_dir(tmp_path / "llama", LLAMA | {"num_hidden_layers": 8}, TENSORS)
    return path


KV_PER_TOKEN = 2 * 8 * 2 * 16 * 4  # keys and values x 8 layers x 2 KV heads x 16 dims x float32


def test_plan_offloads_when_the_context_does_not_fit_beside_the_weights(
    llama_dir: Path, tmp_runtime: RuntimeSettings
) -> None:
    roomy = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget="1GiB"), context_tokens=4000)
    assert roomy.applied_passes == ["llama.sdpa-attention"] and roomy.memory.strategy == "resident"
    weights, activations = roomy.memory.weights_bytes, roomy.memory.activations_bytes
    assert weights is not None and activations is not None
    # The context and the spare columns each full layer grows into (slack_layer.py).
    assert roomy.memory.kv_cache_bytes == (4000 + FULL_ATTENTION_SLACK) * KV_PER_TOKEN
    # Room for the weights, a forward and 60% of the context's cache: not enough to keep it resident.
    budget = weights + activations + 4000 * KV_PER_TOKEN * 6 // 10
    tight = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget=budget), context_tokens=4000)
    assert tight.applied_passes == ["llama.sdpa-attention", "llama.kv-offload"]
    memory = tight.memory
    assert (memory.strategy, memory.fits, memory.kv_cache_token_limit) == ("kv-offload", True, None)
    assert memory.kv_cache_bytes == 4000 * KV_PER_TOKEN  # the whole context, on disk, no spare columns
    # The running layer's: read back, handed to attention, and expanded from 2 KV heads to 4 (twice that).
    assert memory.kv_resident_bytes == 4 * 4000 * KV_PER_TOKEN // 8
    assert memory.expected_peak_bytes == weights + activations + memory.kv_resident_bytes
    assert not memory.refuses_load()
    # off: as before KV offload existed, the cache is capped to what the budget leaves.
    capped = plan_model(
        str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget=budget, kv_offload="off"),
        context_tokens=4000,
    )  # fmt: skip
    assert capped.applied_passes == ["llama.sdpa-attention"] and capped.memory.strategy == "resident-capped-kv"


def test_kv_offload_on_forces_it_and_generic_refuses_it_with_a_reason(
    llama_dir: Path, tmp_runtime: RuntimeSettings
) -> None:
    forced = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", kv_offload="on"))
    assert (
        forced.applied_passes == ["llama.sdpa-attention", "llama.kv-offload"] and forced.memory.strategy == "kv-offload"
    )
    generic = plan_model(str(llama_dir), runtime(tmp_runtime, kv_offload="on", use_specialization=False))
    assert generic.applied_passes == []
    assert generic.fallback_reason is not None and "kv_offload=on ignored" in generic.fallback_reason


def test_kv_offload_on_with_weights_over_the_budget_refuses_with_numbers(
    llama_dir: Path, tmp_runtime: RuntimeSettings
) -> None:
    plan = plan_model(str(llama_dir), runtime(tmp_runtime, dtype="float32", memory_budget="100KiB", kv_offload="on"))
    assert plan.memory.refuses_load() and plan.memory.required_passes == ["llama.layer-offload", "llama.kv-offload"]
    assert plan.memory.reason is not None and "exceeds the budget of 100.0 KiB" in plan.memory.reason


@pytest.mark.usefixtures("clean_settings_env")
def test_kv_offload_setting_from_toml_env_and_flag(
    cli: Any, llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().runtime.kv_offload == "auto"
    (tmp_path / "ollm.toml").write_text('[runtime]\nkv_offload = "on"\nkv_offload_dir = "/fast/ssd/kv"\n')
    monkeypatch.setenv("OLLM_CONFIG_FILE", str(tmp_path / "ollm.toml"))
    settings = load_settings()
    assert settings.runtime.kv_offload == "on"
    assert settings.runtime.resolved_kv_offload_dir() == Path("/fast/ssd/kv")
    monkeypatch.setenv("OLLM_RUNTIME__KV_OFFLOAD", "off")
    assert load_settings().runtime.kv_offload == "off"
    off = cli("models", "info", str(llama_dir), "--plan-json")
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout)["applied_passes"] == ["llama.sdpa-attention"]
    on = cli("models", "info", str(llama_dir), "--plan-json", "--kv-offload", "on")
    assert json.loads(on.stdout)["applied_passes"] == ["llama.sdpa-attention", "llama.kv-offload"]
    bad = cli("models", "info", str(llama_dir), "--plan-json", "--kv-offload", "sometimes")
    assert bad.exit_code == 2 and "kv_offload" in bad.stderr


def test_default_kv_offload_dir_sits_beside_the_models(tmp_runtime: RuntimeSettings) -> None:
    assert tmp_runtime.resolved_kv_offload_dir() == tmp_runtime.resolved_models_dir().parent / "kv-offload"
