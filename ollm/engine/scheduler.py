"""The scheduler: decides what each engine step prefills, under a KV budget that counts padding.

Requests wait in arrival order (first come, first served: a later request never overtakes an
earlier one that is waiting for memory). Each step admits waiting sequences while

- the running batch has a free slot (``max_batch``),
- the step's prompt tokens stay within ``max_tokens_per_step`` (a longer prompt is prefilled alone,
  one chunk per step, so running streams keep decoding between its chunks), and
- the KV the batch could come to hold fits ``kv_budget``: the batch is left-padded to its longest
  row, so it is counted as rows x the longest row's final length (prompt + max new tokens), in the
  columns the cache manager says a row really holds (a sliding-window-only model holds its window).

A sequence with images or audio (``Sequence.model_inputs``) prefills alone and whole: its encoder
runs in that one forward. A sequence that does not fit waits until running ones finish; nothing is
preempted or dropped.
The first waiting sequence is admitted into an empty batch whatever its size: the sequence
builder already refused any request that could never fit.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from transformers import DynamicCache

from ollm.engine.sequence import Sequence


@dataclass
class ChunkedPrefill:
    """A prompt longer than one step's token budget, prefilled over several steps into its own cache."""

    seq: Sequence
    cache: DynamicCache
    done: int = 0


@dataclass
class StepPlan:
    """What one step prefills: groups that each take one padded forward, or one chunk of a long prompt."""

    groups: list[list[Sequence]]
    chunk_of: Sequence | None = None  # start a chunked prefill of this sequence


def final_length(seq: Sequence) -> int:
    return len(seq.prompt_ids) + seq.max_new_tokens


class Scheduler:
    def __init__(
        self,
        max_batch: int,
        max_tokens_per_step: int,
        kv_budget: int,
        columns_held: Callable[[int], int],
        padded_prefill: bool,
    ) -> None:
        self.max_batch = max_batch
        self.step_tokens = max_tokens_per_step
        self.kv_budget = kv_budget
        self._columns_held = columns_held
        # False: every prompt gets its own forward (batch-invariant mode, linear-attention state).
        self._padded_prefill = padded_prefill
        self.waiting: deque[Sequence] = deque()
        self.chunked: ChunkedPrefill | None = None

    def kv_tokens(self, seqs: Iterable[Sequence]) -> int:
        """KV token slots a left-padded batch of ``seqs`` can come to hold: rows x its longest final row."""
        rows = list(seqs)
        if not rows:
            return 0
        return len(rows) * self._columns_held(max(final_length(s) for s in rows))

    def plan(self, running: list[Sequence]) -> StepPlan:
        if self.chunked is not None:
            return StepPlan([])
        committed = [*running]
        group: list[Sequence] = []
        group_tokens = 0
        while self.waiting and len(committed) + len(group) < self.max_batch:
            seq = self.waiting[0]
            need = len(seq.prompt_ids)
            if (committed or group) and self.kv_tokens([*committed, *group, seq]) > self.kv_budget:
                break  # Waits until running sequences finish and free the cache.
            if seq.model_inputs:
                if group:
                    break  # Its own forward, next step.
                # Images or audio are encoded in one forward with the whole prompt: never chunked.
                self.waiting.popleft()
                seq.admitted_at = time.perf_counter()
                return StepPlan([[seq]])
            if need > self.step_tokens:
                if group:
                    break  # Its chunks start next step, when this group has joined.
                self.waiting.popleft()
                seq.admitted_at = time.perf_counter()
                return StepPlan([], chunk_of=seq)
            if group_tokens + need > self.step_tokens:
                break
            self.waiting.popleft()
            seq.admitted_at = time.perf_counter()
            group.append(seq)
            group_tokens += need
        if not group:
            return StepPlan([])
        return StepPlan([group] if self._padded_prefill else [[seq] for seq in group])

    def remove(self, ids: set[str]) -> list[Sequence]:
        """Take the waiting sequences with these ids out of the queue."""
        gone = [seq for seq in self.waiting if seq.id in ids]
        for seq in gone:
            self.waiting.remove(seq)
        return gone
