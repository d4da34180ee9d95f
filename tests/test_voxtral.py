"""Voxtral end to end on a tiny random checkpoint built here, with audio synthesized here.

Plans, loads through ollm's real loading code (mistral-common's tokenizer, the Whisper feature
extractor, VoxtralForConditionalGeneration), and generates from chat audio and from
transcription requests; bad audio and audio sent to a model without the capability are 400s.
Float32, so greedy tokens are equal on every CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.voxtral.modeling_voxtral import VoxtralModel

from ollm.engine.base import Engine, stream
from ollm.engine.batching import BatchingEngine
from ollm.engine.loader import load_engine
from ollm.generation import (
    ChatMessage,
    ContentPart,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    Transcription,
)
from ollm.plan import plan_model
from ollm.settings import Settings, load_settings
from tests.spies import spy
from tests.test_tiny_models import _llama
from tests.tiny_voxtral import AUDIO_TOKEN, TOKENS_PER_WINDOW, TRANSCRIBE, build_voxtral, tone_b64
from tests.together import submit_together

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("voxtral")
    return {"voxtral": build_voxtral(root / "voxtral"), "llama": _llama(root / "llama")}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        {
            "runtime": {"models_dir": tmp_path_factory.mktemp("models-dir"), "dtype": "float32"},
            "audio": {"max_seconds": 90},
        }
    )


@pytest.fixture(scope="module")
def voxtral(models: dict[str, Path], settings: Settings) -> Iterator[Engine]:
    engine = load_engine(plan_model(str(models["voxtral"]), settings.runtime), settings)
    yield engine
    engine.close()


class _EncoderSpy:
    """What reaches the audio encoder, and the input ids of each forward."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.features: list[torch.Tensor] = []
        self.forward_ids: list[list[int]] = []
        spy(
            monkeypatch,
            VoxtralModel,
            "get_audio_features",
            lambda _model, features, *a, **k: self.features.append(features),
        )
        spy(
            monkeypatch,
            VoxtralModel,
            "forward",
            lambda _model, **k: self.forward_ids.append(k["input_ids"][0].tolist()),
        )


def _audio_message(audio: str, text: str = "what is it?") -> ChatMessage:
    return ChatMessage(
        role="user", content=[ContentPart(type="audio", audio=audio), ContentPart(type="text", text=text)]
    )


def _request(model: str, max_new: int = 4, **kw: Any) -> GenerationRequest:
    return GenerationRequest(model=model, sampling=SamplingParams(max_new_tokens=max_new, temperature=0.0), **kw)


def _final(events: list[Event]) -> FinalEvent:
    assert all(isinstance(e, TokenEvent) for e in events[:-1]), events
    assert isinstance(events[-1], FinalEvent), events[-1]
    return events[-1]


def _error(events: list[Event]) -> ErrorEvent:
    assert len(events) == 1 and isinstance(events[0], ErrorEvent), events
    return events[0]


def test_plan_is_audio_text_and_optimized(models: dict[str, Path], settings: Settings) -> None:
    plan = plan_model(str(models["voxtral"]), settings.runtime)
    assert (plan.kind, plan.model_type, plan.specialization_provider) == ("audio-text", "voxtral", "voxtral")
    assert plan.backend == "optimized-native" and plan.specialization_state == "applied"
    # The weights fit: nothing streams, so the encoder stays loaded.
    assert plan.applied_passes == [] and plan.memory.strategy == "resident"
    assert plan.context_length == 2048


def test_chat_audio_reaches_the_encoder_once(voxtral: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _EncoderSpy(monkeypatch)
    final = _final(list(stream(voxtral, _request("v", messages=[_audio_message(tone_b64(1.0))]))))
    assert final.finish_reason == "length" and final.usage.completion_tokens == 4
    assert len(spy.features) == 1, "the audio encoder did not run exactly once"
    # One 30-second window of 128 mel bins x 3000 frames, in the model's dtype.
    assert tuple(spy.features[0].shape) == (1, 128, 3000)
    prefill, *decode = spy.forward_ids
    assert prefill.count(AUDIO_TOKEN) == TOKENS_PER_WINDOW
    assert final.usage.prompt_tokens == len(prefill)
    assert all(len(ids) == 1 for ids in decode)  # decode steps read the cache, not the audio
    # Greedy in float32: the same audio gives the same tokens; other audio changes what the model reads.
    again = _final(list(stream(voxtral, _request("v", messages=[_audio_message(tone_b64(1.0))]))))
    assert again.text == final.text
    other = spy.features.copy()
    _final(list(stream(voxtral, _request("v", messages=[_audio_message(tone_b64(1.0, hz=1500.0))]))))
    assert not torch.equal(spy.features[-1], other[0])


def test_audio_longer_than_a_window_fills_one_window_each(voxtral: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _EncoderSpy(monkeypatch)
    final = _final(list(stream(voxtral, _request("v", max_new=1, messages=[_audio_message(tone_b64(31.0))]))))
    assert tuple(spy.features[0].shape) == (2, 128, 3000)
    assert spy.forward_ids[0].count(AUDIO_TOKEN) == 2 * TOKENS_PER_WINDOW
    assert final.usage.prompt_tokens == len(spy.forward_ids[0])


def test_transcription_uses_the_transcription_format(voxtral: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _EncoderSpy(monkeypatch)
    message = ChatMessage(role="user", content=[ContentPart(type="audio", audio=tone_b64(2.0, fmt="FLAC"))])
    request = _request("v", messages=[message], transcription=Transcription(language="en"))
    final = _final(list(stream(voxtral, request)))
    prefill = spy.forward_ids[0]
    # [BEGIN_AUDIO] [AUDIO]x375 [/INST] lang:en [TRANSCRIBE]: the language as bytes, then the marker.
    assert prefill[-1] == TRANSCRIBE
    assert bytes(i - 100 for i in prefill[-8:-1]) == b"lang:en"
    assert prefill.count(AUDIO_TOKEN) == TOKENS_PER_WINDOW
    assert final.usage.prompt_tokens == len(prefill)


def test_mp3_decodes(voxtral: Engine) -> None:
    final = _final(list(stream(voxtral, _request("v", messages=[_audio_message(tone_b64(1.0, fmt="MP3"))]))))
    assert final.usage.prompt_tokens > TOKENS_PER_WINDOW


def test_text_only_chat_and_raw_prompts_run(voxtral: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _EncoderSpy(monkeypatch)
    chat = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hello")]
    assert _final(list(stream(voxtral, _request("v", messages=chat)))).usage.completion_tokens == 4
    assert _final(list(stream(voxtral, _request("v", prompt="hello")))).usage.completion_tokens == 4
    assert not spy.features


@pytest.mark.parametrize(
    ("audio", "expect"),
    [
        ("Z2FyYmFnZSBieXRlcw==", "could not be decoded"),
        ("%%% not base64 %%%", "not valid base64"),
        (tone_b64(91.0, rate=8000), "longer than the limit of 90 s (audio.max_seconds)"),
    ],
    ids=["garbage-bytes", "not-base64", "too-long"],
)
def test_bad_audio_is_a_400_and_the_engine_survives(voxtral: Engine, audio: str, expect: str) -> None:
    error = _error(list(stream(voxtral, _request("v", messages=[_audio_message(audio)]))))
    assert (error.status, error.code) == (400, "invalid_request")
    assert expect in error.message
    assert _final(list(stream(voxtral, _request("v", prompt="hi", max_new=2)))).usage.completion_tokens == 2


def test_model_without_audio_refuses_it(models: dict[str, Path], settings: Settings) -> None:
    reference = str(models["llama"])
    engine = load_engine(plan_model(reference, settings.runtime), settings)
    try:
        error = _error(list(stream(engine, _request(reference, messages=[_audio_message(tone_b64(0.5))]))))
    finally:
        engine.close()
    assert error.status == 400
    assert f"model {reference} does not accept audio (it has no audio capability)" in error.message


def test_audio_requests_decode_in_one_batch_with_text_requests(voxtral: Engine) -> None:
    assert isinstance(voxtral, BatchingEngine)
    requests = [
        _request("v", max_new=12, messages=[_audio_message(tone_b64(1.0))]),
        _request("v", max_new=10, prompt="hello there, how are you"),
        _request("v", max_new=12, messages=[_audio_message(tone_b64(2.0, hz=1500.0), "and this?")]),
        _request("v", max_new=8, prompt="one two three"),
    ]
    alone = [_final(list(stream(voxtral, r))).text for r in requests]
    events, largest = submit_together(voxtral, requests)
    assert [_final(e).text for e in events] == alone
    assert largest >= 3, "the audio and text requests never decoded together"


def test_streamed_decoder_and_audio_encoder_read_when_it_runs_give_the_resident_tokens(
    voxtral: Engine, models: dict[str, Path], settings: Settings
) -> None:
    requests = [
        _request("v", max_new=8, messages=[_audio_message(tone_b64(1.0))]),
        _request("v", max_new=8, prompt="hello there, how are you"),
    ]
    resident = [_final(list(stream(voxtral, r))).text for r in requests]
    streamed_settings = settings.model_copy(deep=True)
    streamed_settings.runtime.layer_streaming = "on"
    plan = plan_model(str(models["voxtral"]), streamed_settings.runtime)
    assert plan.backend == "optimized-native" and plan.memory.layer_streaming
    assert plan.applied_passes == ["voxtral.layer-offload", "voxtral.audio-encoder-offload"]
    assert plan.memory.encoder_bytes and plan.memory.resident_weights_bytes
    engine = load_engine(plan, streamed_settings)
    try:
        encoders = engine.runner.model.encoders  # type: ignore[attr-defined]
        assert [type(e.module).__name__ for e in encoders] == ["VoxtralEncoder"]
        assert [_final(list(stream(engine, r))).text for r in requests] == resident
        assert encoders[0].reads == 1  # the text request never read the audio encoder
        assert encoders[0].module.conv1.weight.numel() == 0  # dropped after it ran
    finally:
        engine.close()
