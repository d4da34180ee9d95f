"""Audio in requests: decoding (wav, flac, mp3, ogg... through libsndfile), limits and windows.

One decoder for every place audio arrives: the server decodes a transcription's upload to cut it
into windows, the worker decodes a chat message's audio for the model. Both answer bad or
oversized audio with a 400 that says what was wrong, never a decoder's traceback.

soundfile's wheels bundle libsndfile 1.2 with its MP3 (mpg123/LAME), FLAC and Ogg codecs, so no
ffmpeg needs installing; soxr resamples to the 16 kHz the audio encoders read.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

from ollm.errors import InvalidRequestError
from ollm.settings import AudioSettings

SAMPLE_RATE = 16_000  # what Whisper-style audio encoders (Voxtral's) read
_MAX_DECODED_RATE = 2 * 48_000  # samples a second ollm decodes at most: 48 kHz stereo


@dataclass(frozen=True)
class Clip:
    """Mono float32 samples at SAMPLE_RATE."""

    samples: np.ndarray

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def windows(self, seconds: float) -> list[tuple[float, Clip]]:
        """Consecutive pieces of at most ``seconds`` each, with their start times (the last may be shorter)."""
        step = max(int(seconds * SAMPLE_RATE), 1)
        starts = range(0, max(len(self.samples), 1), step)
        return [(start / SAMPLE_RATE, Clip(self.samples[start : start + step])) for start in starts]

    def flac(self) -> bytes:
        """Lossless and about half a WAV's size: how a window travels to the worker inside a job."""
        buffer = io.BytesIO()
        soundfile.write(buffer, self.samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()


def b64decode(data: str, param: str) -> bytes:
    """Base64 (or a data: URI) -> bytes, strictly: the lenient default turns garbage into bytes."""
    data = data.strip()
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise InvalidRequestError(
            f"the audio is not valid base64 ({exc}); send base64-encoded audio bytes", param=param
        ) from exc


def decode_audio(raw: bytes, limits: AudioSettings, param: str) -> Clip:
    """Encoded audio -> a Clip; 400 for bytes no codec reads, or audio over the configured limits."""
    if len(raw) > limits.max_bytes:
        raise InvalidRequestError(
            f"the audio is {len(raw)} bytes, more than the limit of {limits.max_bytes} (audio.max_bytes); "
            "send a shorter or more compressed file",
            param=param,
        )
    try:
        with soundfile.SoundFile(io.BytesIO(raw)) as file:
            rate, frames, channels = file.samplerate, file.frames, file.channels
            # The header's claims are checked before anything is decoded: a forged length must not
            # make the decoder allocate gigabytes.
            seconds = frames / rate if rate else 0.0
            if seconds > limits.max_seconds:
                raise InvalidRequestError(
                    f"the audio lasts {seconds:.1f} s, longer than the limit of {limits.max_seconds:g} s "
                    "(audio.max_seconds); send a shorter file",
                    param=param,
                )
            if frames * channels > limits.max_seconds * _MAX_DECODED_RATE:
                raise InvalidRequestError(
                    f"the audio decodes to {frames} frames of {channels} channels, more than ollm reads "
                    f"({limits.max_seconds:g} s of 48 kHz stereo); send mono or stereo audio",
                    param=param,
                )
            samples = file.read(dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as exc:
        # error_string: libsndfile's own words, without the repr of our in-memory file.
        reason = getattr(exc, "error_string", None) or str(exc)
        raise InvalidRequestError(
            f"the audio ({len(raw)} bytes) could not be decoded ({reason}); send wav, flac, mp3 or ogg",
            param=param,
        ) from exc
    if len(samples) == 0:
        raise InvalidRequestError("the audio holds no samples", param=param)
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return Clip(np.ascontiguousarray(mono, dtype=np.float32))
