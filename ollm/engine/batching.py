"""Continuous batching for causal LMs: one model copy, many sequences, joined and left per step.

The engine is three parts (docs/engine.md), in the shape of vLLM v1's engine core:

- the **scheduler** (scheduler.py) decides what each step prefills: which waiting sequences are
  admitted under the batch, token-per-step and KV budgets, and when a long prompt is chunked;
- the **cache manager** (cache_manager.py) owns every cache: it makes them, joins a freshly
  prefilled group into the running batch, narrows the batch when sequences leave, releases
  memory, and counts what each layer kind holds;
- the **model runner** (model_runner.py) turns a decision into a forward: ids, positions, masks.

This module runs the loop and owns the sequences: each step prefills what the scheduler chose,
decodes one token for every running sequence, streams the tokens and ends finished sequences at
once. Any exception in a step ends the sequences that step touched with an error event and frees
their memory; the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache, PreTrainedModel

from ollm.engine.base import EventSink, prepared
from ollm.engine.cache_manager import CacheManager, left_pad, unsupported_layers
from ollm.engine.kv_offload import KVOffloadStore
from ollm.engine.model_runner import ModelRunner
from ollm.engine.scheduler import ChunkedPrefill, Scheduler
from ollm.engine.sequence import Sequence
from ollm.engine.threads import IdleEndingThread
from ollm.generation import ExecutionInfo, GenerationRequest

log = logging.getLogger(__name__)

# Builds a Sequence for a request (tokenizing, budgeting, compiling its grammar); raises OllmError.
SequenceBuilder = Callable[[GenerationRequest, EventSink, float], Sequence]


@dataclass
class _Batch:
    """Sequences decoding together: their shared padded cache and the next token of each."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [batch, columns]: 1 for real tokens, 0 for left padding
    next_tokens: torch.Tensor  # [batch]


def supports_batching(model: PreTrainedModel) -> str | None:
    """None when the cache manager knows every cache layer kind of ``model``; else why not."""
    why_not = unsupported_layers(model.config)
    return f"{why_not}; sequences run one at a time" if why_not else None


class BatchingEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        info: ExecutionInfo,
        build_sequence: SequenceBuilder,
        max_batch: int,
        max_tokens_per_step: int,
        kv_cache_max_tokens: int,
        batch_invariant: bool = False,
        load_ms: float = 0.0,
        kv_store: KVOffloadStore | None = None,
    ) -> None:
        self.info = info
        # With llama.kv-offload, every cache the manager makes keeps its full-attention layers in the store.
        self._kv_store = kv_store
        self.caches = CacheManager(model.config, kv_store)
        self.runner = ModelRunner(model)
        self.scheduler = Scheduler(
            max_batch,
            max_tokens_per_step,
            kv_cache_max_tokens,
            self.caches.columns_held,
            # Prompts padded together round differently from a prompt alone (batch_invariant.py).
            padded_prefill=self.caches.padded_prefill and not batch_invariant,
        )
        self._build = build_sequence
        self._load_ms = load_ms
        self._inbox: queue.Queue[tuple[GenerationRequest, EventSink, float]] = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        # Admitted, in a prefill forward, in no other list: a step that fails must still end them.
        self._prefilling: list[Sequence] = []
        self._batch: _Batch | None = None
        # The loop's thread ends while the engine is idle, so it keeps no OpenMP pool (threads.py).
        self._loop = IdleEndingThread(self._step, self._idle, name="ollm-engine")

    # -- the Engine interface ------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self._inbox.put((request, sink, time.perf_counter()))
        self._loop.wake()

    def cancel(self, request_id: str) -> None:
        with self._cancel_lock:
            self._cancelled.add(request_id)
        self._loop.wake()

    def ready(self) -> bool:
        return True

    def active(self) -> int:
        running = len(self._batch.seqs) if self._batch else 0
        chunked = 1 if self.scheduler.chunked else 0
        return running + len(self.scheduler.waiting) + chunked + len(self._prefilling) + self._inbox.qsize()

    def batch_size(self) -> int:
        """Sequences in the running decode batch (the worker reports it; see ollm.contract.WorkerInfo)."""
        batch = self._batch
        return len(batch.seqs) if batch else 0

    def close(self) -> None:
        self._loop.close()
        if self._kv_store is not None:
            self._kv_store.close()

    # -- the loop ------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._batch or self.scheduler.chunked or self.scheduler.waiting)

    def _idle(self) -> bool:
        return self._inbox.empty() and not self._has_work()

    @torch.inference_mode()
    def _step(self) -> bool:
        """One round of the loop: new requests, cancellations, a prefill and a decode step; False
        when there was nothing to run."""
        self._take_new_requests()
        self._apply_cancellations()
        if not self._has_work():
            return False
        try:
            self._prefill_step()
            self._decode_step()
        except Exception as exc:  # A bug outside the guarded steps must not take the worker down.
            log.exception("engine step failed")
            self._fail_everything(f"generation failed: {exc}")
        return True

    def _take_new_requests(self) -> None:
        while True:
            try:
                request, sink, submitted = self._inbox.get_nowait()
            except queue.Empty:
                return
            seq = prepared(partial(self._build, request, sink, submitted), sink)
            if seq is not None:
                self.scheduler.waiting.append(seq)

    def _apply_cancellations(self) -> None:
        with self._cancel_lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
        for seq in self.scheduler.remove(cancelled):
            seq.cancel()
            self._finish(seq)
        job = self.scheduler.chunked
        if job and job.seq.id in cancelled:
            self.scheduler.chunked = None
            self.caches.release(job.cache)
            job.seq.cancel()
            self._finish(job.seq)
        if self._batch:
            for seq in self._batch.seqs:
                if seq.id in cancelled:
                    seq.cancel()
            self._drop_finished()

    def _fail(self, step: str, exc: Exception, seqs: list[Sequence], *caches: DynamicCache) -> None:
        """End ``seqs`` with an error event and free ``caches``: what a failed step touched, no more."""
        log.exception("engine %s failed for %d sequence(s)", step, len(seqs), exc_info=exc)
        for cache in caches:
            self.caches.release(cache)
        for seq in seqs:
            seq.fail(f"generation failed ({step}): {exc}")

    # -- prefill -------------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        if self.scheduler.chunked:
            self._continue_chunked()
            return
        running = list(self._batch.seqs) if self._batch else []
        plan = self.scheduler.plan(running)
        if plan.chunk_of is not None:
            self.scheduler.chunked = ChunkedPrefill(plan.chunk_of, self.caches.new_cache())
            self._continue_chunked()
        for group in plan.groups:
            self._prefill_group(group)

    def _continue_chunked(self) -> None:
        job = self.scheduler.chunked
        assert job is not None
        ids = job.seq.prompt_ids[job.done : job.done + self.scheduler.step_tokens]
        try:
            mask, logits = self.runner.prefill_chunk(ids, job.done, job.cache)
            self.caches.count(job.cache)
            job.done += len(ids)
            if job.done < len(job.seq.prompt_ids):
                return
            self.scheduler.chunked = None
            fresh = self._first_tokens([job.seq], job.cache, mask, logits)
        except Exception as exc:
            self.scheduler.chunked = None
            self._fail("chunked prefill", exc, [job.seq], job.cache)
            return
        self._join(fresh)

    def _prefill_group(self, group: list[Sequence]) -> None:
        cache = self.caches.new_cache()
        self._prefilling = group
        try:
            inputs = group[0].model_inputs if len(group) == 1 else None  # the scheduler keeps them alone
            mask, logits = self.runner.prefill([s.prompt_ids for s in group], cache, inputs)
            self.caches.count(cache)
            fresh = self._first_tokens(group, cache, mask, logits)
        except Exception as exc:
            self._fail("prefill", exc, group, cache)
            return
        finally:
            self._prefilling = []
        self._join(fresh)

    def _first_tokens(
        self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor
    ) -> _Batch:
        now = time.perf_counter()
        for seq in seqs:
            seq.prefill_done_at = now
        return _Batch(seqs, cache, mask, self._choose(seqs, logits))

    def _join(self, fresh: _Batch) -> None:
        """Splice freshly prefilled sequences into the running batch (or make them the batch)."""
        old = self._batch
        if old is not None:
            self._batch = None
            try:
                columns = max(old.mask.shape[1], fresh.mask.shape[1])
                self.caches.join(old.cache, fresh.cache, columns)
                mask = torch.cat([left_pad(old.mask, columns, 1), left_pad(fresh.mask, columns, 1)])
                fresh = _Batch(old.seqs + fresh.seqs, old.cache, mask, torch.cat([old.next_tokens, fresh.next_tokens]))
            except Exception as exc:
                # A half-joined cache is no longer either batch's: both end.
                self._fail("join", exc, old.seqs + fresh.seqs, old.cache, fresh.cache)
                return
        self._batch = fresh
        self._drop_finished()

    # -- decode --------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        batch = self._batch
        if batch is None:
            return
        try:
            batch.mask, logits = self.runner.decode(batch.next_tokens, batch.mask, batch.cache)
            self.caches.count(batch.cache)
            batch.next_tokens = self._choose(batch.seqs, logits)
        except Exception as exc:
            self._batch = None
            self._fail("decode", exc, batch.seqs, batch.cache)
            return
        self._drop_finished()

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The next token of every sequence: one shared argmax for plain greedy rows."""
        # One copy to the host for the whole batch (on CUDA, one sync rather than one per row).
        greedy: list[int] = torch.argmax(logits, dim=-1).tolist()
        chosen = []
        for row, seq in enumerate(seqs):
            if seq.plain_greedy:
                seq.accept(greedy[row])
                chosen.append(greedy[row])
            else:
                chosen.append(seq.choose(logits[row].float()))
        return torch.tensor(chosen, device=logits.device)

    def _drop_finished(self) -> None:
        """Finished sequences leave at once: final events out, their rows and memory freed."""
        batch = self._batch
        if batch is None or not any(seq.done for seq in batch.seqs):
            return
        keep = [row for row, seq in enumerate(batch.seqs) if not seq.done]
        for seq in batch.seqs:
            if seq.done:
                self._finish(seq)
        self._batch = None
        staying = [batch.seqs[row] for row in keep]
        if not keep:
            self.caches.release(batch.cache)
            return
        try:
            index = torch.tensor(keep, device=batch.mask.device)
            mask = batch.mask.index_select(0, index)
            # Columns that are padding for every remaining sequence hold nothing anyone attends to.
            first = int((mask.sum(dim=0) > 0).nonzero()[0])
            self.caches.keep(batch.cache, index, first)
            self._batch = _Batch(staying, batch.cache, mask[:, first:], batch.next_tokens.index_select(0, index))
        except Exception as exc:
            self._fail("leave", exc, staying, batch.cache)

    def _finish(self, seq: Sequence) -> None:
        seq.sink(seq.final_event(self.info, self._take_load_ms()))

    def _take_load_ms(self) -> float:
        # Like Ollama's load_duration: the load is charged to the first request that waited for it.
        load_ms, self._load_ms = self._load_ms, 0.0
        return load_ms

    def _fail_everything(self, message: str) -> None:
        seqs = list(self.scheduler.waiting) + (self._batch.seqs if self._batch else []) + self._prefilling
        job = self.scheduler.chunked
        if job:
            seqs.append(job.seq)
            self.caches.release(job.cache)
        if self._batch:
            self.caches.release(self._batch.cache)
        self._prefilling = []
        self.scheduler.waiting.clear()
        self.scheduler.chunked = None
        self._batch = None
        for seq in seqs:
            seq.fail(message)
