"""Continuous batching for causal LMs: one model copy, many sequences, joined and left per step.

The running batch shares one left-padded KV cache. Each engine step prefills at most
``max_tokens_per_step`` prompt tokens of newly admitted requests (several short prompts in one
padded forward, or one chunk of a long prompt) and then decodes one token for every running
sequence. Prefilled sequences join the batch by padding and concatenating caches; finished ones
leave at once by indexing them out, and padding columns nobody needs any more are trimmed (the
approach of TGI's Python server, which works with any Transformers model using DynamicCache).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ollm.engine.base import EventSink, prepared
from ollm.engine.kv_offload import KVOffloadStore, OffloadedLayer, release
from ollm.engine.sequence import Sequence
from ollm.generation import ExecutionInfo, GenerationRequest

log = logging.getLogger(__name__)

# Builds a Sequence for a request (tokenizing, budgeting, compiling its grammar); raises OllmError.
SequenceBuilder = Callable[[GenerationRequest, EventSink, float], Sequence]


@dataclass
class _Batch:
    """Sequences decoding together: their shared padded cache and the next token of each."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [batch, cached length]: 1 for real tokens, 0 for left padding
    next_tokens: torch.Tensor  # [batch]


@dataclass
class _ChunkedPrefill:
    """A prompt longer than one step's token budget, prefilled over several steps."""

    seq: Sequence
    cache: DynamicCache
    done: int = 0


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _KV:
    """A cache layer seen as the two tensors it holds (set once a forward has run).

    An offloaded layer's tensors are read from its store when the view is made and written back by
    set(); views come one layer at a time from _layers(), so splicing or trimming an offloaded cache
    holds one layer's KV at a time.
    """

    def __init__(self, layer: DynamicLayer) -> None:
        self.layer = layer
        if isinstance(layer, OffloadedLayer):
            self.keys, self.values = layer.load()
        else:
            assert layer.keys is not None and layer.values is not None
            self.keys, self.values = layer.keys, layer.values

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if isinstance(self.layer, OffloadedLayer):
            self.layer.store(keys, values)
        else:
            self.layer.keys, self.layer.values = keys, values


def _layers(cache: DynamicCache) -> Iterator[_KV]:
    return (_KV(layer) for layer in cache.layers)  # type: ignore[arg-type]


def supports_batching(model: PreTrainedModel) -> str | None:
    """None when every cache layer is a plain DynamicLayer we can pad and splice; else why not."""
    cache = DynamicCache(config=model.config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds - {"DynamicLayer"}:
        return f"cache layers {sorted(kinds)} cannot be spliced; sequences run one at a time"
    return None


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
        # With llama.kv-offload, every cache this engine makes keeps its layers in the store.
        self._kv_store = kv_store
        self._model = model
        self._build = build_sequence
        self._max_batch = max_batch
        self._step_tokens = max_tokens_per_step
        self._kv_budget = kv_cache_max_tokens
        # Prompts padded together round differently from a prompt alone (batch_invariant.py).
        self._prefill_alone = batch_invariant
        self._device = model.device
        self._load_ms = load_ms
        self._inbox: queue.Queue[tuple[GenerationRequest, EventSink, float]] = queue.Queue()
        self._cancelled: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._chunked: _ChunkedPrefill | None = None
        # Admitted, in a prefill forward, in no other list: a forward that fails must still fail them.
        self._prefilling: list[Sequence] = []
        self._batch: _Batch | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ollm-engine", daemon=True)
        self._thread.start()

    # -- the Engine interface ------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        self._inbox.put((request, sink, time.perf_counter()))
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        with self._cancel_lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def ready(self) -> bool:
        return True

    def active(self) -> int:
        running = len(self._batch.seqs) if self._batch else 0
        return running + len(self._waiting) + (1 if self._chunked else 0) + self._inbox.qsize()

    def batch_size(self) -> int:
        """Sequences in the running decode batch (the worker reports it; see ollm.contract.WorkerInfo)."""
        batch = self._batch
        return len(batch.seqs) if batch else 0

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._kv_store is not None:
            self._kv_store.close()

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closed.is_set():
                self._take_new_requests()
                self._apply_cancellations()
                if not (self._batch or self._chunked or self._waiting):
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                try:
                    self._prefill_step()
                    self._decode_step()
                except Exception as exc:  # A failed forward must not take the worker down.
                    log.exception("engine step failed")
                    self._fail_everything(f"generation failed: {exc}")

    def _take_new_requests(self) -> None:
        while True:
            try:
                request, sink, submitted = self._inbox.get_nowait()
            except queue.Empty:
                return
            seq = prepared(partial(self._build, request, sink, submitted), sink)
            if seq is not None:
                self._waiting.append(seq)

    def _apply_cancellations(self) -> None:
        with self._cancel_lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
        for seq in list(self._waiting):
            if seq.id in cancelled:
                self._waiting.remove(seq)
                seq.cancel()
                self._finish(seq)
        if self._chunked and self._chunked.seq.id in cancelled:
            self._chunked.seq.cancel()
            self._finish(self._chunked.seq)
            release(self._chunked.cache)
            self._chunked = None
        if self._batch:
            for seq in self._batch.seqs:
                if seq.id in cancelled:
                    seq.cancel()
            self._drop_finished()

    # -- prefill -------------------------------------------------------------------------------

    def _reserved_tokens(self) -> int:
        seqs = list(self._batch.seqs) if self._batch else []
        if self._chunked:
            seqs.append(self._chunked.seq)
        return sum(len(s.prompt_ids) + s.max_new_tokens for s in seqs)

    def _prefill_step(self) -> None:
        if self._chunked:
            self._continue_chunked()
            return
        running = len(self._batch.seqs) if self._batch else 0
        free_slots = self._max_batch - running
        reserved = self._reserved_tokens()
        group: list[Sequence] = []
        group_tokens = 0
        while self._waiting and len(group) < free_slots:
            seq = self._waiting[0]
            need = len(seq.prompt_ids)
            if reserved + need + seq.max_new_tokens > self._kv_budget and (running or group):
                break  # Waits until running sequences finish and free the cache.
            if group and group_tokens + need > self._step_tokens:
                break
            self._waiting.popleft()
            seq.admitted_at = time.perf_counter()
            if need > self._step_tokens:
                if group:
                    self._waiting.appendleft(seq)
                    break
                self._chunked = _ChunkedPrefill(seq, self._new_cache())
                self._continue_chunked()
                return
            group.append(seq)
            group_tokens += need
            reserved += need + seq.max_new_tokens
        if self._prefill_alone:
            for seq in group:
                self._prefill_group([seq])
        elif group:
            self._prefill_group(group)

    def _new_cache(self) -> DynamicCache:
        if self._kv_store is not None:
            return self._kv_store.new_cache(self._model.config)
        return DynamicCache(config=self._model.config)

    def _continue_chunked(self) -> None:
        assert self._chunked is not None
        job = self._chunked
        ids = job.seq.prompt_ids[job.done : job.done + self._step_tokens]
        input_ids = torch.tensor([ids], device=self._device)
        mask = torch.ones((1, job.done + len(ids)), dtype=torch.long, device=self._device)
        positions = torch.arange(job.done, job.done + len(ids), device=self._device).unsqueeze(0)
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=job.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        job.done += len(ids)
        if job.done < len(job.seq.prompt_ids):
            return
        self._chunked = None
        self._join([job.seq], job.cache, mask, out.logits[:, -1, :])

    def _prefill_group(self, group: list[Sequence]) -> None:
        length = max(len(s.prompt_ids) for s in group)
        # Padding positions are masked out, so the id placed there is irrelevant.
        input_ids = torch.zeros((len(group), length), dtype=torch.long, device=self._device)
        mask = torch.zeros((len(group), length), dtype=torch.long, device=self._device)
        for row, seq in enumerate(group):
            ids = seq.prompt_ids
            input_ids[row, length - len(ids) :] = torch.tensor(ids, device=self._device)
            mask[row, length - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        self._prefilling = group
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._prefilling = []
        self._join(group, cache, mask, out.logits[:, -1, :])

    def _join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """First token for freshly prefilled sequences, then splice them into the running batch."""
        now = time.perf_counter()
        for seq in seqs:
            seq.prefill_done_at = now
        next_tokens = self._choose(seqs, logits)
        fresh = _Batch(seqs, cache, mask, next_tokens)
        self._batch = fresh if self._batch is None else self._splice(self._batch, fresh)
        self._drop_finished()

    @staticmethod
    def _splice(old: _Batch, new: _Batch) -> _Batch:
        length = max(old.mask.shape[1], new.mask.shape[1])
        for a, b in zip(_layers(old.cache), _layers(new.cache), strict=True):
            a.set(
                torch.cat([_left_pad(a.keys, length, 2), _left_pad(b.keys, length, 2)], dim=0),
                torch.cat([_left_pad(a.values, length, 2), _left_pad(b.values, length, 2)], dim=0),
            )
        release(new.cache)
        mask = torch.cat([_left_pad(old.mask, length, 1), _left_pad(new.mask, length, 1)], dim=0)
        tokens = torch.cat([old.next_tokens, new.next_tokens])
        return _Batch(old.seqs + new.seqs, old.cache, mask, tokens)

    # -- decode --------------------------------------------------------------------------------

    def _decode_step(self) -> None:
        batch = self._batch
        if batch is None:
            return
        size = len(batch.seqs)
        mask = torch.cat([batch.mask, batch.mask.new_ones((size, 1))], dim=1)
        positions = mask.sum(dim=1, keepdim=True) - 1
        out = self._model(
            input_ids=batch.next_tokens.unsqueeze(1),
            attention_mask=mask,
            position_ids=positions,
            cache=batch.cache,
            use_cache=True,
        )
        batch.mask = mask
        batch.next_tokens = self._choose(batch.seqs, out.logits[:, -1, :])
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
        batch = self._batch
        if batch is None:
            return
        keep = [row for row, seq in enumerate(batch.seqs) if not seq.done]
        for seq in batch.seqs:
            if seq.done:
                self._finish(seq)
        if len(keep) == len(batch.seqs):
            return
        if not keep:
            release(batch.cache)
            self._batch = None
            return
        index = torch.tensor(keep, device=self._device)
        mask = batch.mask.index_select(0, index)
        # Columns that are padding for every remaining sequence hold nothing anyone attends to.
        first = int((mask.sum(dim=0) > 0).nonzero()[0])
        for layer in _layers(batch.cache):
            layer.set(
                layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:]
            )
        self._batch = _Batch(
            [batch.seqs[row] for row in keep],
            batch.cache,
            mask[:, first:],
            batch.next_tokens.index_select(0, index),
        )

    def _finish(self, seq: Sequence) -> None:
        seq.sink(seq.final_event(self.info, self._take_load_ms()))

    def _take_load_ms(self) -> float:
        # Like Ollama's load_duration: the load is charged to the first request that waited for it.
        load_ms, self._load_ms = self._load_ms, 0.0
        return load_ms

    def _fail_everything(self, message: str) -> None:
        seqs = list(self._waiting) + (self._batch.seqs if self._batch else []) + self._prefilling
        if self._chunked:
            seqs.append(self._chunked.seq)
        self._prefilling = []
        self._waiting.clear()
        for cache in (self._batch.cache if self._batch else None, self._chunked.cache if self._chunked else None):
            if cache is not None:
                release(cache)
        self._batch = None
        self._chunked = None
        for seq in seqs:
            seq.fail(message)
