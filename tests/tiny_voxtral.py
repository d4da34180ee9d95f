"""A tiny random Voxtral checkpoint and synthesized audio, built with the libraries' own APIs.

The tokenizer is a tekken file written from mistral-common's own types (TokenInfo,
SpecialTokenInfo, AudioConfig: byte-level vocabulary, the special tokens Voxtral uses, Voxtral's
audio settings: 16 kHz, 12.5 audio tokens a second, 30-second windows) and loaded back by
mistral-common before it is saved; the model is VoxtralForConditionalGeneration from a
VoxtralConfig with a one-layer audio encoder and a two-layer decoder. The real loading code reads
these files as it reads a pulled Voxtral.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import soundfile
import torch
from mistral_common.tokens.tokenizers.audio import AudioConfig, AudioSpectrogramConfig
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.tekken import SpecialTokenInfo, Tekkenizer, TokenInfo
from transformers import VoxtralConfig, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor
from transformers.tokenization_mistral_common import MistralCommonBackend

AUDIO_TOKEN = 24  # VoxtralProcessor's fixed id for [AUDIO]
BEGIN_AUDIO = 25
TRANSCRIBE = 34
NUM_SPECIAL = 100
VOCAB = 256 + NUM_SPECIAL
# One [AUDIO] token per 80 ms of a 30-second window: 375 per window.
TOKENS_PER_WINDOW = 375
# Tekken's pre-tokenizer pattern (the one Mistral's tekken.json files ship).
_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _tekken(path: Path) -> Path:
    named = {
        AUDIO_TOKEN: SpecialTokens.audio,
        BEGIN_AUDIO: SpecialTokens.begin_audio,
        TRANSCRIBE: SpecialTokens.transcribe,
    }
    specials = list(Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
    start = len(specials)
    specials += [
        SpecialTokenInfo(
            rank=rank, token_str=named[rank].value if rank in named else f"<SPECIAL_{rank}>", is_control=True
        )
        for rank in range(start, TRANSCRIBE + 1)
    ]
    vocab = [TokenInfo(rank=i, token_bytes=base64.b64encode(bytes([i])).decode(), token_str=None) for i in range(256)]
    audio = AudioConfig(
        sampling_rate=16_000,
        frame_rate=12.5,
        encoding_config=AudioSpectrogramConfig(num_mel_bins=128, hop_length=160, window_size=400),
        chunk_length_s=30.0,
    )
    audio_json = dataclasses.asdict(audio)
    audio_json["audio_encoding_config"] = audio_json.pop("encoding_config")
    data = {
        "vocab": vocab,
        "special_tokens": specials,
        "config": {
            "pattern": _PATTERN,
            "num_vocab_tokens": 256,
            "default_vocab_size": VOCAB,
            "default_num_special_tokens": NUM_SPECIAL,
            "version": "v7",
        },
        "version": 1,
        "type": "Tekken",
        "audio": audio_json,
    }
    file = path / "tekken.json"
    file.write_text(json.dumps(data, default=str))
    Tekkenizer.from_file(file)  # mistral-common reads it back, or the test fails here
    return file


def build_voxtral(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = MistralCommonBackend(tokenizer_path=str(_tekken(path)))
    VoxtralProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer).save_pretrained(
        path
    )
    config = VoxtralConfig(
        # Voxtral's window: 3000 mel frames -> 1500 encoder positions -> 375 projected tokens (4 positions
        # each, so intermediate_size is 4 x hidden_size as in the real encoder).
        audio_config={
            "hidden_size": 16,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 2048,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 11,
        },
        audio_token_id=AUDIO_TOKEN,
    )
    torch.manual_seed(0)
    VoxtralForConditionalGeneration(config).save_pretrained(path)
    return path


def tone(seconds: float, hz: float = 440.0, rate: int = 16_000, fmt: str = "WAV") -> bytes:
    """A sine tone as an audio file (WAV, FLAC, MP3...), written by libsndfile."""
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32), rate, format=fmt)
    return buffer.getvalue()


def tone_b64(seconds: float, **kw: object) -> str:
    return base64.b64encode(tone(seconds, **kw)).decode()  # type: ignore[arg-type]
