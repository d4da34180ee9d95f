"""A tiny random Gemma 3 image-text checkpoint (tests/tiny_gemma3_vision.py), planned and loaded by ollm's
real loading code, answering a chat request with an image and one without."""

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
from ollm.engine.loader import load_engine
from ollm.generation import ChatMessage, ContentPart, FinalEvent, GenerationRequest, SamplingParams, TokenEvent
from ollm.plan import plan_model
from ollm.settings import load_settings
from tests.tiny_gemma3_vision import MM_TOKENS_PER_IMAGE, build

pytestmark = pytest.mark.timeout(120)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _request(message: ChatMessage) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    return GenerationRequest(model="tiny-gemma3", messages=[message], sampling=sampling)


def test_gemma3_image_text_loads_and_answers(
    tmp_path: Path, default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build(tmp_path / "tiny-gemma3", default_model_dir)
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
    tmp_path: Path, default_model_dir: Path
) -> None:
    path = build(tmp_path / "tiny-gemma3", default_model_dir)
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
