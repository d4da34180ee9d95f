"""One request at a time through ``model.generate``: encoder-decoder and image-text models.

Their inputs (encoder states, pixel values) do not splice into a shared decoder cache, so they
get no continuous batching. They still share everything per-sequence with the batching engine:
a logits processor hands each step to the Sequence (sampling, penalties, grammar, stop, events)
and forces the token it chose, so the two paths can never disagree on sampling semantics.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from ollm.engine.base import EventSink, prepared
from ollm.engine.sequence import Sequence
from ollm.engine.threads import IdleEndingThread
from ollm.generation import ExecutionInfo, GenerationRequest

log = logging.getLogger(__name__)

# Builds the Sequence and the keyword arguments for model.generate (input ids, pixel values...).
InputsBuilder = Callable[[GenerationRequest, EventSink, float], tuple[Sequence, dict[str, Any]]]

# generate() fills every option we leave unset from the checkpoint's generation_config.json, and
# checkpoints ship decoding policy there (bart-large-cnn: num_beams=4, min_length=56,
# no_repeat_ngram_size=3; others: repetition_penalty). Those processors would run before the
# Sequence and silently reshape the distribution the request's own sampling draws from, and beam
# search would hand it several rows per step. So every policy knob is pinned to its neutral value
# here; format constraints (forced BOS/EOS, suppressed or banned tokens) are left to the checkpoint.
_NEUTRAL_DECODING: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    # Takes precedence over a checkpoint's min_length (which also setting min_length=0 would warn about).
    "min_new_tokens": 0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
}


class _HandToSequence(LogitsProcessor):
    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._seq.done:
            # Cancelled between two steps: the stopping criterion ends generate after this step, and
            # the Sequence must not record (or stream) a token it never chose.
            return scores
        token = self._seq.choose(scores[0].float())
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced  # type: ignore[return-value]


class _SequenceDone(StoppingCriteria):
    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.tensor([self._seq.done], device=input_ids.device)  # type: ignore[return-value]


class SingleEngine:
    def __init__(
        self, model: Any, info: ExecutionInfo, build: InputsBuilder, pad_token_id: int | None, load_ms: float = 0.0
    ) -> None:
        self.info = info
        self._model = model
        self._build = build
        self._pad = pad_token_id
        self._load_ms = load_ms
        self._inbox: queue.Queue[tuple[GenerationRequest, EventSink, float]] = queue.Queue()
        self._current: Sequence | None = None
        self._cancelled: set[str] = set()
        # The loop's thread ends while the engine is idle, so it keeps no OpenMP pool (threads.py).
        self._loop = IdleEndingThread(self._step, self._inbox.empty, name="ollm-engine-single")

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self._inbox.put((request, sink, time.perf_counter()))
        self._loop.wake()

    def cancel(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        if self._current is not None and self._current.id == request_id:
            self._current.cancel()

    def ready(self) -> bool:
        return True

    def active(self) -> int:
        return self._inbox.qsize() + (1 if self._current else 0)

    def batch_size(self) -> int:
        return 1 if self._current else 0

    def close(self) -> None:
        self._loop.close()

    def _step(self) -> bool:
        """Serve the next request whole; False when there is none."""
        try:
            request, sink, submitted = self._inbox.get_nowait()
        except queue.Empty:
            return False
        try:
            self._serve(request, sink, submitted)
        finally:
            self._current = None
            self._cancelled.discard(request.id)
        return True

    def _serve(self, request: GenerationRequest, sink: EventSink, submitted: float) -> None:
        built = prepared(partial(self._build, request, sink, submitted), sink)
        if built is None:
            return
        seq, inputs = built
        # Published before the cancelled-set check: cancel() adds to the set and then looks at
        # _current, so whichever order the two threads run in, one of them sees the other.
        self._current = seq
        if request.id in self._cancelled:
            seq.cancel()
        elif not self._generate(seq, inputs):
            return
        load_ms, self._load_ms = self._load_ms, 0.0
        sink(seq.final_event(self.info, load_ms))

    def _generate(self, seq: Sequence, inputs: dict[str, Any]) -> bool:
        """Run the sequence to its end; False when it failed (its error event is already sent)."""
        seq.admitted_at = time.perf_counter()
        # The Sequence decides when to stop (EOS, stop strings, grammar, its own length budget);
        # generate's own EOS check uses the same ids, so it never ends a sequence early.
        config = GenerationConfig(max_new_tokens=seq.max_new_tokens, pad_token_id=self._pad, **_NEUTRAL_DECODING)
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
        if seq.first_token_at is not None:
            seq.prefill_done_at = seq.first_token_at
        if not seq.done:
            # generate stopped on a limit of its own (a checkpoint's stop_strings, max_length). Finish
            # through the Sequence so text held back for a partial character or stop string is sent.
            seq.finish("length")
        return True
