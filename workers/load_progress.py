"""How far a model load has got: bytes of weights in place, of the bytes the load will hold.

torch calls its global registration hooks each time any module is given a parameter or a buffer.
Transformers' ``from_pretrained`` builds the model on the meta device and then sets every tensor
it read on its module, so the hooks see each weight as it arrives, whatever the checkpoint's
format or the loader (the layer streamer and the embedder too). Meta tensors (the empty model)
are not counted; a tensor set twice (tied embeddings) is counted once.

A worker loads one model at a time (``Residency``), so the process-wide hooks see one load.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ollm.contract import LoadingModel

# Seconds slept after each tensor is set: tests make a real load take longer than
# server.worker_lost_seconds with it. Never set it in production.
TENSOR_DELAY_ENV = "OLLM_LOAD_TENSOR_DELAY"


class LoadProgress:
    def __init__(self, model: str, reserved: int, total: int) -> None:
        self.model = model
        # Bytes of the worker's budget held for this model while it loads (its planned peak).
        self.reserved = reserved
        self.total = total
        self.started_at = time.time()
        self._read = 0
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    def info(self) -> LoadingModel:
        with self._lock:
            read = min(self._read, self.total) if self.total else self._read
        return LoadingModel(model=self.model, bytes_read=read, bytes_total=self.total, started_at=self.started_at)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Count the tensors modules receive while the body runs."""
        import torch
        from torch.nn.modules.module import (
            register_module_buffer_registration_hook,
            register_module_parameter_registration_hook,
        )

        delay = float(os.environ.get(TENSOR_DELAY_ENV, "0") or 0)

        def arrived(_module: Any, _name: str, tensor: torch.Tensor | None) -> None:
            if tensor is None or tensor.is_meta:
                return
            with self._lock:
                pointer = tensor.data_ptr()
                if pointer in self._seen:
                    return
                self._seen.add(pointer)
                self._read += tensor.numel() * tensor.element_size()
            if delay:
                time.sleep(delay)

        handles = [
            register_module_parameter_registration_hook(arrived),
            register_module_buffer_registration_hook(arrived),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            with self._lock:
                self._seen.clear()
