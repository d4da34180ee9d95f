"""Where each tensor of a model directory lives in its safetensors files, from the headers only.

Layer streaming reads a decoder layer's tensors at these offsets with positioned reads, and the
planner sizes the streamed model (resident parts, one layer, the staging buffer) from the same
index, so both agree on the numbers without importing torch or reading a weight.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

# safetensors dtype -> bytes per element, for the floating dtypes a streamed layer may hold.
FLOATING_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
RUN_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_RUN_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
LAYER_PREFIX = "model.layers."
# Casting reads go through a staging buffer of at most this many bytes, a piece at a time, so the
# buffer stays small whatever the largest tensor is.
STAGING_CHUNK_BYTES = 16 * 2**20
# Every tensor a llama decoder layer holds; biases only when config.json asks for them.
_LLAMA_LAYER = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_ATTENTION_BIASES = tuple(f"self_attn.{p}_proj.bias" for p in "qkvo")
_MLP_BIASES = tuple(f"mlp.{p}_proj.bias" for p in ("gate", "up", "down"))
# Old checkpoints saved the rotary frequencies; they are recomputed from config.json.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    offset: int  # absolute, in bytes, from the start of the file
    nbytes: int
    dtype: str  # safetensors' name: F32, BF16...
    shape: tuple[int, ...]

    def run_bytes(self, dtype: str) -> int:
        return prod(self.shape) * RUN_BYTES[dtype]

    def needs_staging(self, dtype: str, device: str) -> bool:
        """A tensor read straight into its destination needs no staging: same dtype, on the host."""
        return device != "cpu" or self.dtype != _RUN_TO_SAFETENSORS[dtype]


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and where its data starts."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header: dict[str, Any] = json.loads(handle.read(length))
    return header, 8 + length


def index_tensors(path: Path) -> dict[str, TensorEntry]:
    """Every tensor in ``path``'s *.safetensors files, by name (empty when there are none)."""
    entries: dict[str, TensorEntry] = {}
    for file in sorted(path.glob("*.safetensors")):
        header, data_start = read_header(file)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            entries[name] = TensorEntry(name, file, data_start + begin, end - begin, entry["dtype"], shape)
    return entries


@dataclass(frozen=True)
class LayerLayout:
    """A decoder's tensors split into what stays resident and what streams, one dict per layer."""

    resident: dict[str, TensorEntry]  # full names: embeddings, final norm, untied head
    layers: list[dict[str, TensorEntry]]  # per layer: name within the layer -> entry

    def resident_bytes(self, dtype: str) -> int:
        return sum(entry.run_bytes(dtype) for entry in self.resident.values())

    def layer_bytes(self, dtype: str) -> int:
        """One slot: every layer has the same shapes (checked), so any layer's size."""
        return sum(entry.run_bytes(dtype) for entry in self.layers[0].values())

    def staging_bytes(self, dtype: str, device: str) -> int:
        """The reused read buffer: the largest piece of a tensor that must be cast or copied to a device."""
        sizes = [e.nbytes for layer in self.layers for e in layer.values() if e.needs_staging(dtype, device)]
        return min(max(sizes, default=0), STAGING_CHUNK_BYTES)


def llama_layout(entries: dict[str, TensorEntry], config: dict[str, Any]) -> LayerLayout | str:
    """The streaming layout of a llama checkpoint, or why it has none (a sentence for the plan)."""
    try:
        count = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return "config.json has no num_hidden_layers"
    expected = set(_LLAMA_LAYER)
    if config.get("attention_bias"):
        expected |= set(_ATTENTION_BIASES)
    if config.get("mlp_bias"):
        expected |= set(_MLP_BIASES)
    layers: list[dict[str, TensorEntry]] = [{} for _ in range(count)]
    resident: dict[str, TensorEntry] = {}
    for name, entry in entries.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name.startswith(LAYER_PREFIX):
            index, _, suffix = name[len(LAYER_PREFIX) :].partition(".")
            if not index.isdigit() or int(index) >= count:
                return f"tensor {name} belongs to no layer of the {count} in config.json"
            layers[int(index)][suffix] = entry
        else:
            resident[name] = entry
    tied = bool(config.get("tie_word_embeddings", False))
    needed = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tied else {"lm_head.weight"})
    if tied:
        resident.pop("lm_head.weight", None)  # the head is the embeddings' matrix
    if set(resident) != needed:
        missing, extra = sorted(needed - set(resident)), sorted(set(resident) - needed)
        return f"not the llama layout outside the layers (missing {missing}, unexpected {extra})"
    for number, layer in enumerate(layers):
        if set(layer) != expected:
            missing, extra = sorted(expected - set(layer)), sorted(set(layer) - expected)
            return f"layer {number} is not a llama decoder layer (missing {missing}, unexpected {extra})"
        for suffix, entry in layer.items():
            if entry.dtype not in FLOATING_BYTES:
                return f"{entry.name} is {entry.dtype}; only floating tensors stream"
            if entry.shape != layers[0][suffix].shape:
                return f"{entry.name} has shape {list(entry.shape)}, layer 0's has {list(layers[0][suffix].shape)}"
    return LayerLayout(resident=resident, layers=layers)
