"""The cache manager: owns every sequence's KV and state memory, one small class per layer kind.

The running batch shares one cache whose attention layers are left-padded to a common number of
**columns** (the batch's attention-mask length); a row's real tokens are its last columns. What a
layer holds for those columns depends on its kind:

- full attention (``SlackLayer``, which writes each step into spare columns, or ``OffloadedLayer``
  with KV offload): every column, plus the spare ones;
- sliding-window attention (``DynamicSlidingWindowLayer``; gemma3, gpt-oss): the last
  ``window - 1`` columns at most, so a long context costs memory only in the full layers;
- linear attention (``LinearAttentionLayer``; qwen3-next): a fixed-size conv and recurrent state per
  row, no columns at all. Padding in a prefill forward would pass through that state, so such
  models prefill each prompt in its own forward (``LayerKind.padded_prefill``).

Attention sinks (gpt-oss) and MoE feed-forwards live in the model's modules and need nothing here.

Each kind says how two batches' layers **join** (padded to the longer one, stacked on the batch
dimension), how a batch **keeps** some rows (finished sequences leave) and drops leading columns
nobody needs, and how many columns of a context a row holds (what admission counts). Adding a
layer kind is one subclass of ``LayerKind`` appended to ``LAYER_KINDS``; docs/engine.md shows one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

from ollm.engine.kv_offload import KVOffloadStore, OffloadedLayer, release
from ollm.engine.slack_layer import SlackLayer
from ollm.memory import FULL_ATTENTION_SLACK


def left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values (an offloaded layer's are read from its store, one layer at a time)."""
    if isinstance(layer, OffloadedLayer):
        return layer.load()
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _set_kv(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, OffloadedLayer):
        layer.store(keys, values)
    elif isinstance(layer, SlackLayer):
        layer.replace(keys, values)
    else:
        layer.keys, layer.values = keys, values


class LayerKind:
    """How the engine joins, narrows and counts one kind of cache layer."""

    name: ClassVar[str]
    layer_types: ClassVar[tuple[type, ...]]
    # False when padding in a prefill forward changes the layer's state (then prompts prefill alone).
    padded_prefill: ClassVar[bool] = True

    @classmethod
    def of(cls, layer: Any) -> LayerKind:
        """The kind for one layer of a fresh cache (a kind with parameters reads them here)."""
        return cls()

    def join(self, old: Any, new: Any, columns: int) -> None:
        """Make ``old`` hold its rows then ``new``'s, both left-padded to ``columns``."""
        raise NotImplementedError

    def keep(self, layer: Any, rows: torch.Tensor, first: int) -> None:
        """Keep only ``rows`` and drop the first ``first`` columns (padding for every kept row)."""
        raise NotImplementedError

    def columns_held(self, columns: int) -> int:
        """Columns of KV one row holds in this layer for a context of ``columns``."""
        raise NotImplementedError

    def nbytes(self, layer: Any) -> int:
        raise NotImplementedError


class FullAttention(LayerKind):
    name = "full_attention"
    layer_types = (DynamicLayer, SlackLayer, OffloadedLayer)

    def join(self, old: DynamicLayer, new: DynamicLayer, columns: int) -> None:
        (ok, ov), (nk, nv) = _kv(old), _kv(new)
        keys = torch.cat([left_pad(ok, columns, 2), left_pad(nk, columns, 2)])
        values = torch.cat([left_pad(ov, columns, 2), left_pad(nv, columns, 2)])
        _set_kv(old, keys, values)

    def keep(self, layer: DynamicLayer, rows: torch.Tensor, first: int) -> None:
        keys, values = _kv(layer)
        _set_kv(layer, keys.index_select(0, rows)[:, :, first:], values.index_select(0, rows)[:, :, first:])

    def __init__(self, slack: int = 0) -> None:
        self.slack = slack

    @classmethod
    def of(cls, layer: DynamicLayer) -> FullAttention:
        return cls(FULL_ATTENTION_SLACK if isinstance(layer, SlackLayer) else 0)

    def columns_held(self, columns: int) -> int:
        return columns + self.slack

    def nbytes(self, layer: DynamicLayer) -> int:
        if isinstance(layer, OffloadedLayer):
            return 0  # in the store's files, not in memory
        if isinstance(layer, SlackLayer):
            return layer.room_bytes()
        if layer.keys is None or layer.values is None:
            return 0
        return layer.keys.nbytes + layer.values.nbytes


class SlidingWindow(LayerKind):
    """Holds the last ``window - 1`` columns; its ``cumulative_length`` is the batch's column count.

    Transformers builds the sliding mask from ``cumulative_length`` (the offset into the batch's
    attention mask), so after a join or a trim it must equal the batch's columns again.
    """

    name = "sliding_attention"
    layer_types = (DynamicSlidingWindowLayer,)

    def __init__(self, window: int) -> None:
        self.window = window

    @classmethod
    def of(cls, layer: DynamicSlidingWindowLayer) -> SlidingWindow:
        return cls(layer.sliding_window)

    def join(self, old: DynamicSlidingWindowLayer, new: DynamicSlidingWindowLayer, columns: int) -> None:
        held = self.columns_held(columns)
        assert old.keys is not None and old.values is not None and new.keys is not None and new.values is not None
        old.keys = torch.cat([left_pad(old.keys, held, 2), left_pad(new.keys, held, 2)])
        old.values = torch.cat([left_pad(old.values, held, 2), left_pad(new.values, held, 2)])
        old.cumulative_length = columns

    def keep(self, layer: DynamicSlidingWindowLayer, rows: torch.Tensor, first: int) -> None:
        assert layer.keys is not None and layer.values is not None
        layer.cumulative_length -= first
        held = self.columns_held(layer.cumulative_length)
        layer.keys = layer.keys.index_select(0, rows)[:, :, -held:]
        layer.values = layer.values.index_select(0, rows)[:, :, -held:]

    def columns_held(self, columns: int) -> int:
        return min(columns, self.window - 1)

    def nbytes(self, layer: DynamicSlidingWindowLayer) -> int:
        if layer.keys is None or layer.values is None:
            return 0
        return layer.keys.nbytes + layer.values.nbytes


class LinearState(LayerKind):
    """A conv state and a recurrent state per row (qwen3-next's gated delta net): fixed size."""

    name = "linear_attention"
    layer_types = (LinearAttentionLayer,)
    padded_prefill = False

    def join(self, old: LinearAttentionLayer, new: LinearAttentionLayer, columns: int) -> None:
        for states in ("conv_states", "recurrent_states"):
            mine, theirs = getattr(old, states), getattr(new, states)
            for index, tensor in mine.items():
                if tensor is not None:
                    mine[index] = torch.cat([tensor, theirs[index]])

    def keep(self, layer: LinearAttentionLayer, rows: torch.Tensor, first: int) -> None:
        for states in (layer.conv_states, layer.recurrent_states):
            for index, tensor in states.items():
                if tensor is not None:
                    states[index] = tensor.index_select(0, rows)

    def columns_held(self, columns: int) -> int:
        return 0

    def nbytes(self, layer: LinearAttentionLayer) -> int:
        states = [*layer.conv_states.values(), *layer.recurrent_states.values()]
        return sum(t.nbytes for t in states if t is not None)


# Matched by exact type: DynamicSlidingWindowLayer and OffloadedLayer are DynamicLayers too.
LAYER_KINDS: tuple[type[LayerKind], ...] = (FullAttention, SlidingWindow, LinearState)


def kind_of(layer: object) -> LayerKind | None:
    kind = next((kind for kind in LAYER_KINDS if type(layer) in kind.layer_types), None)
    return kind.of(layer) if kind else None


def unsupported_layers(config: Any) -> str | None:
    """None when the engine knows every cache layer kind of a model with ``config``; else why not."""
    unknown = sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers if kind_of(layer) is None})
    if unknown:
        known = ", ".join(t.__name__ for kind in LAYER_KINDS for t in kind.layer_types)
        return f"cache layers {unknown} have no layer kind in ollm/engine/cache_manager.py (known: {known})"
    return None


class CacheManager:
    """Every cache of one engine: made, joined, narrowed, released and counted here."""

    def __init__(self, config: Any, kv_store: KVOffloadStore | None = None) -> None:
        self._config = config
        self._store = kv_store
        # The kinds of the layers new_cache makes (an offloaded cache's are read without making one).
        layers = DynamicCache(config=config).layers if kv_store is not None else self.new_cache().layers
        kinds = [kind_of(layer) for layer in layers]
        if None in kinds:
            raise ValueError(unsupported_layers(config))
        self._kinds: list[LayerKind] = [kind for kind in kinds if kind is not None]
        self.padded_prefill = all(kind.padded_prefill for kind in self._kinds)
        # The most memory each layer kind held at once, in bytes: what the engine really used.
        self.peak_bytes: dict[str, int] = {}

    def new_cache(self) -> DynamicCache:
        if self._store is not None:
            return self._store.new_cache(self._config)
        cache = DynamicCache(config=self._config)
        # Full-attention layers write each step in place (slack_layer.py) instead of concatenating.
        cache.layers = [SlackLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    def join(self, old: DynamicCache, new: DynamicCache, columns: int) -> None:
        """Append ``new``'s rows to ``old``, both left-padded to ``columns``; ``new`` is released."""
        for kind, a, b in zip(self._kinds, old.layers, new.layers, strict=True):
            kind.join(a, b, columns)
        release(new)
        self.count(old)

    def keep(self, cache: DynamicCache, rows: torch.Tensor, first: int) -> None:
        for kind, layer in zip(self._kinds, cache.layers, strict=True):
            kind.keep(layer, rows, first)

    def release(self, cache: DynamicCache) -> None:
        release(cache)

    def columns_held(self, columns: int) -> int:
        """Columns one row holds in its most expensive layer for a context of ``columns`` (admission's unit)."""
        return max(kind.columns_held(columns) for kind in self._kinds)

    def bytes_by_kind(self, cache: DynamicCache) -> dict[str, int]:
        totals: dict[str, int] = {}
        for kind, layer in zip(self._kinds, cache.layers, strict=True):
            totals[kind.name] = totals.get(kind.name, 0) + kind.nbytes(layer)
        return totals

    def count(self, cache: DynamicCache) -> None:
        """Record what ``cache`` holds now in ``peak_bytes`` (after every forward or join that grew it)."""
        for name, size in self.bytes_by_kind(cache).items():
            self.peak_bytes[name] = max(size, self.peak_bytes.get(name, 0))
