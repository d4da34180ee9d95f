"""Embeddings from the real default embedding model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ollm.engine.loader import load_embedder
from ollm.errors import ContextLengthError, InvalidRequestError
from ollm.generation import EmbeddingRequest
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings, load_settings
from tests.conftest import DEFAULT_EMBEDDING_MODEL


@pytest.fixture(scope="module")
def embedder(default_runtime: RuntimeSettings, embedding_model_dir: Path):  # type: ignore[no-untyped-def]
    settings = load_settings({"runtime": {"models_dir": default_runtime.models_dir}})
    return load_embedder(plan_model(DEFAULT_EMBEDDING_MODEL, settings.runtime), settings)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_similar_sentences_score_higher_than_unrelated(embedder) -> None:  # type: ignore[no-untyped-def]
    result = embedder.embed(
        EmbeddingRequest(
            model=DEFAULT_EMBEDDING_MODEL,
            inputs=["A cat sits on the mat.", "A kitten is sitting on a rug.", "The stock market fell today."],
        )
    )
    cat, kitten, stocks = result.embeddings
    assert len(cat) == 384
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in result.embeddings)
    assert cosine(cat, kitten) > cosine(cat, stocks) + 0.2
    assert result.prompt_tokens > 10


def test_batching_does_not_change_a_vector(embedder) -> None:  # type: ignore[no-untyped-def]
    alone = embedder.embed(EmbeddingRequest(model="m", inputs=["hello there"])).embeddings[0]
    batched = embedder.embed(EmbeddingRequest(model="m", inputs=["a much longer sentence " * 5, "hello there"]))
    assert cosine(alone, batched.embeddings[1]) > 0.999


def test_dimensions_truncate_and_renormalize(embedder) -> None:  # type: ignore[no-untyped-def]
    full = embedder.embed(EmbeddingRequest(model="m", inputs=["hello"])).embeddings[0]
    short = embedder.embed(EmbeddingRequest(model="m", inputs=["hello"], dimensions=64)).embeddings[0]
    assert len(short) == 64
    assert math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-3)
    assert cosine(full[:64], short) > 0.99 * math.sqrt(sum(x * x for x in full[:64]))
    with pytest.raises(InvalidRequestError):
        embedder.embed(EmbeddingRequest(model="m", inputs=["hello"], dimensions=4096))


def test_token_inputs_and_truncation(embedder) -> None:  # type: ignore[no-untyped-def]
    by_ids = embedder.embed(EmbeddingRequest(model="m", inputs=[[101, 7592, 102]])).embeddings[0]
    by_text = embedder.embed(EmbeddingRequest(model="m", inputs=["hello"])).embeddings[0]
    assert cosine(by_ids, by_text) > 0.999
    long = "word " * 1000
    assert embedder.embed(EmbeddingRequest(model="m", inputs=[long])).prompt_tokens == 512
    with pytest.raises(ContextLengthError):
        embedder.embed(EmbeddingRequest(model="m", inputs=[long], truncate=False))
