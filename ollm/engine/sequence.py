"""One request's life inside an engine: its tokens, its sampler, its text, its events."""

from __future__ import annotations

import time
from collections import deque

import torch
from transformers import PreTrainedTokenizerBase

from ollm.engine.base import EventSink
from ollm.engine.constrained import GrammarMask
from ollm.engine.detokenize import IncrementalDetokenizer, StopMatcher
from ollm.engine.output import end_of_reasoning, harmony_markers, output_parser
from ollm.engine.sampling import Sampler, token_logprob
from ollm.engine.steering import steered_tokens
from ollm.generation import (
    ErrorEvent,
    ExecutionInfo,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from ollm.reasoning import OutputSplitter, Split


class Sequence:
    def __init__(
        self,
        request: GenerationRequest,
        sink: EventSink,
        prompt_ids: list[int],
        max_new_tokens: int,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        device: torch.device,
        eos_ids: set[int],
        grammar: GrammarMask | None,
        submitted_at: float,
    ) -> None:
        self.request = request
        self.sink = sink
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = Sampler(request.sampling, prompt_ids, vocab_size, device)
        self.grammar = grammar
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(request.sampling.stop)
        # Harmony's markers are special tokens, skipped by the detokenizer: the parser gets them by id.
        self._markers = harmony_markers(tokenizer)
        self._splitter = OutputSplitter(output_parser(request, tokenizer, prompt_ids, bool(self._markers)))
        # Tokens chosen for the model rather than sampled: the end of reasoning once its budget is
        # spent, or a test's steered output (ollm.engine.steering).
        self._forced: deque[int] = deque(steered_tokens(request, tokenizer))
        self._reasoning_tokens = 0
        self.submitted_at = submitted_at
        self.admitted_at = submitted_at
        self.first_token_at: float | None = None
        self.prefill_done_at = submitted_at
        # Extra inputs of the prefill forward (an image's pixel values, audio's features): such a
        # sequence prefills alone and whole, then decodes in the batch like any other.
        self.model_inputs: dict[str, torch.Tensor] = {}

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain_greedy(self) -> bool:
        return (
            self.sampler.plain_greedy
            and self.grammar is None
            and not self.request.sampling.logprobs
            and not self._forced
        )

    def choose(self, logits: torch.Tensor) -> int:
        """Pick this sequence's next token from its row of logits."""
        if self._forced:
            forced = self._forced.popleft()
            logits.fill_(float("-inf"))
            logits[forced] = 0.0
        token = self.sampler.choose(logits, self.grammar)
        self.accept(token, logits if self.request.sampling.logprobs else None)
        return token

    def accept(self, token: int, logits: torch.Tensor | None = None) -> None:
        """Record the next token, stream its text, and decide whether the sequence has ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.generated.append(token)
        self.sampler.observe(token)
        if self.grammar is not None:
            self.grammar.accept(token)
        if token in self._eos_ids and not self.request.sampling.ignore_eos:
            self.finish("stop")
            return
        split = self._splitter.feed(self._stops.feed(self._detok.add(token)))
        if token in self._markers:
            split.add(self._splitter.feed(self._markers[token], special=True))
        self._count_reasoning()
        logprobs = []
        if logits is not None:
            logprobs = [token_logprob(logits, token, self.request.sampling.top_logprobs, self._decode_one)]
        if split or logprobs:
            self._emit(split, [token], logprobs)
        if self._stops.stopped or (self.grammar is not None and self.grammar.finished):
            self.finish("stop")
        elif len(self.generated) >= self.max_new_tokens:
            self.finish("length")

    def _emit(self, split: Split, token_ids: list[int], logprobs: list[TokenLogprob]) -> None:
        self.sink(
            TokenEvent(
                text=split.content,
                reasoning=split.reasoning,
                tool_calls=split.calls,
                token_ids=token_ids,
                logprobs=logprobs,
            )
        )

    def _count_reasoning(self) -> None:
        """Past its reasoning budget, the model is made to close its reasoning and answer."""
        budget = self.request.reasoning_budget
        if budget is None or not self._splitter.parser.reasoning_open or self._forced:
            return
        self._reasoning_tokens += 1
        if self._reasoning_tokens >= budget:
            closing = end_of_reasoning(bool(self._markers))
            self._forced.extend(self._tokenizer.encode(closing, add_special_tokens=False))

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"

    def fail(self, message: str) -> None:
        self.finish_reason = self.finish_reason or "stop"
        self.sink(ErrorEvent(message=message))

    def final_event(self, info: ExecutionInfo, load_ms: float = 0.0) -> FinalEvent:
        assert self.finish_reason is not None
        now = time.perf_counter()
        return FinalEvent(
            finish_reason=self.finish_reason,
            text=self._splitter.content,
            reasoning=self._splitter.total.reasoning,
            tool_calls=self._splitter.total.calls,
            usage=Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.generated)),
            timings=Timings(
                queue_ms=(self.admitted_at - self.submitted_at) * 1000,
                load_ms=load_ms,
                prompt_eval_ms=(self.prefill_done_at - self.admitted_at) * 1000,
                generation_ms=(now - self.prefill_done_at) * 1000,
                total_ms=(now - self.submitted_at) * 1000,
            ),
            execution=info,
            stop_sequence=self._stops.matched,
        )

    def finish(self, reason: FinishReason) -> None:
        if reason != "stop" or not self._stops.stopped:
            # Text held back for a possible stop sequence (or a partial character) is real output.
            tail = self._stops.feed(self._detok.flush()) + ("" if self._stops.stopped else self._stops.flush())
            split = self._splitter.feed(tail)
        else:
            split = Split()
        # An open message, call or tag ends with the output: a call cut short is a partial call.
        split.add(self._splitter.finish())
        if split:
            self._emit(split, [], [])
        self.finish_reason = reason

    def _decode_one(self, token: int) -> str:
        return str(self._tokenizer.decode([token], skip_special_tokens=False))
