"""Where a streamed model's quantized projections live: the packed file and its layout (no torch).

With ``runtime.quantization`` and layer streaming together, the decoder layers' projections are
quantized once into a file beside the checkpoint (``ollm/engine/packed_layers.py`` writes it) and
layer streaming reads their packed values and scales as they are stored, straight into the layer
slots. This module says what that file holds and where (the header is a function of the layout,
so the planner sizes the slots from it without the file existing), so the plan and the loader
count the same bytes.

The file is safetensors: a header, then each layer's packed tensors in order. Its metadata names
the checkpoint's files with their sizes and times, so a changed checkpoint does not match it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ollm.memory import INT4_GROUP, quantizable
from ollm.settings import Quantization
from ollm.tensor_index import STORED_BYTES, LayerLayout, LayerParam, LayerParams, Piece, TensorEntry

PACKED_DIR = ".ollm-packed"  # inside the model directory: its *.safetensors glob does not see it
_FORMAT = "1"
# torch's int4 packing works on tiles of this many groups of 16 inputs (ollm/engine/quantize.py).
INT4_INNER_K_TILES = 2
_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def compute_dtype_name(run_dtype: str, device_type: str) -> str:
    """The activations' dtype in torch's packed kernels: bfloat16 on CPU (only it is vectorized
    there, docs/benchmarks.md), else the run dtype."""
    return "bfloat16" if device_type == "cpu" else run_dtype


def packed_path(model_dir: Path, mode: Quantization, device_type: str, compute: str) -> Path:
    """The packed file of ``model_dir`` for one quantization, device kind and compute dtype."""
    return model_dir / PACKED_DIR / f"{mode}-{device_type}-{compute}.safetensors"


def packed_tensors(
    shape: tuple[int, ...], mode: Quantization, device_type: str, compute: str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """What ``QuantizedLinear`` holds for an ``[out, in]`` weight: attribute -> (shape, safetensors dtype)."""
    out_features, in_features = shape
    scale = _SAFETENSORS[compute]
    if mode == "int8":
        return {"packed": ((out_features, in_features), "I8"), "scales": ((out_features,), scale)}
    packed: tuple[tuple[int, ...], str]
    if device_type == "cuda":
        tiles = in_features // (16 * INT4_INNER_K_TILES)
        packed = ((out_features // 8, tiles, 32, INT4_INNER_K_TILES // 2), "I32")
    else:
        packed = ((out_features, in_features // 2), "U8")
    return {"packed": packed, "scales": ((in_features // INT4_GROUP, out_features, 2), scale)}


def quantized_projections(layer: LayerParams, mode: Quantization) -> list[str]:
    """The projections (``self_attn.q_proj``) of a layer whose weight ``mode`` packs: 2-D weights
    that fit the kernel, experts excepted (they are fused 3-D tensors, never packed)."""
    return [
        name.removesuffix(".weight")
        for name, param in layer.items()
        if name.endswith(".weight") and not param.experts and quantizable(param.shape, mode)
    ]


def packed_header(
    layout: LayerLayout,
    projections: list[list[str]],
    mode: Quantization,
    device_type: str,
    compute: str,
    source: str,
) -> bytes:
    """The packed file's header (length prefix included): ``layers.<n>.<projection>.<attribute>``
    for each layer's ``projections``, in order; ``source`` fingerprints the checkpoint."""
    header: dict[str, object] = {
        "__metadata__": {"ollm_packed": _FORMAT, "mode": mode, "device": device_type, "compute": compute,
                         "source": source},  # fmt: skip
    }
    offset = 0
    for number, names in enumerate(projections):
        for module in names:
            weight = layout.layers[number][f"{module}.weight"]
            for attribute, (shape, dtype) in packed_tensors(weight.shape, mode, device_type, compute).items():
                size = STORED_BYTES[dtype]
                for dim in shape:
                    size *= dim
                header[f"layers.{number}.{module}.{attribute}"] = {
                    "dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size],
                }  # fmt: skip
                offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text


def packed_layout(layout: LayerLayout, file: Path, header: bytes, projections: list[list[str]]) -> LayerLayout:
    """``layout`` with each projection's weight replaced by its packed tensors in ``file``."""
    tensors = json.loads(header[8:])
    layers: list[LayerParams] = []
    for number, params in enumerate(layout.layers):
        names = set(projections[number])
        layer = {name: param for name, param in params.items() if name.removesuffix(".weight") not in names}
        for module in projections[number]:
            for attribute in ("packed", "scales"):
                name = f"{module}.{attribute}"
                spec = tensors[f"layers.{number}.{name}"]
                begin, end = spec["data_offsets"]
                shape = tuple(spec["shape"])
                entry = TensorEntry(name, file, len(header) + begin, end - begin, spec["dtype"], shape)
                layer[name] = LayerParam(shape, (Piece(entry),), stored=spec["dtype"])
        layers.append(layer)
    return replace(layout, layers=layers)


def source_fingerprint(files: set[Path]) -> str:
    """The checkpoint's files (names, sizes, modification times): a packed file of other files is stale."""
    stats = [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in sorted(files)]
    return json.dumps(stats, separators=(",", ":"))


def planned_packed_layout(
    model_dir: Path, layout: LayerLayout, mode: Quantization, run_dtype: str, device_type: str
) -> LayerLayout:
    """What the plan streams with ``mode``: every quantizable projection packed (the loader packs
    the same ones, less any that is not an ``nn.Linear`` in the model)."""
    compute = compute_dtype_name(run_dtype, device_type)
    projections = [quantized_projections(layer, mode) for layer in layout.layers]
    header = packed_header(layout, projections, mode, device_type, compute, "")
    return packed_layout(layout, packed_path(model_dir, mode, device_type, compute), header, projections)
