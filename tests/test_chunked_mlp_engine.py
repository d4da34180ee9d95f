"""The llama.chunked-mlp pass through the real engine on SmolLM2: same greedy tokens, reported."""

from __future__ import annotations

from typing import Any

import pytest

from ollm.engine.base import Engine, stream
from ollm.engine.loader import load_engine
from ollm.generation import ChatMessage, FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings, load_settings
from tests.conftest import DEFAULT_CHAT_MODEL

pytestmark = pytest.mark.slow

# About 200 prompt tokens: prefilled in one forward, so the MLPs see 200 rows at once.
QUESTION = "Summarize this list: " + " ".join(f"item {i} is {('red', 'blue', 'green')[i % 3]};" for i in range(40))


def _engine(runtime: RuntimeSettings, **fields: Any) -> Engine:
    settings = load_settings(
        {
            "runtime": {"models_dir": runtime.models_dir, "dtype": "float32"} | fields,
            "worker": {"max_tokens_per_step": 1024, "max_batch": 4},
        }
    )
    return load_engine(plan_model(DEFAULT_CHAT_MODEL, settings.runtime), settings)


def _answer(runtime: RuntimeSettings, **fields: Any) -> FinalEvent:
    engine = _engine(runtime, **fields)
    try:
        request = GenerationRequest(
            model=DEFAULT_CHAT_MODEL,
            messages=[ChatMessage(role="user", content=QUESTION)],
            sampling=SamplingParams(temperature=0.0, max_new_tokens=24),
        )
        final = list(stream(engine, request))[-1]
    finally:
        engine.close()
    assert isinstance(final, FinalEvent), final
    return final


def test_chunked_mlp_gives_the_generic_greedy_tokens(default_runtime: RuntimeSettings, default_model_dir: Any) -> None:
    generic = _answer(default_runtime)
    chunked = _answer(default_runtime, dense_projection_chunk_rows=16)
    assert generic.usage.prompt_tokens > 150
    assert chunked.text == generic.text
    assert chunked.execution is not None and generic.execution is not None
    assert chunked.execution.applied_passes == ["llama.sdpa-attention", "llama.chunked-mlp"]
    assert generic.execution.applied_passes == ["llama.sdpa-attention"]


def test_chunked_mlp_composes_with_batch_invariant_mode(
    default_runtime: RuntimeSettings, default_model_dir: Any
) -> None:
    invariant = _answer(default_runtime, batch_invariant=True)
    both = _answer(default_runtime, batch_invariant=True, dense_projection_chunk_rows=3)
    assert both.text == invariant.text
    assert both.execution is not None and both.execution.batch_invariant
    assert both.execution.applied_passes == ["llama.sdpa-attention", "llama.chunked-mlp"]
