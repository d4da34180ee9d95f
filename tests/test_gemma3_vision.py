"""A tiny random Gemma 3 image-text checkpoint (tests/tiny_gemma3_vision.py), planned and loaded by ollm's
real loading code: a chat request with an image and one without, image requests batched with text
requests, and the layers streamed with the vision tower read when it runs."""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from ollm.engine.base import stream
from ollm.engine.batching import BatchingEngine
from ollm.engine.loader import load_engine
from ollm.generation import ChatMessage, ContentPart, FinalEvent, GenerationRequest, SamplingParams, TokenEvent
from ollm.plan import plan_model
from ollm.settings import load_settings
from tests.tiny_gemma3_vision import MM_TOKENS_PER_IMAGE, build
from tests.together import submit_together

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return build(tmp_path_factory.mktemp("tiny-gemma3") / "model", default_model_dir)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _request(message: ChatMessage, max_new_tokens: int = 6) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return GenerationRequest(model="tiny-gemma3", messages=[message], sampling=sampling)


def test_gemma3_image_text_loads_and_answers(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint
    settings = load_settings({"runtime": {"models_dir": tmp_path / "models", "dtype": "float32"}})
    plan = plan_model(str(path), settings.runtime)
    assert plan.kind == "image-text"

    # The input ids of every forward pass, to see what the prefill read.
    forwards: list[list[int]] = []
    forward = Gemma3ForConditionalGeneration.forward

    @functools.wraps(forward)  # keeps the signature: generate routes keyword arguments by inspecting it
    def spy(model: Gemma3ForConditionalGeneration, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        forwards.append(ids[0].tolist() if ids is not None else [])
        return forward(model, *args, **kwargs)

    monkeypatch.setattr(Gemma3ForConditionalGeneration, "forward", spy)
    image_token = Gemma3Config.from_pretrained(path).image_token_index
    assert image_token is not None

    engine = load_engine(plan, settings)
    try:
        parts = [ContentPart(type="image", image=_png((220, 20, 20))), ContentPart(type="text", text="what is it?")]
        events = list(stream(engine, _request(ChatMessage(role="user", content=parts))))
        final = events[-1]
        assert isinstance(final, FinalEvent), final
        assert all(isinstance(e, TokenEvent) for e in events[:-1]), events
        assert final.finish_reason == "length" and final.usage.completion_tokens == 6
        prefill = forwards[0]
        # The <start_of_image> placeholder became boi, mm_tokens_per_image soft tokens and eoi, all counted.
        assert prefill.count(image_token) == MM_TOKENS_PER_IMAGE
        assert final.usage.prompt_tokens == len(prefill)

        forwards.clear()
        events = list(stream(engine, _request(ChatMessage(role="user", content="hello world"))))
        final = events[-1]
        assert isinstance(final, FinalEvent), final
        assert final.finish_reason == "length" and final.usage.completion_tokens == 6
        assert image_token not in forwards[0] and final.usage.prompt_tokens == len(forwards[0])
    finally:
        engine.close()


def test_streamed_layers_and_a_vision_tower_read_when_it_runs_give_the_resident_tokens(
    checkpoint: Path, tmp_path: Path
) -> None:
    path = checkpoint
    settings = load_settings({"runtime": {"models_dir": tmp_path / "models", "dtype": "float32"}})
    image = ContentPart(type="image", image=_png((20, 20, 220)))
    requests = [
        _request(ChatMessage(role="user", content=[image, ContentPart(type="text", text="and this?")])),
        _request(ChatMessage(role="user", content="hello world")),
    ]

    def answers(layer_streaming: str) -> tuple[list[str], Any]:
        settings.runtime.layer_streaming = layer_streaming  # type: ignore[assignment]
        plan = plan_model(str(path), settings.runtime)
        engine = load_engine(plan, settings)
        try:
            finals = [list(stream(engine, r))[-1] for r in requests]
            assert all(isinstance(f, FinalEvent) for f in finals), finals
            return [f.text for f in finals if isinstance(f, FinalEvent)], (plan, engine.runner.model)  # type: ignore[attr-defined]
        finally:
            engine.close()

    resident, _ = answers("off")
    streamed, (plan, model) = answers("on")
    assert plan.applied_passes == ["gemma3.sdpa-attention", "gemma3.layer-offload", "gemma3.vision-encoder-offload"]
    assert plan.memory.encoder_bytes and plan.memory.encoder_bytes < plan.memory.weights_bytes
    assert streamed == resident
    (tower,) = model.encoders
    assert tower.reads == 1  # the image request's prefill only
    assert all(p.numel() == 0 for p in tower.module.parameters())  # dropped after it ran


def test_image_requests_decode_in_one_batch_with_text_requests(checkpoint: Path, tmp_path: Path) -> None:
    path = checkpoint
    settings = load_settings({"runtime": {"models_dir": tmp_path / "models", "dtype": "float32"}})
    engine = load_engine(plan_model(str(path), settings.runtime), settings)
    assert isinstance(engine, BatchingEngine)
    try:
        red, blue = (ContentPart(type="image", image=_png(color)) for color in ((220, 20, 20), (20, 20, 220)))
        requests = [
            _request(ChatMessage(role="user", content=[red, ContentPart(type="text", text="what is it?")]), 12),
            _request(ChatMessage(role="user", content="a text request beside them"), 10),
            _request(ChatMessage(role="user", content=[blue, ContentPart(type="text", text="and this?")]), 12),
            _request(ChatMessage(role="user", content="hello world"), 8),
        ]
        alone = [list(stream(engine, r))[-1] for r in requests]
        events, largest = submit_together(engine, requests)
        assert [_text(e[-1]) for e in events] == [_text(a) for a in alone]
        assert largest >= 3, "the image and text requests never decoded together"
    finally:
        engine.close()


def _text(event: Any) -> str:
    assert isinstance(event, FinalEvent), event
    return event.text
