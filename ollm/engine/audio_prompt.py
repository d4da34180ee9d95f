"""A request with audio -> the model's inputs: prompt ids (audio placeholders expanded) and mel features.

Kept apart from the engine that runs them: what a request needs before its prefill is computed
here, per request, from its own audio; the engine only hands ``input_features`` to the prefill
forward (where the audio encoder turns them into the embeddings that replace the placeholders).
The batching engine hands ``input_features`` to the sequence's own prefill forward
(``Sequence.model_inputs``); its decode steps run in the batch with every other request's.

Voxtral's tokenizer is mistral-common's: its own chat format ([INST] ... [/INST], [BEGIN_AUDIO]
and one [AUDIO] token per 80 ms) and its own transcription format (``lang:xx[TRANSCRIBE]``), both
reached through the transformers processor's public methods.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch

from ollm.audio import SAMPLE_RATE, b64decode, decode_audio
from ollm.engine.prompting import template_messages
from ollm.errors import InvalidRequestError
from ollm.generation import GenerationRequest
from ollm.settings import AudioSettings


@dataclass
class AudioInputs:
    prompt_ids: list[int]
    # [windows, mel bins, frames]: one row per 30-second window of all the request's audio; None without audio.
    input_features: torch.Tensor | None


def _clip_b64(data: str, limits: AudioSettings, param: str) -> str:
    """Decoded (validated, 16 kHz mono) and written back as FLAC: the one form the tokenizer is given."""
    return base64.b64encode(decode_audio(b64decode(data, param), limits, param).flac()).decode()


def _conversation(request: GenerationRequest, limits: AudioSettings) -> list[dict[str, Any]]:
    """OpenAI-shaped messages for mistral-common; tool use spelled out the ollm.tools way."""
    messages = template_messages(request, template="")
    assert request.messages is not None
    # template_messages keeps one entry per message, in order (tool results become user turns).
    for index, (out, message) in enumerate(zip(messages[-len(request.messages) :], request.messages, strict=True)):
        audios = message.audios()
        if not audios:
            continue
        param = f"messages.{index}.content"
        parts: list[dict[str, Any]] = [
            {"type": "input_audio", "input_audio": {"data": _clip_b64(data, limits, param), "format": "flac"}}
            for data in audios
        ]
        if message.text():
            parts.append({"type": "text", "text": message.text()})
        out["content"] = parts
    return messages


def audio_inputs(processor: Any, request: GenerationRequest, limits: AudioSettings, model_id: str) -> AudioInputs:
    """Raises InvalidRequestError for audio that does not decode or that the tokenizer refuses."""
    try:
        if request.transcription is not None:
            assert request.messages is not None
            param = "file"
            (data,) = [audio for m in request.messages for audio in m.audios()]
            clip = decode_audio(b64decode(data, param), limits, param)
            inputs = processor.apply_transcription_request(
                audio=clip.samples,
                format="flac",
                sampling_rate=SAMPLE_RATE,
                language=request.transcription.language,
                model_id=model_id,
            )
        elif request.messages is not None:
            inputs = processor.apply_chat_template(_conversation(request, limits), tokenize=True, return_dict=True)
        else:
            # A raw prompt (completions): text only, in the tokenizer's own special-token handling.
            return AudioInputs(list(processor.tokenizer(request.prompt)["input_ids"]), None)
    except InvalidRequestError:
        raise
    except (ValueError, AssertionError) as exc:  # mistral-common's validation of the conversation
        raise InvalidRequestError(f"the model's tokenizer refused these messages: {exc}", param="messages") from exc
    ids = inputs["input_ids"][0].tolist()
    features = inputs.get("input_features")
    return AudioInputs(ids, features)
