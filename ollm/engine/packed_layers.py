"""The packed file of a streamed, quantized model (``ollm/packed_index.py`` says what it holds).

Written once, at the first load that streams the layers with ``runtime.quantization``: layer by
layer, each projection's weight is read from the checkpoint (or, for int4, taken from a Q4_1
GGUF kept beside it, as the resident path does), quantized on the run device in row chunks, and
appended. The file is written under a temporary name and renamed when complete, so a load never
reads a half-written one, and it is rewritten when the checkpoint's files change.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ollm.engine.gguf_weights import Int4Parts, check_gguf_shape, q4_1_projections
from ollm.engine.quantize import RUN_DTYPE_NAMES, QuantizedLinear, compute_dtype
from ollm.errors import OllmError
from ollm.packed_index import packed_header, packed_layout, packed_path, source_fingerprint
from ollm.settings import Quantization
from ollm.tensor_index import LayerLayout

log = logging.getLogger(__name__)

# Rows quantized at a time, so the float32 temporaries stay a few MiB whatever the weight. torch's
# CPU int4 packing tiles 64 rows: chunks of 512 rows pack to exactly the rows of the whole weight.
_ROWS = 512

WeightOf = Callable[[int, str], torch.Tensor]  # (layer, projection) -> its weight, in the run dtype
GgufInt4 = tuple[Path, dict[tuple[int, str], Callable[[], Int4Parts]]]  # a GGUF and its Q4_1 projections


def ensure_packed(
    model_dir: Path,
    layout: LayerLayout,
    projections: list[list[str]],
    mode: Quantization,
    dtype: torch.dtype,
    device: torch.device,
    weight_of: WeightOf,
    gguf_file: Path | None = None,
    config: Any = None,
) -> LayerLayout:
    """``layout`` with ``projections`` read packed from the model's packed file, written first when
    it is missing or was made from other files. ``gguf_file``: a Q4_1 GGUF whose bits int4 takes
    (read only when the file is written), with the model's ``config`` (its head counts)."""
    compute = compute_dtype(dtype, device)
    compute_name = RUN_DTYPE_NAMES[compute]
    sources = layout.files() | ({gguf_file} if gguf_file else set())
    header = packed_header(layout, projections, mode, device.type, compute_name, source_fingerprint(sources))
    file = packed_path(model_dir, mode, device.type, compute_name)
    packed = packed_layout(layout, file, header, projections)
    if _complete(file, header, packed):
        return packed
    started = time.perf_counter()
    count = sum(map(len, projections))
    log.info("quantizing %d projections of %s to %s once, into %s", count, model_dir.name, mode, file)
    try:
        file.parent.mkdir(exist_ok=True)
        gguf = (gguf_file, q4_1_projections(gguf_file, config)) if gguf_file and mode == "int4" else None
        _write(file, header, packed, projections, mode, compute, device, weight_of, gguf)
    except OSError as exc:
        raise OllmError(
            f"cannot write the quantized layers of {model_dir.name} to {file}: {exc}; make the model directory "
            "writable, or set runtime.quantization=none (or turn layer streaming off)"
        ) from exc
    _return_freed_memory()
    seconds, size = time.perf_counter() - started, file.stat().st_size >> 20
    log.info("quantized %s in %.1f s (%d MiB)", model_dir.name, seconds, size)
    return packed


def _return_freed_memory() -> None:
    """Hand the packing's freed temporaries back to the system. glibc keeps freed heap memory (its
    mmap threshold grows as large blocks are freed), and the process would carry it through its
    peak: measured on a 2 GB llama under 256 MiB, +60 MiB at 16 streams after a first load."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        pass


def _complete(file: Path, header: bytes, packed: LayerLayout) -> bool:
    """The file exists, was written from these files with this header, and is whole."""
    if not file.exists():
        return False
    ends = [piece.entry.offset + piece.entry.nbytes for layer in packed.layers for p in layer.values()
            for piece in p.pieces if piece.entry.file == file]  # fmt: skip
    with file.open("rb") as handle:
        same = handle.read(len(header)) == header
    return same and file.stat().st_size == max(ends, default=len(header))


def _write(
    file: Path,
    header: bytes,
    packed: LayerLayout,
    projections: list[list[str]],
    mode: Quantization,
    compute: torch.dtype,
    device: torch.device,
    weight_of: WeightOf,
    gguf: GgufInt4 | None,
) -> None:
    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as out:
            out.write(header)
            for number, names in enumerate(projections):
                for module in names:
                    tensors = _pack(number, module, mode, compute, device, weight_of, gguf, packed)
                    for attribute, tensor in tensors.items():
                        expected = packed.layers[number][f"{module}.{attribute}"].shape
                        assert tuple(tensor.shape) == expected, (module, attribute, tensor.shape, expected)
                        out.write(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
                log.debug("quantized layer %d of %d", number + 1, len(projections))
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


def _pack(
    number: int,
    module: str,
    mode: Quantization,
    compute: torch.dtype,
    device: torch.device,
    weight_of: WeightOf,
    gguf: GgufInt4 | None,
    packed: LayerLayout,
) -> dict[str, torch.Tensor]:
    """One projection's packed values and scales, as ``QuantizedLinear`` holds them on ``device``."""
    layer = packed.layers[number]
    convert = gguf[1].get((number, module)) if gguf and f"{module}.bias" not in layer else None
    if convert is not None:
        assert gguf is not None
        values, scale, zero = convert()
        out_features = layer[f"{module}.scales"].shape[1]
        check_gguf_shape(gguf[0], number, module, tuple(values.shape), (out_features, values.shape[1]))
        linear = QuantizedLinear.from_int4(values.to(device), scale.to(device), zero.to(device), compute)
        return {"packed": linear.packed, "scales": linear.scales}
    weight = weight_of(number, module)
    # CUDA's int4 packing tiles rows differently: it packs the whole weight at once.
    step = weight.shape[0] if device.type == "cuda" and mode == "int4" else _ROWS
    parts = [QuantizedLinear.from_weight(weight[r : r + step].to(device), mode, compute)
             for r in range(0, weight.shape[0], step)]  # fmt: skip
    return {
        "packed": torch.cat([part.packed for part in parts]),
        # int4 keeps its scales [groups, out, 2]: rows are the second dimension.
        "scales": torch.cat([part.scales for part in parts], dim=1 if mode == "int4" else 0),
    }
