"""Where each tensor of a model directory lives in its safetensors files, from the headers only.

Layer streaming reads a decoder layer's tensors at these offsets with positioned reads, and the
planner sizes the streamed model (resident parts, one layer, the staging buffer) from the same
index, so both agree on the numbers without importing torch or reading a weight. How a family's
tensors in the files map onto its layers' parameters (fused experts, MXFP4 pairs) is the family
provider's (``ollm/specialization``); this module names no family.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

# safetensors dtype -> bytes per element, for the floating dtypes a streamed layer may hold.
FLOATING_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# ... and for the packed (quantized) tensors held as they are stored (ollm/engine/packed_layers.py).
STORED_BYTES = {**FLOATING_BYTES, "U8": 1, "I8": 1, "I32": 4}
RUN_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_RUN_TO_SAFETENSORS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# Casting reads go through a staging buffer of at most this many bytes, a piece at a time, so the
# buffer stays small whatever the largest tensor is.
STAGING_CHUNK_BYTES = 16 * 2**20
# MXFP4 blocks are dequantized this many rows at a time (bounded temporaries: int64 codes, values).
MXFP4_ROWS = 256
# An MXFP4 tensor <name> is two in the files (gpt-oss's experts): its packed values and their scales.
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
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

    def index(self, number: int) -> TensorEntry:
        """``tensor[number]`` (one expert of a ``[experts, ...]`` tensor): contiguous in the file."""
        size = self.nbytes // self.shape[0]
        return TensorEntry(
            f"{self.name}[{number}]", self.file, self.offset + number * size, size, self.dtype, self.shape[1:]
        )


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder's part of a config.json: its ``text_config`` (image-text, audio-text), else itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


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
class Piece:
    """A tensor in the files that fills a parameter of a layer, or a part of one.

    ``expert`` selects ``param[expert]`` of a ``[experts, ...]`` parameter and ``row`` a first row in
    it (a fused gate/up parameter filled from separate gate and up tensors). With ``scales``, ``entry``
    holds MXFP4 blocks ``[rows, groups, 16]``; dequantized they are ``[rows, groups * 32]``, stored
    transposed (gpt-oss keeps its experts' inputs first).
    """

    entry: TensorEntry
    expert: int | None = None
    row: int = 0
    scales: TensorEntry | None = None

    def read_bytes(self) -> int:
        return self.entry.nbytes + (self.scales.nbytes if self.scales else 0)


@dataclass(frozen=True)
class LayerParam:
    """One parameter of a decoder layer: its shape in the model and the pieces that fill it.

    ``stored`` names the safetensors dtype of a tensor held as it is stored (a quantized layer's
    packed values and scales); None: the parameter is in the run dtype."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    experts: int = 0  # > 0: dim 0 indexes experts, and a piece fills one expert's slice
    stored: str | None = None

    def run_bytes(self, dtype: str) -> int:
        return prod(self.shape) * (STORED_BYTES[self.stored] if self.stored else RUN_BYTES[dtype])

    def needs_staging(self, piece: Piece, dtype: str, device: str) -> bool:
        """A piece read straight into its parameter needs no staging: same dtype, on the host."""
        return device != "cpu" or piece.entry.dtype != (self.stored or _RUN_TO_SAFETENSORS[dtype])


LayerParams = dict[str, LayerParam]  # name within the layer -> parameter


@dataclass(frozen=True)
class LayerLayout:
    """A decoder's tensors split into what stays resident and what streams, one dict per layer.

    Layers of one shape (the same parameter names and shapes) share a set of slots; a hybrid model
    (qwen3-next's linear- and full-attention layers) has one set per kind of layer. Expert
    parameters (``LayerParam.experts``) are not in the slots when experts are offloaded: only the
    experts the router picks are read, at each forward.
    """

    resident: dict[str, TensorEntry]  # full names: embeddings, final norm, untied head, small modules
    layers: list[LayerParams]
    experts_per_token: int = 0  # the router's top-k, for MoE layouts
    layers_module: str = "model.layers"  # where the decoder layers are in the model
    # Encoders read when they run and dropped after (module name -> its tensors, by name within it).
    on_demand: dict[str, dict[str, TensorEntry]] = field(default_factory=dict)

    def resident_bytes(self, dtype: str) -> int:
        return sum(entry.run_bytes(dtype) for entry in self.resident.values())

    def on_demand_bytes(self, dtype: str) -> int:
        """The largest on-demand module: the most of them held at once (one runs at a time)."""
        return max((sum(e.run_bytes(dtype) for e in m.values()) for m in self.on_demand.values()), default=0)

    def slot_params(self, number: int, offload_experts: bool) -> LayerParams:
        """What a slot holds of layer ``number``: its parameters, the experts left out when offloaded."""
        return {name: p for name, p in self.layers[number].items() if not (offload_experts and p.experts)}

    def signature(self, number: int, offload_experts: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """The slot-bound parameters' names and shapes: layers with the same one share slots."""
        return tuple((name, p.shape) for name, p in sorted(self.slot_params(number, offload_experts).items()))

    def kinds(self, offload_experts: bool) -> dict[tuple[tuple[str, tuple[int, ...]], ...], list[int]]:
        """The layers of each shape, in order."""
        kinds: dict[tuple[tuple[str, tuple[int, ...]], ...], list[int]] = {}
        for number in range(len(self.layers)):
            kinds.setdefault(self.signature(number, offload_experts), []).append(number)
        return kinds

    def layer_bytes(self, dtype: str, offload_experts: bool) -> int:
        """One slot of each kind of layer (the experts left out when they are offloaded)."""
        return self.slot_bytes(dtype, 1, offload_experts)

    def slot_bytes(self, dtype: str, slots: int, offload_experts: bool) -> int:
        """Every slot: ``slots`` of each kind of layer (fewer when a kind has fewer layers)."""
        total = 0
        for numbers in self.kinds(offload_experts).values():
            one = sum(p.run_bytes(dtype) for p in self.slot_params(numbers[0], offload_experts).values())
            total += min(slots, len(numbers)) * one
        return total

    def files(self) -> set[Path]:
        """Every file a tensor of the layout is in: the files streaming keeps open."""
        entries = [*self.resident.values(), *(e for module in self.on_demand.values() for e in module.values())]
        for layer in self.layers:
            for param in layer.values():
                for piece in param.pieces:
                    entries += [piece.entry] + ([piece.scales] if piece.scales else [])
        return {entry.file for entry in entries}

    def has_experts(self) -> bool:
        return any(p.experts for layer in self.layers for p in layer.values())

    def expert_bytes(self, dtype: str) -> int:
        """Every expert parameter of the model in ``dtype`` (what expert offload leaves on disk)."""
        return sum(p.run_bytes(dtype) for layer in self.layers for p in layer.values() if p.experts)

    def expert_buffer_bytes(self, dtype: str) -> int:
        """The most one forward holds of read experts: every expert of the largest layer (a long prefill)."""
        return max((sum(p.run_bytes(dtype) for p in layer.values() if p.experts) for layer in self.layers), default=0)

    def expert_bytes_per_token(self, dtype: str) -> int:
        """Expert bytes one decoded token reads: the router's top-k experts of every layer."""
        total = 0
        for layer in self.layers:
            for p in layer.values():
                if p.experts:
                    total += self.experts_per_token * p.run_bytes(dtype) // p.experts
        return total

    def staging_bytes(self, dtype: str, device: str) -> int:
        """Reused read buffers: the largest piece that must be cast or copied to a device (at most a
        chunk); an MXFP4 piece is read whole with its scales and dequantized a few rows at a time."""
        cast, mxfp4 = [0], [0]
        for layer in self.layers:
            for param in layer.values():
                for piece in param.pieces:
                    if piece.scales is not None:
                        rows, groups = min(piece.entry.shape[0], MXFP4_ROWS), piece.entry.shape[1]
                        # The blocks and scales, then per chunk of rows: an int64 index a byte, and the values twice.
                        mxfp4.append(piece.read_bytes() + rows * groups * (16 * 8 + 32 * 2 * RUN_BYTES[dtype]))
                    elif param.needs_staging(piece, dtype, device):
                        cast.append(piece.entry.nbytes)
        cast += [e.nbytes for m in self.on_demand.values() for e in m.values() if e.needs_staging(dtype, device)]
        return min(max(cast), STAGING_CHUNK_BYTES) + max(mxfp4)


LayerParamsOf = Callable[[dict[str, TensorEntry], dict[str, Any]], "LayerParams | str"]


def direct_params(layer: dict[str, TensorEntry], experts: str | None = None) -> LayerParams | str:
    """Each tensor fills the parameter of its name; those under ``experts`` are ``[experts, ...]``."""
    params: LayerParams = {}
    for suffix, entry in layer.items():
        if entry.dtype not in FLOATING_BYTES:
            return f"{entry.name} is {entry.dtype}; only floating tensors (and MXFP4 experts) stream"
        if experts is not None and suffix.startswith(experts + "."):
            count = entry.shape[0]
            pieces = tuple(Piece(entry.index(e), expert=e) for e in range(count))
            params[suffix] = LayerParam(entry.shape, pieces, experts=count)
        else:
            params[suffix] = LayerParam(entry.shape, (Piece(entry),))
    return params


# Where a checkpoint's decoder layers are: a causal LM's, or the language model inside an image-text
# (gemma3, llava) or audio-text (voxtral) model. Whatever is outside the layers stays resident.
DECODER_PREFIXES = ("model.layers.", "model.language_model.layers.", "language_model.model.layers.")


def decoder_layout(
    entries: dict[str, TensorEntry],
    config: dict[str, Any],
    layer_params: LayerParamsOf,
    experts_per_token: int = 0,
    on_demand: tuple[str, ...] = (),
) -> LayerLayout | str:
    """The streaming layout of a decoder checkpoint, or why it has none (a sentence for the plan).

    ``layer_params`` is the family's map from a layer's tensors in the files to its parameters;
    tensors under an ``on_demand`` module (an image or audio encoder) are read when it runs."""
    text = text_config(config)
    try:
        count = int(text["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        return "config.json has no num_hidden_layers"
    prefix = next((p for p in DECODER_PREFIXES if any(name.startswith(p) for name in entries)), None)
    if prefix is None:
        return f"no decoder layers under {list(DECODER_PREFIXES)}"
    layers: list[dict[str, TensorEntry]] = [{} for _ in range(count)]
    resident: dict[str, TensorEntry] = {}
    modules: dict[str, dict[str, TensorEntry]] = {module: {} for module in on_demand}
    for name, entry in entries.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name.startswith(prefix):
            index, _, suffix = name[len(prefix) :].partition(".")
            if not index.isdigit() or int(index) >= count:
                return f"tensor {name} belongs to no layer of the {count} in config.json"
            layers[int(index)][suffix] = entry
        elif module := next((m for m in on_demand if name.startswith(m + ".")), None):
            modules[module][name[len(module) + 1 :]] = entry
        else:
            resident[name] = entry
    tied = config.get("tie_word_embeddings")
    tied = bool(text.get("tie_word_embeddings", False) if tied is None else tied)
    heads = [name for name in resident if name.endswith("lm_head.weight")]
    base = prefix[: -len("layers.")]
    needed = {base + "embed_tokens.weight", base + "norm.weight"} | (set() if tied else set(heads[:1]))
    if tied:
        for head in heads:
            del resident[head]  # the head is the embeddings' matrix
    if not needed <= set(resident) or (not tied and not heads):
        missing = sorted(needed - set(resident)) + ([] if tied or heads else ["lm_head.weight"])
        return f"not a decoder's layout outside the layers (missing {missing})"
    for name, entry in [*resident.items(), *((n, e) for m in modules.values() for n, e in m.items())]:
        if entry.dtype not in FLOATING_BYTES:
            return f"{name} is {entry.dtype}; only floating tensors stay resident"
    params: list[LayerParams] = []
    kinds = text.get("layer_types") or ["full_attention"] * count
    first: dict[str, int] = {}  # the first layer of each kind: the others must have its parameters
    for number, layer in enumerate(layers):
        mapped = layer_params(layer, text)
        if isinstance(mapped, str):
            return f"layer {number}: {mapped}"
        like = first.setdefault(kinds[number], number)
        want = {name: p.shape for name, p in params[like].items()} if like != number else None
        have = {name: p.shape for name, p in mapped.items()}
        if want is not None and have != want:
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            changed = sorted(name for name in set(want) & set(have) if want[name] != have[name])
            return (
                f"layer {number} is not like layer {like}, the first {kinds[number]} layer "
                f"(missing {missing}, unexpected {extra}, other shapes {changed})"
            )
        params.append(mapped)
    return LayerLayout(
        resident=resident,
        layers=params,
        experts_per_token=experts_per_token,
        layers_module=prefix[:-1],
        on_demand={module: tensors for module, tensors in modules.items() if tensors},
    )
