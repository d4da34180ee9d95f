"""The memory budget and what a model will cost under it, read from config files and safetensors headers.

Nothing here loads weights: the weights' size comes from the safetensors headers (each tensor's
shape, counted in the run dtype), the KV cache and activations from config.json. docs/memory.md
explains the formulas and how to choose a budget.
"""

from __future__ import annotations

import re
from math import prod
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ollm.errors import SettingsError
from ollm.tensor_index import MXFP4_BLOCKS, MXFP4_SCALES, RUN_BYTES, read_header, text_config

DTYPE_BYTES = RUN_BYTES
# safetensors dtype -> bytes per element; floating tensors are cast to the run dtype on load.
_SAFETENSORS_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
}  # fmt: skip
_FLOATING = {"F64", "F32", "F16", "BF16"}
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# What `auto` leaves to the rest of the system: a tenth of what is free, at least this much.
AUTO_MARGIN_MIN = 256 * 2**20

# resident: everything fits. resident-capped-kv: the weights fit under an explicit budget, the full
# context's KV cache does not, so the engine admits only as many KV tokens as fit. streamed-layers:
# the decoder layers stream from disk (llama.layer-offload) and the rest fits; streamed-layers-capped-kv:
# streamed, and the KV cache capped as above. kv-offload: the KV cache lives on disk (host memory on
# an accelerator), one layer's in memory at a time (llama.kv-offload), and the rest fits;
# streamed-layers-kv-offload: both. over-budget: nothing applicable brings the estimate under the
# budget: loading refuses under an explicit budget and runs anyway (reported) under auto.
MemoryStrategy = Literal[
    "resident",
    "resident-capped-kv",
    "streamed-layers",
    "streamed-layers-capped-kv",
    "kv-offload",
    "streamed-layers-kv-offload",
    "over-budget",
    "unknown",
]


def parse_size(value: int | str, setting: str = "runtime.memory_budget") -> int | Literal["auto"]:
    """``"auto"``, a byte count, or a size such as ``512MiB``, ``8GiB``, ``1.5GB`` -> bytes."""
    if isinstance(value, bool):
        raise SettingsError(f"{setting}: expected a size such as 8GiB, not a boolean")
    if isinstance(value, int):
        if value <= 0:
            raise SettingsError(f"{setting}: {value} must be positive (or auto)")
        return value
    text = value.strip()
    if text.lower() == "auto":
        return "auto"
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise SettingsError(f"{setting}: {value!r} is not a size; use auto, a byte count, or e.g. 512MiB, 8GiB, 6GB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise SettingsError(f"{setting}: {value!r} must be positive (or auto)")
    return size


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def available_bytes(device: str) -> int:
    """What the compute device has free now: host RAM for cpu, the device's free memory for cuda."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    # mps shares host memory.
    return int(psutil.virtual_memory().available)


def resolve_budget(setting: int | str, device: str) -> tuple[int, str]:
    """The budget in bytes and where it came from, in words for the plan."""
    parsed = parse_size(setting)
    if parsed != "auto":
        return parsed, "runtime.memory_budget"
    free = available_bytes(device)
    margin = max(AUTO_MARGIN_MIN, free // 10)
    budget = max(free - margin, 0)
    return budget, f"auto: {human(free)} free on {device} less a margin of {human(margin)}"


# Spare columns every row's full-attention KV is allocated with, so a decode step writes in place
# instead of copying the cache (ollm/engine/slack_layer.py).
FULL_ATTENTION_SLACK = 32

# Weight-only quantization (runtime.quantization, ollm/engine/quantize.py): int4 groups of this many
# inputs; torch's int4 CPU packing tiles 16 output rows by 32 inputs.
INT4_GROUP = 32
_INT4_TILE = (16, 32)
_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def quantizable(shape: tuple[int, ...], mode: str) -> bool:
    """Whether a ``[out, in]`` weight fits the packed kernel's tiling (others stay in the run dtype)."""
    if mode == "none" or len(shape) != 2:
        return False
    if mode == "int4":
        return shape[0] % _INT4_TILE[0] == 0 and shape[1] % _INT4_TILE[1] == 0
    return True


def packed_bytes(shape: tuple[int, int], mode: str, dtype: str) -> int:
    """Bytes a quantized ``[out, in]`` weight holds: packed values plus its scales (and zeros) in ``dtype``."""
    out_features, in_features = shape
    if mode == "int8":
        return out_features * in_features + out_features * DTYPE_BYTES[dtype]
    if mode == "int4":
        return out_features * in_features // 2 + 2 * out_features * (in_features // INT4_GROUP) * DTYPE_BYTES[dtype]
    return out_features * in_features * DTYPE_BYTES[dtype]


def quantization_saved_bytes(path: Path, dtype: str, mode: str) -> int:
    """What ``runtime.quantization`` saves: the decoder layers' 2-D weights in ``dtype`` less their packed size."""
    saved = 0
    for file in sorted(path.glob("*.safetensors")):
        for name, entry in read_header(file)[0].items():
            shape = tuple(entry.get("shape") or ())
            if name.endswith(".weight") and _DECODER_LAYER.search(name) and quantizable(shape, mode):
                out_features, in_features = shape
                saved += out_features * in_features * DTYPE_BYTES[dtype] - packed_bytes(
                    (out_features, in_features), mode, dtype
                )
    return saved


def safetensors_weight_bytes(path: Path, dtype: str) -> int | None:
    """Bytes the weights take once loaded in ``dtype``, from the headers of ``path``'s *.safetensors.

    None when the directory holds no safetensors files (the estimate is then unknown, not zero).
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    run_bytes = DTYPE_BYTES[dtype]
    total = 0
    for file in files:
        for name, entry in read_header(file)[0].items():
            if name == "__metadata__":
                continue
            kind = entry["dtype"]
            size = run_bytes if kind in _FLOATING else _SAFETENSORS_BYTES.get(kind, 4)
            if name.endswith(MXFP4_BLOCKS) and kind == "U8":
                size = 2 * run_bytes  # two 4-bit values a byte, dequantized on load (gpt-oss experts)
            elif name.endswith(MXFP4_SCALES) and kind == "U8":
                size = 0  # folded into the dequantized values
            total += prod(entry["shape"]) * size
    return total


class TextShape(BaseModel):
    """The decoder's dimensions that the KV cache and activations scale with."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    # Layers by cache kind (config.json's layer_types): full attention holds the whole context,
    # sliding-window attention at most ``window`` tokens, linear attention a fixed state.
    sliding_layers: int = 0
    window: int = 0
    linear_layers: int = 0
    linear_state: int = 0  # elements of one linear-attention layer's state per sequence

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TextShape | None:
        text = text_config(config)
        try:
            layers = int(text["num_hidden_layers"])
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            intermediate = int(text.get("intermediate_size") or 4 * hidden)
            kv_heads = int(text.get("num_key_value_heads") or heads)
            head_dim = int(text.get("head_dim") or hidden // heads)
            vocab = int(text.get("vocab_size") or config.get("vocab_size") or 0)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        kinds = text.get("layer_types") or []
        window = int(text.get("sliding_window") or 0)
        return cls(
            layers=layers,
            hidden=hidden,
            intermediate=intermediate,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            sliding_layers=kinds.count("sliding_attention") if window else 0,
            window=window,
            linear_layers=kinds.count("linear_attention"),
            linear_state=_linear_state(text),
        )

    @property
    def full_layers(self) -> int:
        return self.layers - self.sliding_layers - self.linear_layers

    def kv_bytes(self, tokens: int, dtype: str) -> int:
        """One sequence of ``tokens``: keys and values of every attention layer and KV head (a
        sliding layer's at most its window), plus each linear-attention layer's fixed state."""
        return sum(self.kv_bytes_by_kind(tokens, dtype).values())

    def kv_bytes_by_kind(self, tokens: int, dtype: str, spare: int = 0) -> dict[str, int]:
        """``kv_bytes`` by layer kind (the names of config.json's layer_types), kinds present only;
        ``spare``: the columns a full layer in memory holds beyond its tokens (FULL_ATTENTION_SLACK)."""
        per_column = 2 * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]
        per_layer = {
            "full_attention": (self.full_layers, (tokens + spare if tokens else 0) * per_column),
            "sliding_attention": (self.sliding_layers, min(tokens, self.window) * per_column),
            "linear_attention": (self.linear_layers, self.linear_state * DTYPE_BYTES[dtype]),
        }
        return {kind: count * size for kind, (count, size) in per_layer.items() if count}

    def activation_bytes(self, prefill_tokens: int, context: int, chunk_rows: int, batch: int, dtype: str) -> int:
        """The largest transient set of one forward: a prefill chunk of ``prefill_tokens`` tokens."""
        size = DTYPE_BYTES[dtype]
        rows = min(prefill_tokens, chunk_rows) if chunk_rows else prefill_tokens
        residual = 4 * prefill_tokens * self.hidden * size  # hidden states, norm output, attention output
        qkv = prefill_tokens * (self.heads + 2 * self.kv_heads) * self.head_dim * size
        mlp = 3 * rows * self.intermediate * size  # gate, up and their product, per chunk of rows
        # An attention kernel that materializes the scores holds [heads x tokens x context]; counted
        # so the estimate stays an upper bound whichever SDPA path torch picks.
        scores = self.heads * prefill_tokens * context * size
        logits = batch * self.vocab * 4  # the last position's logits, upcast to float32 for sampling
        return residual + qkv + max(mlp, scores) + logits


def _linear_state(text: dict[str, Any]) -> int:
    """Elements of a gated-delta-net layer's state (qwen3-next): its conv window and recurrent matrix."""
    try:
        key_heads, value_heads = int(text["linear_num_key_heads"]), int(text["linear_num_value_heads"])
        key_dim, value_dim = int(text["linear_key_head_dim"]), int(text["linear_value_head_dim"])
        kernel = int(text["linear_conv_kernel_dim"])
    except (KeyError, TypeError, ValueError):
        return 0
    conv = (2 * key_heads * key_dim + value_heads * value_dim) * kernel
    return conv + value_heads * key_dim * value_dim


class MemoryPlan(BaseModel):
    """What the plan expects a model to cost, against the budget. Sizes are bytes."""

    budget_bytes: int | None = Field(None, description="The budget the estimate is held against.")
    budget_source: str | None = None
    weights_bytes: int | None = Field(
        None,
        description="Weights in the run dtype, from the safetensors headers; quantized layers at their packed size.",
    )
    quantization_saved_bytes: int | None = Field(
        None, description="What runtime.quantization saves: the quantized weights in the run dtype less packed."
    )
    kv_cache_tokens: int | None = Field(None, description="Tokens of KV cache the estimate covers.")
    kv_cache_bytes: int | None = None
    kv_cache_bytes_by_layer_kind: dict[str, int] | None = Field(
        None,
        description="kv_cache_bytes by layer kind: full attention holds the context, sliding-window attention its "
        "window, linear attention a fixed state per sequence.",
    )
    activations_bytes: int | None = Field(None, description="The largest transient set of one forward.")
    expected_peak_bytes: int | None = Field(
        None, description="Weights held at once + KV cache (capped when capped) + activations."
    )
    strategy: MemoryStrategy = "unknown"
    required_passes: list[str] = Field(
        default_factory=list, description="Passes that would keep the peak under the budget."
    )
    layer_streaming: bool = Field(False, description="Decoder layers stream from disk (llama.layer-offload).")
    resident_weights_bytes: int | None = Field(
        None, description="Streaming: what stays loaded (embeddings, final norm, an untied head)."
    )
    layer_bytes: int | None = Field(
        None, description="Streaming: one decoder layer of each kind in the run dtype, experts left out when offloaded."
    )
    stream_slots: int | None = Field(
        None, description="Streaming: layer buffers of each kind of layer (one computes, one fills)."
    )
    slots_bytes: int | None = Field(None, description="Streaming: every layer buffer (a set per kind of layer).")
    encoder_bytes: int | None = Field(
        None, description="Streaming: the image or audio encoder, read when it runs (once a request) and dropped after."
    )
    expert_offload: bool = Field(
        False, description="Mixture-of-experts layers read only the experts the router picks (<family>.expert-offload)."
    )
    experts_bytes: int | None = Field(None, description="Expert offload: every expert, left on disk.")
    expert_buffer_bytes: int | None = Field(
        None, description="Expert offload: the most read at once (every expert of one layer, on a long prefill)."
    )
    expert_cache_bytes: int | None = Field(
        None,
        description="Expert offload: the first experts used, kept ready (dequantized) in what the budget has room "
        "for beside the rest, less a margin; counted in expected_peak_bytes.",
    )
    expert_bytes_per_token: int | None = Field(
        None, description="Expert offload: bytes one decoded token reads (the router's top-k of every layer)."
    )
    staging_bytes: int | None = Field(None, description="Streaming: the reused read buffer for casting reads.")
    weights_in_memory_bytes: int | None = Field(
        None, description="Weights held at once: all of them, or resident + slots x layer + staging when streaming."
    )
    kv_offload: bool = Field(
        False,
        description="The KV cache lives on disk (host memory on an accelerator), one layer's in memory at a "
        "time (llama.kv-offload); kv_resident_bytes is what stays in memory.",
    )
    kv_cache_token_limit: int | None = Field(
        None, description="KV tokens the budget leaves room for beside the weights, when fewer than the context."
    )
    kv_resident_bytes: int | None = Field(
        None,
        description="With llama.kv-offload: the KV cache held in memory at once, the running layer's (read back, "
        "handed to attention, expanded to every query head); kv_cache_bytes then lives on disk "
        "(host memory on an accelerator).",
    )
    batch_state_bytes: int | None = Field(
        None,
        description="What the other max_batch - 1 sequences hold whatever their length (a linear-attention "
        "layer's whole state); counted in expected_peak_bytes, beside kv_cache_bytes for one request.",
    )
    fits: bool | None = None
    enforced: bool = Field(False, description="True for an explicit budget: loading refuses to exceed it.")
    reason: str | None = None

    def refuses_load(self) -> bool:
        """The weights and one forward alone exceed an explicit budget: running resident would break it."""
        return self.enforced and self.kv_cache_token_limit == 0


def kv_offload_wanted(
    memory: MemoryPlan, setting: Literal["auto", "on", "off"], held_weights: int, resident_kv_bytes: int
) -> bool:
    """Whether to keep the KV cache off the compute device's memory (``runtime.kv_offload``).

    ``on``/``off`` decide. ``auto`` offloads when the plan's expected peak (the weights held + the
    context's KV cache + activations) exceeds the budget and offloading brings it under: the weights
    held + activations + ``resident_kv_bytes`` (the KV that stays in memory with offload) fit. When
    even that does not fit, the weights are the problem; the plan then says what would keep it under.
    """
    if setting != "auto":
        return setting == "on"
    activations, budget = memory.activations_bytes, memory.budget_bytes
    if memory.fits is not False or activations is None or budget is None:
        return False
    return held_weights + activations + resident_kv_bytes <= budget
