"""Positioned reads into tensors' own memory: how layer streaming and KV offload read their files.

Plain ``os.preadv`` at an offset rather than ``mmap``: mapped pages count against the process's
RSS, which the memory budget bounds; read pages stay in the kernel's page cache instead.
"""

from __future__ import annotations

import os

import torch


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (any dtype, bfloat16 included), without a copy.

    Raises ValueError for a non-contiguous tensor: its bytes would be a copy's, and a read into
    them would never reach the tensor."""
    if not tensor.is_contiguous():
        raise ValueError(f"tensor_bytes needs a contiguous tensor, got shape {tuple(tensor.shape)} "
                         f"with strides {tensor.stride()}")
    return tensor.view(-1).view(torch.uint8).numpy().data


def pread_full(fd: int, target: memoryview, offset: int) -> int:
    """Fill ``target`` from ``fd`` at ``offset``; returns the bytes read, fewer only at end of file."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done
