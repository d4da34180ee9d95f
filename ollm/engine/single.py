"""One request at a time through ``model.generate``: encoder-decoder and image-text models.

Their inputs (encoder states, pixel values) do not splice into a shared decoder cache, so they
get no continuous batching. They still share everything per-sequence with the batching engine:
a logits processor hands each step to the Sequence (sampling, penalties, grammar, stop, events)
and forces the token it chose, so the two paths can never disagree on sampling semantics.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from ollm.engine.base import EventSink
from ollm.engine.sequence import Sequence
from ollm.errors import OllmError
from ollm.generation import ErrorEvent, ExecutionInfo, GenerationRequest

log = logging.getLogger(__name__)

# Builds the Sequence and the keyword arguments for model.generate (input ids, pixel values...).
InputsBuilder = Callable[[GenerationRequest, EventSink, float], tuple[Sequence, dict[str, Any]]]


class _HandToSequence(LogitsProcessor):
    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = self._seq.choose(scores[0].float())
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced  # type: ignore[return-value]


class _SequenceDone(StoppingCriteria):
    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([self._seq.done or self._seq.cancelled], device=input_ids.device)  # type: ignore[return-value]


class SingleEngine:
    def __init__(
        self, model: Any, info: ExecutionInfo, build: InputsBuilder, pad_token_id: int | None, load_ms: float = 0.0
    ) -> None:
        self.info = info
        self._model = model
        self._build = build
        self._pad = pad_token_id
        self._load_ms = load_ms
        self._inbox: queue.Queue[tuple[GenerationRequest, EventSink, float] | None] = queue.Queue()
        self._current: Sequence | None = None
        self._cancelled: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="ollm-engine-single", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self._inbox.put((request, sink, time.perf_counter()))

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        if self._current is not None and self._current.id == request_id:
            self._current.cancel()

    def active(self) -> int:
        return self._inbox.qsize() + (1 if self._current else 0)

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            request, sink, submitted = item
            try:
                seq, inputs = self._build(request, sink, submitted)
            except OllmError as exc:
                sink(ErrorEvent(message=exc.message, status=exc.status, code=exc.code))
                continue
            if request.id in self._cancelled:
                self._cancelled.discard(request.id)
                seq.cancel()
            elif not self._generate(seq, inputs):
                continue
            load_ms, self._load_ms = self._load_ms, 0.0
            sink(seq.final_event(self.info, load_ms))

    def _generate(self, seq: Sequence, inputs: dict[str, Any]) -> bool:
        """Run the sequence to its end; False when it failed (its error event is already sent)."""
        self._current = seq
        seq.admitted_at = time.perf_counter()
        config = GenerationConfig(
            max_new_tokens=seq.max_new_tokens, do_sample=False, pad_token_id=self._pad, eos_token_id=None
        )
        try:
            with torch.inference_mode():
                self._model.generate(
                    **inputs,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([_HandToSequence(seq)]),
                    stopping_criteria=[_SequenceDone(seq)],
                )
        except Exception as exc:  # A failed generate must not take the worker down.
            log.exception("generate failed")
            seq.fail(f"generation failed: {exc}")
            return False
        finally:
            self._current = None
        if seq.first_token_at is not None:
            seq.prefill_done_at = seq.first_token_at
        if not seq.done:
            seq.finish_reason = "length"  # generate hit the model's own length limit
        return True
