"""The echo engine: no model, it streams the last user message (or the prompt) back word by word.

It implements the Engine protocol exactly (many requests in flight, events from its own thread,
``max_new_tokens``, stop strings and ``cancel``), so the serving pipeline can be tested and its
overhead benchmarked without loading weights.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import zlib
from dataclasses import dataclass, field

from ollm.engine.base import EventSink, refuse_audio
from ollm.errors import OllmError
from ollm.generation import (
    ErrorEvent,
    ExecutionInfo,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    Usage,
)
from ollm.plan import RuntimePlan
from ollm.reasoning import OutputSplitter, Split, TaggedParser

log = logging.getLogger(__name__)

# Seconds between decode steps; lets tests stream slowly enough to kill or cancel mid-stream.
TOKEN_DELAY_ENV = "OLLM_ECHO_TOKEN_DELAY"
# Seconds "loading" the echo model takes: a window in which tests can kill a loading worker.
LOAD_DELAY_ENV = "OLLM_ECHO_LOAD_DELAY"
_WORD = re.compile(r"\s*\S+")
_VOCAB = 49152


def echo_tokens(text: str) -> list[str]:
    """Words with their leading whitespace, so that joining the tokens gives back the text."""
    return _WORD.findall(text)


def _token_id(token: str) -> int:
    return zlib.crc32(token.encode("utf-8", "surrogatepass")) % _VOCAB


@dataclass
class _Sequence:
    request: GenerationRequest
    sink: EventSink
    tokens: list[str]
    prompt_tokens: int
    submitted: float
    emitted: list[str] = field(default_factory=list)
    cancelled: bool = False
    stop_sequence: str | None = None
    # Echoed text is read like a model's: tool-call markup in it becomes calls (no thinking).
    splitter: OutputSplitter = field(init=False)

    def __post_init__(self) -> None:
        self.splitter = OutputSplitter(TaggedParser(thinking=False, tools=bool(self.request.tools)))

    def emit(self, piece: str) -> None:
        self.emitted.append(piece)
        self.send(self.splitter.feed(piece), [_token_id(piece)])

    def send(self, split: Split, token_ids: list[int]) -> None:
        if split:
            self.sink(TokenEvent(text=split.content, tool_calls=split.calls, token_ids=token_ids))


class EchoEngine:
    def __init__(self, plan: RuntimePlan | None = None, token_delay: float | None = None) -> None:
        if token_delay is None:
            token_delay = float(os.environ.get(TOKEN_DELAY_ENV, "0") or 0)
        self.token_delay = token_delay
        load_delay = float(os.environ.get(LOAD_DELAY_ENV, "0") or 0)
        if load_delay:
            time.sleep(load_delay)
        self.info = ExecutionInfo(
            model=plan.reference if plan else "echo",
            backend="echo",
            specialization_state="not-applicable",
            device="cpu",
            dtype=plan.dtype if plan else "float32",
        )
        self._sequences: dict[str, _Sequence] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="echo-engine", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        try:
            refuse_audio(self.info.model, request)
        except OllmError as exc:
            sink(ErrorEvent.from_error(exc))
            return
        if request.messages is not None:
            users = [m for m in request.messages if m.role == "user"]
            text = users[-1].text() if users else ""
            prompt_tokens = sum(len(echo_tokens(m.text())) for m in request.messages)
        else:
            text = request.prompt or ""
            prompt_tokens = len(echo_tokens(text))
        sequence = _Sequence(request, sink, echo_tokens(text), prompt_tokens, time.perf_counter())
        with self._wake:
            if self._closed:
                sink(ErrorEvent(message="the echo engine is closed", status=503, code="engine_closed"))
                return
            self._sequences[request.id] = sequence
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        with self._wake:
            sequence = self._sequences.get(request_id)
            if sequence is not None:
                sequence.cancelled = True
                self._wake.notify()

    def ready(self) -> bool:
        return True

    def active(self) -> int:
        with self._wake:
            return len(self._sequences)

    def batch_size(self) -> int:
        # Every sequence advances one word per step, like one decode batch.
        return self.active()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._sequences and not self._closed:
                    self._wake.wait()
                if self._closed:
                    leftovers = list(self._sequences.values())
                    self._sequences.clear()
                    break
                batch = list(self._sequences.values())
            # One token for every sequence per step, like a batched decode step.
            for sequence in batch:
                try:
                    finish = self._step(sequence)
                except Exception as exc:  # One request's failure must not end the engine for all.
                    log.exception("echo step failed")
                    with self._wake:
                        self._sequences.pop(sequence.request.id, None)
                    sequence.sink(ErrorEvent(message=f"generation failed: {exc}"))
                    continue
                if finish is not None:
                    with self._wake:
                        self._sequences.pop(sequence.request.id, None)
                    sequence.sink(self._final(sequence, finish))
            # Even a zero sleep lets other threads run, as a model's forward pass does (torch
            # releases the GIL): a pure-Python step loop would hold it for whole switch intervals
            # and starve the threads that publish its events.
            time.sleep(self.token_delay)
        for sequence in leftovers:
            sequence.sink(self._final(sequence, "cancelled"))

    def _step(self, sequence: _Sequence) -> FinishReason | None:
        if sequence.cancelled:
            return "cancelled"
        sampling = sequence.request.sampling
        if len(sequence.emitted) >= len(sequence.tokens):
            return "stop"
        if len(sequence.emitted) >= sampling.max_new_tokens:
            return "length"
        token = sequence.tokens[len(sequence.emitted)]
        before = "".join(sequence.emitted)
        after = before + token
        for stop in sampling.stop:
            cut = after.find(stop)
            if cut != -1:
                # The stop string itself is never part of the output.
                if cut > len(before):
                    sequence.emit(after[len(before) : cut])
                sequence.stop_sequence = stop
                return "stop"
        sequence.emit(token)
        return None

    def _final(self, sequence: _Sequence, finish: FinishReason) -> FinalEvent:
        sequence.send(sequence.splitter.finish(), [])
        total_ms = (time.perf_counter() - sequence.submitted) * 1000
        return FinalEvent(
            finish_reason=finish,
            text=sequence.splitter.content,
            tool_calls=sequence.splitter.total.calls,
            usage=Usage(prompt_tokens=sequence.prompt_tokens, completion_tokens=len(sequence.emitted)),
            timings=Timings(generation_ms=total_ms, total_ms=total_ms),
            execution=self.info,
            stop_sequence=sequence.stop_sequence,
        )
