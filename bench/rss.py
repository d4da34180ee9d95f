"""Peak RSS of a benchmark's child process tree, sampled from outside with psutil.

Memory benchmarks run the model in a child process that prints a line at each phase (imported,
loaded, done); the parent samples the RSS of the child and all its descendants until the line
arrives, so the peak is the whole tree's, seen as the operating system sees it.
"""

from __future__ import annotations

import contextlib
import selectors
from collections.abc import Callable
from typing import IO

import psutil

SAMPLE_SECONDS = 0.02


class ProcessTree:
    def __init__(self, pid: int, on_sample: Callable[[int], None] | None = None) -> None:
        self.root = psutil.Process(pid)
        self.samples = 0
        # Called with the sample count after each sample: for slower side readings (disk use).
        self._on_sample = on_sample

    def rss(self) -> int:
        """RSS of the process and every descendant alive now."""
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        self.samples += 1
        if self._on_sample is not None:
            self._on_sample(self.samples)
        return total

    def peak_until(self, prefix: str, stdout: IO[str], interval: float = SAMPLE_SECONDS) -> tuple[int, str]:
        """Sample until the child prints a line starting with ``prefix``: the peak and the rest of that line."""
        selector = selectors.DefaultSelector()
        selector.register(stdout, selectors.EVENT_READ)
        peak = self.rss()
        while True:
            if selector.select(timeout=interval):
                line = stdout.readline()
                if line.startswith(prefix):
                    return max(peak, self.rss()), line[len(prefix) :].strip()
                if not line:
                    raise RuntimeError("the child process ended early")
            peak = max(peak, self.rss())
