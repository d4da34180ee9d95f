"""Where torch's CPU work runs: on threads that end when their work ends.

torch's CPU kernels parallelize with OpenMP (libgomp in the pip wheels). libgomp keeps a pool of
worker threads for every thread that ever ran a parallel region, for as long as that thread
lives, and once the pooled threads outnumber the cores it stops spinning between regions (its
"throttled" spin count) and parks them on a futex instead. A decode step runs hundreds of short
parallel regions, so a single idle pool elsewhere in the process (the main thread's, after it
loaded the model) made every region of the engine thread wait for a wake-up. Measured on 2
cores, SmolLM2's one-stream decode step on the engine thread against the thread that loaded it:
51 vs 29 ms with int4 weights, 60 vs 30 ms with int8, 77 vs 51 ms in float32 (one int4
576x1536 kernel: 93 vs 32 us). A load run on a thread that then ends frees its pool, and the
engine's regions spin again.

So a process holds torch work on as few live threads as it can:
- an engine's loop runs on an :class:`IdleEndingThread`, which ends when the engine has nothing
  to do and starts again with the next request, so an idle engine keeps no pool;
- loads and embedding forwards run with :func:`on_fresh_thread`, on a thread that ends with them.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# How long an idle loop waits for work before its thread ends (a request after that starts a new
# one: a thread start and an OpenMP pool, well under a millisecond).
IDLE_SECONDS = 2.0


def on_fresh_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` on a new thread that ends with it (its OpenMP pool goes too); its result or error."""
    outcome: list[T] = []
    failure: list[BaseException] = []
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome.append(context.run(work))
        except BaseException as exc:  # handed to the caller, who re-raises it
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _nothing_to_do() -> bool:
    return False


def _always_idle() -> bool:
    return True


class IdleEndingThread:
    """Runs ``step`` over and over on one thread; ``step`` returns False when it had nothing to do.

    After ``IDLE_SECONDS`` of nothing to do the thread ends; :meth:`wake` (call it after queueing
    work) starts a new one if none is running. ``idle`` is checked under the same lock as the
    start, so work queued as the thread decides to end is never stranded.
    """

    def __init__(self, step: Callable[[], bool], idle: Callable[[], bool], name: str) -> None:
        self._step = step
        self._idle = idle
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self.wake()

    def wake(self) -> None:
        self._wake.set()
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)
        # The owner holds this loop and the loop held the owner's methods: without the cycle, a
        # closed engine (and its model) is freed as soon as its last holder lets go, not at a
        # later garbage collection.
        self._step, self._idle = _nothing_to_do, _always_idle

    def _run(self) -> None:
        while not self._closed:
            if self._step():
                continue
            if self._wake.wait(timeout=IDLE_SECONDS):
                self._wake.clear()
                continue
            with self._lock:
                if self._closed or self._idle():
                    self._thread = None
                    return
