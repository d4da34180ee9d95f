"""Audio through a live `ollm serve` and `ollm worker`, with the official openai client.

The worker serves a tiny random Voxtral built here (tests/tiny_voxtral.py) and the echo model
(no audio capability). The server cuts audio into 2-second windows (audio.window_seconds), so a
3-second tone is two jobs whose texts are joined. Float32 and temperature 0: the same audio
gives the same text on every request, streamed or not.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator

import openai
import pytest

from tests.integration.harness import Server, Worker, new_namespace
from tests.integration.test_metrics import scrape, total
from tests.tiny_voxtral import TOKENS_PER_WINDOW, build_voxtral, tone, tone_b64
from workers.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WINDOWS = 2  # a 3 s tone in 2 s windows: [0, 2], [2, 3]


class AudioStack:
    def __init__(self, server: Server, model: str) -> None:
        self.server = server
        self.model = model
        self.client = server.openai_client(timeout=300)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[AudioStack]:
    models_dir = tmp_path_factory.mktemp("audio-models")
    model = str(build_voxtral(models_dir / "voxtral-tiny"))
    logs = tmp_path_factory.mktemp("audio-stack")
    ns = new_namespace()
    env = {"OLLM_RUNTIME__MODELS_DIR": str(models_dir), "OLLM_RUNTIME__DTYPE": "float32"}
    worker = Worker(redis_server.url, ns, [model, "echo"], logs / "worker.log", **env)
    server = Server(
        redis_server.url,
        ns,
        logs / "server.log",
        OLLM_AUDIO__WINDOW_SECONDS="2",
        # Random weights rarely say EOS: keep every window's text short.
        OLLM_GENERATION__MAX_NEW_TOKENS="6",
        **env,
    )
    try:
        worker.wait_ready(timeout=300)
        server.wait_ready()
        yield AudioStack(server, model)
    finally:
        server.stop()
        worker.stop()


def _wav(seconds: float = 3.0) -> tuple[str, bytes, str]:
    return ("tone.wav", tone(seconds), "audio/wav")


def test_transcriptions_in_every_format_agree(stack: AudioStack) -> None:
    create = stack.client.audio.transcriptions.create
    verbose = create(model=stack.model, file=_wav(), response_format="verbose_json", language="en")
    # One segment per window, timed by the windows; the text is theirs joined.
    assert [(s.start, s.end) for s in verbose.segments or []] == [(0.0, 2.0), (2.0, 3.0)]
    assert verbose.text == " ".join(s.text for s in verbose.segments or [] if s.text)
    assert verbose.duration == 3.0 and verbose.language == "en"
    assert all(0 < len(s.tokens) <= 6 and s.avg_logprob <= 0 for s in verbose.segments or [])

    as_json = create(model=stack.model, file=_wav(), language="en")
    assert as_json.text == verbose.text
    usage = as_json.usage
    assert usage is not None and usage.type == "tokens"
    # Every window's prompt holds its 375 audio tokens: all three windows reached the model.
    assert usage.input_tokens > WINDOWS * TOKENS_PER_WINDOW
    assert 0 < usage.output_tokens <= WINDOWS * 6

    assert create(model=stack.model, file=_wav(), response_format="text", language="en") == verbose.text
    srt = create(model=stack.model, file=_wav(), response_format="srt", language="en")
    vtt = create(model=stack.model, file=_wav(), response_format="vtt", language="en")
    cues = [s for s in verbose.segments or [] if s.text]
    assert srt.count(" --> ") == len(cues) and "00:00:00,000 --> 00:00:02,000" in srt
    assert vtt.startswith("WEBVTT") and vtt.count(" --> ") == len(cues)


def test_streamed_transcription_sends_deltas_then_done(stack: AudioStack) -> None:
    before = scrape(stack.server)
    expected = stack.client.audio.transcriptions.create(model=stack.model, file=_wav(), language="en").text
    # Each window was a job of the model, counted like every other request's.
    after = scrape(stack.server)
    jobs = {"model": stack.model, "kind": "generate"}
    moved = total(after, "ollm_model_requests_total", **jobs) - total(before, "ollm_model_requests_total", **jobs)
    assert moved == WINDOWS
    events = list(stack.client.audio.transcriptions.create(model=stack.model, file=_wav(), language="en", stream=True))
    *deltas, done = events
    assert all(e.type == "transcript.text.delta" for e in deltas) and deltas
    assert done.type == "transcript.text.done"
    assert done.text == expected
    assert "".join(e.delta for e in deltas).strip() == expected  # type: ignore[union-attr]


def test_translation_runs_as_a_chat_turn(stack: AudioStack) -> None:
    # (The openai package marks audio.translations.create deprecated; the route is posted to as it sends it.)
    with stack.server.client() as http:
        answer = http.post(
            "/v1/audio/translations",
            data={"model": stack.model, "response_format": "verbose_json"},
            files={"file": _wav(1.0)},
            timeout=120,
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["language"] == "en" and body["duration"] == 1.0
    assert [(s["start"], s["end"]) for s in body["segments"]] == [(0.0, 1.0)]


def test_chat_input_audio(stack: AudioStack) -> None:
    audio = {"type": "input_audio", "input_audio": {"data": tone_b64(1.0, fmt="MP3"), "format": "mp3"}}
    messages = [{"role": "user", "content": [audio, {"type": "text", "text": "what is this?"}]}]
    answer = stack.client.chat.completions.create(model=stack.model, messages=messages, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.prompt_tokens > TOKENS_PER_WINDOW
    assert answer.usage.completion_tokens == 3
    chunks = list(
        stack.client.chat.completions.create(
            model=stack.model,
            messages=messages,
            max_tokens=3,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    # The native route takes the same audio.
    with stack.server.client() as http:
        native = http.post(
            "/v1/prompt",
            json={"model": stack.model, "prompt": "what is this?", "audio": [tone_b64(1.0)], "max_new_tokens": 2},
            timeout=120,
        )
    assert native.status_code == 200, native.text
    assert native.json()["usage"]["prompt_tokens"] > TOKENS_PER_WINDOW


def test_audio_errors_are_400s(stack: AudioStack) -> None:
    audio = {"type": "input_audio", "input_audio": {"data": tone_b64(0.5), "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as no_audio:
        stack.client.chat.completions.create(model="echo", messages=[{"role": "user", "content": [audio]}])  # type: ignore[list-item]
    assert "model echo does not accept audio (it has no audio capability)" in str(no_audio.value)
    with pytest.raises(openai.BadRequestError) as no_transcription:
        stack.client.audio.transcriptions.create(model="echo", file=_wav(1.0))
    assert "does not accept audio" in str(no_transcription.value)

    garbage = ("noise.wav", io.BytesIO(b"RIFF not really a wave file").read(), "audio/wav")
    with pytest.raises(openai.BadRequestError) as bad_file:
        stack.client.audio.transcriptions.create(model=stack.model, file=garbage)
    assert re.search(r"could not be decoded .*send wav, flac, mp3 or ogg", str(bad_file.value))
    bad_part = {"type": "input_audio", "input_audio": {"data": "bm90IGF1ZGlv", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as bad_chat:
        stack.client.chat.completions.create(model=stack.model, messages=[{"role": "user", "content": [bad_part]}])  # type: ignore[list-item]
    assert "could not be decoded" in str(bad_chat.value)
    with pytest.raises(openai.BadRequestError, match="cannot stream"):
        stack.client.audio.transcriptions.create(
            model=stack.model,
            file=_wav(1.0),
            response_format="srt",
            stream=True,  # type: ignore[call-overload]
        )


def test_files_over_the_context_and_images_by_file_id(stack: AudioStack) -> None:
    # The tiny Voxtral's tokenizer is byte-level and its context 2048 tokens: a 3000-byte file overflows it.
    big = stack.client.files.create(file=("big.txt", b"a" * 3000, "text/plain"), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as too_long:
        stack.client.responses.create(
            model=stack.model, input=[{"role": "user", "content": [{"type": "input_file", "file_id": big.id}]}]
        )
    assert re.search(r"the prompt is \d{4} tokens; model \S+ has a context of 2048 tokens", str(too_long.value))
    # An image by file_id becomes an image part: this audio model has no vision, and says so.
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    image = stack.client.files.create(file=("dot.png", png, "image/png"), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="does not accept images"):
        stack.client.responses.create(
            model=stack.model, input=[{"role": "user", "content": [{"type": "input_image", "file_id": image.id}]}]
        )
