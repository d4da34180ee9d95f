"""GGUF Q4_1 tensors straight into int4 ``QuantizedLinear`` layers, without a float copy of the weight.

Q4_1 stores blocks of 32 weights as ``d`` (float16), ``m`` (float16) and 32 4-bit values ``q``
(element i in the low nibble of byte i, element i + 16 in its high nibble), meaning
``w = d * q + m``. torch's int4 kernels compute ``(q - 8) * scale + zero`` per group of 32, so
``scale = d`` and ``zero = m + 8 d`` give the same weights: the bits the publisher chose run as
they are. Only llama-family GGUFs are read (their tensor names and q/k row order below).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ollm.engine.quantize import QuantizedLinear
from ollm.memory import INT4_GROUP, quantizable

# GGUF tensor name inside blk.N -> the attribute path inside a Transformers llama decoder layer.
_LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_Q4_1_BLOCK_BYTES = 2 + 2 + INT4_GROUP // 2


def find_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a pull kept beside the converted checkpoint (ollm/pull.py), if any."""
    files = sorted(model_dir.glob("*.gguf"))
    return files[0] if files else None


def int4_gguf(model_dir: Path, model_type: str | None) -> Path | None:
    """The GGUF whose Q4_1 bits int4 runs as they are: a kept one, for the llama family (the only
    one whose GGUF tensor names and row order are read here)."""
    return find_gguf(model_dir) if model_type == "llama" else None


def q4_1_to_int4(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_1 rows ``[out, in / 32 * 20]`` (uint8) -> values int32 ``[out, in]``, scale and zero
    float32 ``[out, in / 32]`` such that ``(values - 8) * scale + zero`` is the Q4_1 weight."""
    rows = blocks.shape[0]
    block = blocks.reshape(rows, -1, _Q4_1_BLOCK_BYTES)
    d = torch.from_numpy(np.ascontiguousarray(block[..., 0:2]).view(np.float16)[..., 0].astype(np.float32))
    m = torch.from_numpy(np.ascontiguousarray(block[..., 2:4]).view(np.float16)[..., 0].astype(np.float32))
    packed = torch.from_numpy(np.ascontiguousarray(block[..., 4:]))
    values = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(rows, -1).to(torch.int32)
    return values, d, m + 8 * d


def _unpermute_rows(heads: int) -> Any:
    """llama.cpp's converter interleaves q/k rows for its rope; Transformers' order is this permutation of them
    (the row form of transformers' LlamaTensorProcessor._reverse_permute_weights)."""

    def order(rows: int) -> torch.Tensor:
        half = rows // heads // 2
        return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)

    return order


Int4Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # values, scale, zero (q4_1_to_int4)


def q4_1_projections(gguf_file: Path, config: Any) -> dict[tuple[int, str], Callable[[], Int4Parts]]:
    """The GGUF's Q4_1 decoder projections by (layer, Transformers projection such as
    ``self_attn.q_proj``), each converted when called (in Transformers' row order for q and k)."""
    from gguf import GGMLQuantizationType, GGUFReader

    found: dict[tuple[int, str], Callable[[], Int4Parts]] = {}
    for tensor in GGUFReader(gguf_file).tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LLAMA_NAMES:
            continue
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(parts[2])

        def convert(data: Any = tensor.data, heads: int | None = heads) -> Int4Parts:
            values, scale, zero = q4_1_to_int4(np.asarray(data))
            if heads is None:
                return values, scale, zero
            order = _unpermute_rows(heads)(values.shape[0])
            return values[order], scale[order], zero[order]

        found[int(parts[1]), _LLAMA_NAMES[parts[2]]] = convert
    return found


def load_gguf_int4(model: Any, gguf_file: Path, dtype: torch.dtype) -> int:
    """Replace every decoder projection whose GGUF tensor is Q4_1 with an int4 ``QuantizedLinear``
    built from the file's bits, computing in ``dtype``; returns how many were replaced (others keep
    their loaded weights)."""
    layers = model.get_decoder().layers
    replaced = 0
    for (number, name), convert in q4_1_projections(gguf_file, model.config).items():
        parent_path, _, attribute = name.rpartition(".")
        parent = layers[number].get_submodule(parent_path)
        linear = getattr(parent, attribute)
        if not quantizable(tuple(linear.weight.shape), "int4") or linear.bias is not None:
            continue
        values, scale, zero = convert()
        check_gguf_shape(gguf_file, number, name, tuple(values.shape), tuple(linear.weight.shape))
        quantized = QuantizedLinear.from_int4(values.to(linear.weight.device), scale, zero, dtype)
        setattr(parent, attribute, quantized.to(linear.weight.device))
        replaced += 1
    return replaced


def check_gguf_shape(
    gguf_file: Path, number: int, name: str, found: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    if found != expected:
        raise ValueError(
            f"{gguf_file.name}: layer {number}'s {name} is {found}, the checkpoint's is {expected}; "
            "the GGUF is not this model's"
        )
