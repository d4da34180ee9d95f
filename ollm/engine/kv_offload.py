"""KV offload (``llama.kv-offload``): each layer's KV cache lives off the compute device's memory.

On CPU every cache layer is a file in a per-engine directory; on an accelerator it is pinned host
memory. Only the layer that is running has its keys and values in (device) memory: ``update`` reads
what the layer cached so far, appends the new tokens to the backing store, returns the full tensors
for attention and keeps nothing. The engine's splice and drop go through ``load``/``store`` one
layer at a time, so they never hold more than a layer either.

Files use the layout ``[tokens, 2 (keys, values), batch, kv heads, head_dim]``: new tokens are
contiguous rows at the end, so decoding writes only the new token's row and prefill only its
chunk. Reads are plain positioned reads into a fresh tensor (``os.preadv``), not ``mmap``: mapped
pages would count against the process's resident memory. Written pages sit in the kernel's page
cache, which the kernel reclaims under pressure; they are not the process's memory.

docs/memory.md describes the costs and measurements.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ollm.engine.positioned_io import pread_full, tensor_bytes

_LOCK = "lock"
_PREFIX = "engine-"
# Directories younger than this are never judged leftovers: a store takes its lock just after creating one.
_YOUNG_SECONDS = 60


class _Backing:
    """Where one layer's rows ``[tokens, 2, batch, heads, dim]`` are kept."""

    def read(self, rows: int, into: torch.Tensor) -> None:
        """Copy the first ``rows`` rows into ``into`` (a contiguous tensor of at least that many rows)."""
        raise NotImplementedError

    def write(self, at: int, rows: torch.Tensor) -> None:
        """Write ``rows`` starting at row ``at``; whatever was stored after them is dropped."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.clear()


class _FileBacking(_Backing):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: list[int | None] = [None]  # shared with the finalizer, which must not hold self
        self._row_bytes = 0
        # The file goes when the layer is dropped, even if nobody calls close() (an engine error path).
        self._finalizer = weakref.finalize(self, _remove_file, path, self._fd)

    def _open(self) -> int:
        fd = self._fd[0]
        if fd is None:
            fd = self._fd[0] = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        return fd

    def read(self, rows: int, into: torch.Tensor) -> None:
        size = rows * self._row_bytes
        done = pread_full(self._open(), tensor_bytes(into)[:size], 0)
        if done < size:
            raise OSError(f"KV offload file {self.path} is shorter than expected ({done} of {size} bytes)")

    def write(self, at: int, rows: torch.Tensor) -> None:
        rows = rows.contiguous()
        if rows.shape[0]:
            self._row_bytes = rows[0].numel() * rows.element_size()
        view = tensor_bytes(rows)
        fd, offset, done = self._open(), at * self._row_bytes, 0
        os.ftruncate(fd, offset + len(view))
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def clear(self) -> None:
        if self._fd[0] is not None:
            os.ftruncate(self._fd[0], 0)

    def close(self) -> None:
        self._finalizer()


def _remove_file(path: Path, fd: list[int | None]) -> None:
    if fd[0] is not None:
        os.close(fd[0])
        fd[0] = None
    path.unlink(missing_ok=True)


class _HostBacking(_Backing):
    """Pinned host memory for a layer computed on an accelerator: copies in and out do not block on paging."""

    def __init__(self) -> None:
        self._rows: torch.Tensor | None = None

    def read(self, rows: int, into: torch.Tensor) -> None:
        assert self._rows is not None
        into[:rows].copy_(self._rows[:rows], non_blocking=True)

    def write(self, at: int, rows: torch.Tensor) -> None:
        host = rows.to("cpu")
        kept = self._rows[:at] if self._rows is not None else host[:0]
        combined = torch.cat([kept, host])
        self._rows = combined.pin_memory() if torch.cuda.is_available() else combined

    def clear(self) -> None:
        self._rows = None


class OffloadedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a backing store; see the module docstring."""

    def __init__(self, backing: _Backing) -> None:
        self._backing = backing
        self._tokens = 0
        self._dtype: torch.dtype | None = None
        self._row_shape: tuple[int, int, int] | None = None  # batch, kv heads, head_dim
        super().__init__()

    # Transformers (and DynamicLayer's own methods) read and assign .keys / .values; here reading one
    # loads it from the backing store and assigning one is only allowed to clear the layer.
    @property
    def keys(self) -> torch.Tensor | None:
        return self.load()[0] if self._tokens else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._assign(value)

    @property
    def values(self) -> torch.Tensor | None:
        return self.load()[1] if self._tokens else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._assign(value)

    def _assign(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise TypeError("an offloaded KV layer takes keys and values together: use store(keys, values)")
        if hasattr(self, "_backing"):  # DynamicLayer.__init__ clears them before this class's fields exist
            self._backing.clear()
            self._tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._dtype = key_states.dtype
        batch, heads, _tokens, dim = key_states.shape
        self._row_shape = (batch, heads, dim)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = _rows(key_states, value_states)
        if new.shape[2:] != torch.Size(self._row_shape or ()):
            raise ValueError(f"KV offload: new states {tuple(key_states.shape)} do not match the cached batch")
        rows = self._read(extra=new.shape[0])
        rows[self._tokens :].copy_(new)
        self._backing.write(self._tokens, new.cpu() if new.device.type != "cpu" else new)
        self._tokens += new.shape[0]
        return _split(rows)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values, ``[batch, kv heads, tokens, head_dim]`` each, read from the store."""
        if not self._tokens:
            raise ValueError("KV offload: the layer holds no tokens yet")
        return _split(self._read())

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the layer's contents (the engine's splice, drop and trim)."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        batch, heads, tokens, dim = keys.shape
        self._row_shape = (batch, heads, dim)
        self._backing.write(0, _rows(keys, values).cpu())
        self._tokens = tokens

    def _read(self, extra: int = 0) -> torch.Tensor:
        assert self._row_shape is not None and self._dtype is not None
        rows = torch.empty((self._tokens + extra, 2, *self._row_shape), dtype=self._dtype)
        if self._tokens:
            self._backing.read(self._tokens, rows)
        return rows.to(self.device) if self.device.type != "cpu" else rows

    def get_seq_length(self) -> int:
        return self._tokens

    def reset(self) -> None:
        self._backing.clear()
        self._tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if tokens_to_remove and self._tokens:
            keys, values = self.load()
            self.store(keys[..., :tokens_to_remove, :], values[..., :tokens_to_remove, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._tokens:
            keys, values = self.load()
            self.store(keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._tokens:
            keys, values = self.load()
            self.store(keys[indices, ...], values[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def offload(self) -> None:
        """Already off the device: nothing to move (transformers' own offloading calls this)."""

    def prefetch(self) -> None:
        """Read on demand in update()."""

    def close(self) -> None:
        self._backing.close()
        self._tokens = 0


def _rows(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, dim] x 2 -> [tokens, 2, batch, heads, dim], contiguous."""
    return torch.stack([keys, values]).permute(3, 0, 1, 2, 4).contiguous()


def _split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Contiguous, as the resident cache's tensors are: attention then runs the same kernels on the same layout.
    return rows[:, 0].permute(1, 2, 0, 3).contiguous(), rows[:, 1].permute(1, 2, 0, 3).contiguous()


def release(cache: DynamicCache) -> None:
    """Delete an offloaded cache's files now (a cache spliced into another, finished or cancelled)."""
    for layer in cache.layers:
        if isinstance(layer, OffloadedLayer):
            layer.close()


class KVOffloadStore:
    """One engine's offloaded caches: a directory of per-layer files (CPU) or pinned host memory (accelerator).

    The directory is removed on close(); directories left by processes that died are removed when
    the next store opens under the same root (each live store holds an exclusive lock on its own).
    """

    def __init__(self, root: Path, device: str) -> None:
        self.on_disk = device == "cpu"
        self._caches = itertools.count()
        self.directory: Path | None = None
        self._lock: int | None = None
        if self.on_disk:
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(root)
            self.directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
            self._lock = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def new_cache(self, config: Any) -> DynamicCache:
        """A DynamicCache for ``config`` whose full-attention layers are offloaded."""
        cache = DynamicCache(config=config)
        number = next(self._caches)
        cache.layers = [
            OffloadedLayer(self._backing(number, index)) if type(layer) is DynamicLayer else layer
            for index, layer in enumerate(cache.layers)
        ]
        return cache

    def _backing(self, cache: int, layer: int) -> _Backing:
        if self.directory is None:
            return _HostBacking()
        return _FileBacking(self.directory / f"cache{cache}-layer{layer:03d}.kv")

    def disk_bytes(self) -> int:
        if self.directory is None or not self.directory.exists():
            return 0
        return sum(path.stat().st_size for path in self.directory.glob("*.kv"))

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def remove_leftovers(root: Path) -> list[Path]:
    """Remove store directories under ``root`` whose owner is gone (their lock is free)."""
    removed = []
    for directory in root.glob(f"{_PREFIX}*"):
        try:
            if directory.stat().st_mtime > time.time() - _YOUNG_SECONDS:
                continue  # maybe a store being created right now, before it holds its lock
            fd = os.open(directory / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # no lock file: a store that died while creating its directory
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live engine owns it
            finally:
                os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed
