"""Every seed family batched continuously on the engine core, on tiny random checkpoints.

For gemma3 (sliding-window layers), gpt-oss (sliding window, attention sinks, MoE) and qwen3-next
(linear-attention state, MoE), requests of different prompt lengths join a running batch and leave
it mid-stream, and each one's greedy tokens equal the tokens it gets alone (float32). A
sliding-window layer holds its window whatever the context; a failing step ends the requests it
touched and nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.families import FAMILIES, WINDOW, build_tiny
from ollm.engine.base import stream
from ollm.engine.batching import BatchingEngine
from ollm.engine.kv_offload import OffloadedLayer
from ollm.engine.layer_streaming import streamer_of
from ollm.engine.loader import load_engine
from ollm.engine.quantize import QuantizedLinear
from ollm.generation import ErrorEvent, Event, FinalEvent, GenerationRequest, SamplingParams, TokenEvent
from ollm.memory import FULL_ATTENTION_SLACK
from ollm.plan import plan_model
from ollm.settings import Settings, load_settings

pytestmark = pytest.mark.timeout(300)

# Prompt lengths around and past the window; the longest is chunked (max_tokens_per_step below).
PROMPT_WORDS = (2, 9, 30, 5, 17, 60)
NEW_TOKENS = (10, 4, 8, 12, 6, 9)
STEP_TOKENS = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-families")
    return {family: build_tiny(family, root / family, default_model_dir) for family in FAMILIES}


def _settings(tmp_path_factory: pytest.TempPathFactory, **worker: int) -> Settings:
    return load_settings(
        {
            "runtime": {"models_dir": tmp_path_factory.mktemp("models-dir"), "dtype": "float32"},
            "worker": {"max_batch": 8, "max_tokens_per_step": STEP_TOKENS} | worker,
        }
    )


@pytest.fixture(scope="module")
def engines(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Any]]:
    settings = _settings(tmp_path_factory)
    loaded: dict[str, BatchingEngine] = {}

    def get(family: str) -> BatchingEngine:
        if family not in loaded:
            engine = load_engine(plan_model(str(tiny[family]), settings.runtime), settings)
            assert isinstance(engine, BatchingEngine)
            loaded[family] = engine
        return loaded[family]

    yield get
    for engine in loaded.values():
        engine.close()


def _request(words: int, new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        model="tiny",
        prompt=" ".join(f"w{i % 7}" for i in range(words)),
        sampling=SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True),
    )


def _answer(events: list[Event]) -> tuple[str, int]:
    """The text and the number of tokens generated (a token whose text is held back streams no event)."""
    final = events[-1]
    assert isinstance(final, FinalEvent), final
    return final.text, final.usage.completion_tokens


class _Collector:
    """One request's events, delivered by the engine thread."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.first_token = threading.Event()
        self.ended = threading.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, TokenEvent):
            self.first_token.set()
        if isinstance(event, FinalEvent | ErrorEvent):
            self.ended.set()


def _concurrently(engine: BatchingEngine, requests: list[GenerationRequest]) -> tuple[list[list[Event]], int]:
    """The first two requests start a batch; the rest join once it decodes. Returns the largest batch seen."""
    collectors = [_Collector() for _ in requests]
    largest = 0
    engine.submit(requests[0], collectors[0])
    engine.submit(requests[1], collectors[1])
    assert collectors[0].first_token.wait(60)
    for request, collector in zip(requests[2:], collectors[2:], strict=True):
        engine.submit(request, collector)
    while not all(c.ended.wait(0.005) for c in collectors):
        largest = max(largest, engine.batch_size())
    return [c.events for c in collectors], largest


REQUESTS = [_request(w, n) for w, n in zip(PROMPT_WORDS, NEW_TOKENS, strict=True)]


@pytest.fixture(scope="module")
def alone(engines: Callable[[str], Any]) -> Callable[[str], list[tuple[str, int]]]:
    """Each request's answer run alone on the family's resident engine (computed once a family)."""
    answers: dict[str, list[tuple[str, int]]] = {}

    def get(family: str) -> list[tuple[str, int]]:
        if family not in answers:
            answers[family] = [_answer(list(stream(engines(family), r))) for r in REQUESTS]
        return answers[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_tokens_equal_each_request_alone(
    family: str, engines: Callable[[str], Any], alone: Callable[[str], list[tuple[str, int]]]
) -> None:
    engine = engines(family)
    assert engine.info.fallback_reason is None or "one at a time" not in engine.info.fallback_reason
    answers = alone(family)
    together, largest = _concurrently(engine, [r.model_copy(update={"id": f"{r.id}-b"}) for r in REQUESTS])
    assert [_answer(events) for events in together] == answers
    assert [count for _, count in answers] == list(NEW_TOKENS)
    assert largest >= 3, "the requests never decoded together"
    assert engine.active() == 0


MOE = {"gpt-oss", "qwen3-next"}


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_layers_offloaded_experts_and_kv_give_the_resident_tokens_alone_and_batched(
    family: str,
    tiny: dict[str, Path],
    alone: Callable[[str], list[tuple[str, int]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    settings = _settings(tmp_path_factory)
    settings.runtime.layer_streaming = "on"
    settings.runtime.kv_offload = "on"
    settings.runtime.kv_offload_dir = tmp_path_factory.mktemp("kv")
    plan = plan_model(str(tiny[family]), settings.runtime)
    experts = [f"{family}.expert-offload"] if family in MOE else []
    assert plan.backend == "optimized-native" and plan.memory.strategy == "streamed-layers-kv-offload"
    offloads = [f"{family}.layer-offload", *experts, f"{family}.kv-offload"]
    assert [p for p in plan.applied_passes if p.endswith("-offload")] == offloads
    engine = load_engine(plan, settings)
    assert isinstance(engine, BatchingEngine)
    try:
        streamer = streamer_of(engine.runner.model)
        assert streamer is not None
        assert bool(streamer.experts) == (family in MOE)
        # Full-attention layers' KV lives in the store; sliding and linear-attention layers stay in memory.
        cache = engine.caches.new_cache()
        offloaded = [type(layer) is OffloadedLayer for layer in cache.layers]
        engine.caches.release(cache)
        assert offloaded == [kind == "full_attention" for kind in engine.runner.model.config.layer_types]
        assert [_answer(list(stream(engine, r))) for r in REQUESTS[:2]] == alone(family)[:2]
        together, largest = _concurrently(engine, REQUESTS)
        assert [_answer(events) for events in together] == alone(family)
        assert largest >= 3
    finally:
        engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_int4_layers_stream_packed_and_give_the_resident_int4_tokens(
    family: str, tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    answers = {}
    for streaming in ("off", "on"):
        settings = _settings(tmp_path_factory)
        settings.runtime.quantization, settings.runtime.layer_streaming = "int4", streaming
        plan = plan_model(str(tiny[family]), settings.runtime)
        assert plan.quantization == "int4" and plan.memory.layer_streaming == (streaming == "on")
        engine = load_engine(plan, settings)
        assert isinstance(engine, BatchingEngine)
        try:
            if streaming == "on":
                layer = engine.runner.model.get_decoder().layers[0]
                assert any(isinstance(m, QuantizedLinear) for m in layer.modules())
            together, _ = _concurrently(engine, REQUESTS)
            answers[streaming] = [_answer(events) for events in together]
        finally:
            engine.close()
    assert answers["on"] == answers["off"]


@pytest.mark.parametrize("family", sorted(MOE))
def test_a_decoded_token_reads_the_routers_top_k_experts_of_each_layer(
    family: str, tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory)
    settings.runtime.layer_streaming = "on"
    roomy = plan_model(str(tiny[family]), settings.runtime).memory
    assert roomy.expected_peak_bytes and roomy.expert_cache_bytes is not None
    # A budget with no room for the expert cache beside the rest: every step reads its experts.
    settings.runtime.memory_budget = roomy.expected_peak_bytes - roomy.expert_cache_bytes + 2**20
    plan = plan_model(str(tiny[family]), settings.runtime)
    memory = plan.memory
    assert memory.expert_offload and memory.experts_bytes and memory.expert_bytes_per_token
    assert memory.expert_cache_bytes == 0
    # tiny: 4 experts, top-2 in each of 4 layers, so a token reads half of the experts' bytes.
    assert memory.expert_bytes_per_token * 2 == memory.experts_bytes
    engine = load_engine(plan, settings)
    try:
        streamer = streamer_of(engine.runner.model)  # type: ignore[attr-defined]
        assert streamer is not None

        def read(new_tokens: int) -> int:
            before = sum(offload.bytes_read for offload in streamer.experts)
            list(stream(engine, _request(9, new_tokens)))
            return sum(offload.bytes_read for offload in streamer.experts) - before

        # The same prefill, then 5 more decode steps: each reads the top-k experts of every layer.
        assert read(6) - read(1) == 5 * memory.expert_bytes_per_token
    finally:
        engine.close()


def test_a_sliding_window_layer_holds_its_window_at_any_context(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory, max_tokens_per_step=1024)
    engine = load_engine(plan_model(str(tiny["gemma3"]), settings.runtime), settings)
    assert isinstance(engine, BatchingEngine)
    try:
        final = list(stream(engine, _request(8 * WINDOW, 4)))[-1]
        assert isinstance(final, FinalEvent)
        context = final.usage.prompt_tokens + final.usage.completion_tokens - 1  # the last token is never cached
        assert final.usage.prompt_tokens >= 8 * WINDOW
        # gemma3 tiny: 3 sliding layers and 1 full layer, 2 KV heads of 16 float32 values, keys and values.
        per_column = 2 * 16 * 4 * 2
        # The full layer holds the prompt and its spare columns, which the 3 decode steps fill.
        assert context - final.usage.prompt_tokens < FULL_ATTENTION_SLACK
        assert engine.caches.peak_bytes == {
            "sliding_attention": 3 * (WINDOW - 1) * per_column,
            "full_attention": 1 * (final.usage.prompt_tokens + FULL_ATTENTION_SLACK) * per_column,
        }
        # Admission counts what a row really holds: its full layers' columns and their spare ones.
        assert engine.caches.columns_held(8 * WINDOW) == 8 * WINDOW + FULL_ATTENTION_SLACK
    finally:
        engine.close()


def _raising_once(call: Callable[..., Any], at: int) -> Callable[..., Any]:
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise RuntimeError("injected failure")
        return call(*args, **kwargs)

    return wrapped


# (object, method, which call raises): each step of the loop in turn.
STEPS = [
    ("runner", "prefill", 2),
    ("runner", "prefill_chunk", 1),
    ("engine", "_choose", 3),
    ("caches", "join", 1),
    ("runner", "decode", 3),
    ("caches", "keep", 1),
]


@pytest.mark.parametrize(("owner", "method", "at"), STEPS, ids=[f"{o}.{m}" for o, m, _ in STEPS])
def test_a_failing_step_ends_every_request_it_touched_and_the_rest_go_on(
    owner: str, method: str, at: int, engines: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engines("gemma3")
    target = engine if owner == "engine" else getattr(engine, owner)
    monkeypatch.setattr(target, method, _raising_once(getattr(target, method), at))
    requests = [_request(w, n) for w, n in zip(PROMPT_WORDS, NEW_TOKENS, strict=True)]
    together, _ = _concurrently(engine, requests)
    ends = [events[-1] for events in together]
    assert all(isinstance(end, FinalEvent | ErrorEvent) for end in ends)
    assert [sum(isinstance(e, FinalEvent | ErrorEvent) for e in events) for events in together] == [1] * len(ends)
    failed = [end for end in ends if isinstance(end, ErrorEvent)]
    assert failed and all("injected failure" in end.message for end in failed)
    assert len(failed) < len(ends), "a failing step ended requests it did not touch"
    # Memory released, nothing held: the engine is empty and serves the next request.
    assert engine.active() == 0 and engine.batch_size() == 0
    assert isinstance(list(stream(engine, _request(5, 3)))[-1], FinalEvent)


def test_the_kv_budget_counts_the_padding_of_mixed_prompt_lengths(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # One long request (120 prompt tokens + 24 new = 144 columns) beside short ones (4 + 6): the
    # batch is left-padded to the long row, so each row costs 144 slots and 4 rows fill 600.
    settings = _settings(tmp_path_factory, max_tokens_per_step=1024, kv_cache_max_tokens=600)
    engine = load_engine(plan_model(str(tiny["gemma3"]), settings.runtime), settings)
    assert isinstance(engine, BatchingEngine)
    try:
        long = _Collector()
        engine.submit(_request(60, 24), long)
        assert long.first_token.wait(60)
        shorts = [_Collector() for _ in range(7)]
        for collector in shorts:
            engine.submit(_request(2, 6), collector)
        largest_beside_long = 0
        while not long.ended.wait(0.002):
            largest_beside_long = max(largest_beside_long, engine.batch_size())
        assert all(c.ended.wait(60) for c in shorts)
        assert all(isinstance(c.events[-1], FinalEvent) for c in [long, *shorts])
        # Counting prompt + max tokens per row (10 for a short one) would have let all 8 in.
        assert 2 <= largest_beside_long <= 4
    finally:
        engine.close()


@pytest.mark.parametrize("family", sorted(MOE))
def test_with_room_in_the_budget_used_experts_are_cached_and_not_read_again(
    family: str, tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory)
    settings.runtime.layer_streaming = "on"
    plan = plan_model(str(tiny[family]), settings.runtime)  # auto: gigabytes of room beside a tiny model
    assert plan.memory.expert_cache_bytes == plan.memory.experts_bytes
    assert plan.memory.reason is not None and "experts cached as they are used" in plan.memory.reason
    engine = load_engine(plan, settings)
    try:
        streamer = streamer_of(engine.runner.model)  # type: ignore[attr-defined]
        assert streamer is not None

        def run() -> tuple[str, int]:
            before = sum(offload.bytes_read for offload in streamer.experts)
            final = list(stream(engine, _request(9, 6)))[-1]
            assert isinstance(final, FinalEvent)
            return final.text, sum(offload.bytes_read for offload in streamer.experts) - before

        first, read = run()
        again, read_again = run()
        assert read > 0 and read_again == 0  # the same prompt picks the same experts: all cached
        assert again == first and streamer.expert_store.hits > 0
        assert streamer.expert_store.cached_bytes <= plan.memory.expert_cache_bytes
    finally:
        engine.close()


def test_the_plan_counts_kv_by_layer_kind_as_the_cache_manager_holds_it(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory)
    tokens = 8 * WINDOW
    per_column = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16 float32 values
    gemma = plan_model(str(tiny["gemma3"]), settings.runtime, context_tokens=tokens).memory
    # 3 sliding layers count their window only; the 1 full layer the whole context.
    assert gemma.kv_cache_bytes_by_layer_kind == {
        "full_attention": (tokens + FULL_ATTENTION_SLACK) * per_column,
        "sliding_attention": 3 * WINDOW * per_column,
    }
    assert gemma.kv_cache_bytes == sum(gemma.kv_cache_bytes_by_layer_kind.values())
    qwen = plan_model(str(tiny["qwen3-next"]), settings.runtime, context_tokens=tokens).memory
    assert qwen.kv_cache_bytes_by_layer_kind is not None
    assert qwen.kv_cache_bytes_by_layer_kind["full_attention"] == (tokens + FULL_ATTENTION_SLACK) * per_column
    # A linear-attention layer's state is what the cache manager holds for one sequence, at any length.
    engine = load_engine(plan_model(str(tiny["qwen3-next"]), settings.runtime), settings)
    assert isinstance(engine, BatchingEngine)
    try:
        list(stream(engine, _request(30, 4)))
        assert engine.caches.peak_bytes["linear_attention"] == qwen.kv_cache_bytes_by_layer_kind["linear_attention"]
    finally:
        engine.close()


def test_auto_max_batch_counts_each_sequences_linear_attention_state(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory)
    settings.runtime.memory_budget = 2**30
    roomy = plan_model(str(tiny["qwen3-next"]), settings.runtime)
    memory = roomy.memory
    assert roomy.max_batch == 128 and memory.weights_in_memory_bytes and memory.activations_bytes
    by_kind = memory.kv_cache_bytes_by_layer_kind
    assert by_kind is not None and by_kind["linear_attention"] > 0
    # One sequence at one prefill step: its full layer's 256 columns and the linear layers' whole state.
    per_sequence = 256 * 2 * 2 * 16 * 4 + by_kind["linear_attention"]
    settings.runtime.memory_budget = memory.weights_in_memory_bytes + memory.activations_bytes + 5 * per_sequence + 1
    tight = plan_model(str(tiny["qwen3-next"]), settings.runtime)
    assert tight.max_batch == 5, tight.max_batch_reason


def test_the_expected_peak_counts_every_sequences_linear_attention_state(
    tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = _settings(tmp_path_factory)
    settings.runtime.memory_budget = 2**30
    reference = str(tiny["qwen3-next"])
    alone = plan_model(reference, settings.runtime, max_batch=1).memory
    four = plan_model(reference, settings.runtime, max_batch=4).memory
    assert alone.kv_cache_bytes_by_layer_kind is not None and alone.expected_peak_bytes is not None
    state = alone.kv_cache_bytes_by_layer_kind["linear_attention"]
    assert (alone.batch_state_bytes, four.batch_state_bytes) == (None, 3 * state)
    parts = [four.weights_in_memory_bytes, four.kv_cache_bytes, four.activations_bytes]
    assert four.expected_peak_bytes == sum(part or 0 for part in parts) + 3 * state
    # A batch whose states alone overrun the budget is said to, with what to change.
    settings.runtime.memory_budget = alone.expected_peak_bytes + state
    crowded = plan_model(reference, settings.runtime, max_batch=8)
    assert crowded.memory.fits is False
    assert crowded.fallback_reason is not None and "lower worker.max_batch" in crowded.fallback_reason
    # gemma3 and llama hold nothing per sequence beyond their tokens.
    assert plan_model(str(tiny["gemma3"]), settings.runtime, max_batch=8).memory.batch_state_bytes is None
