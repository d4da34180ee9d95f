"""Expert offload (the ``<family>.expert-offload`` pass): only the experts the router picks are read;
and encoder offload: an image or audio tower read when it runs.

A mixture-of-experts layer holds every expert's weights, but a token runs through the router's
top-k of them: gpt-oss-20b picks 4 of 32, so a decoded token needs an eighth of the expert bytes.
With layer streaming the expert parameters are in no layer slot; at each forward of an experts
module a pre-hook looks at the router's choice, reads just those experts (positioned reads; MXFP4
experts are dequantized as they are read) into ``[chosen, ...]`` parameters, and renumbers the
router's indices onto them. The module's own forward (transformers' code, whichever experts
implementation it dispatches to) then runs unchanged, over the chosen experts in ascending order,
as the resident forward runs them: the output is the same, bit for bit. The chosen experts are read
into views of one buffer per expert parameter shape, shared by every layer (the layers run one after
another) and allocated once: no allocation, page faults or zeroing per forward, and at most one
layer's experts in memory. When the memory plan leaves room beside the rest (``expert_cache_bytes``),
the first experts used are also kept, ready (dequantized), until that room is full: a hit is a copy
instead of a read and, for MXFP4, a dequantization.

Both families' experts modules take ``(hidden_states, expert_indices, expert_weights)`` and index
``[experts, ...]`` parameters by expert, with their count in ``num_experts``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ollm.tensor_index import LayerParam, Piece, TensorEntry


class PieceFiller(Protocol):
    device: torch.device

    def after_compute(self) -> None: ...

    def fill_piece(self, piece: Piece, target: torch.Tensor) -> None: ...


class ExpertStore:
    """What every layer's expert offload shares: the read buffers and the cache of kept experts.

    The cache keeps the experts first used until it is full and then keeps them: nothing is evicted.
    Least-recently-used eviction was measured and dropped: 16 streams use every expert of every layer
    in turn, a cycle larger than the cache, so it evicted each expert just before its next use (no
    hits), and the churn of freed and new tensors left the process 500 MiB above the plan.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, cache_bytes: int) -> None:
        self.dtype = dtype
        self.device = device
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.hits = 0  # experts served from the cache (tests and benchmarks look at it)
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self._cache: dict[tuple[int, str, int], torch.Tensor] = {}  # (module's id, parameter, expert)

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The ``[experts, ...]`` buffer of this shape, allocated on first use."""
        if shape not in self._buffers:
            self._buffers[shape] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self._buffers[shape]

    def cached(self, key: tuple[int, str, int]) -> torch.Tensor | None:
        found = self._cache.get(key)
        if found is not None:
            self.hits += 1
        return found

    def keep(self, key: tuple[int, str, int], tensor: torch.Tensor) -> None:
        """Cache a copy of ``tensor`` if it fits in what is left."""
        if self.cached_bytes + tensor.nbytes <= self.cache_bytes:
            self._cache[key] = tensor.clone()
            self.cached_bytes += tensor.nbytes


class ExpertOffload:
    """Reads the chosen experts of one experts module at each of its forwards."""

    def __init__(self, module: nn.Module, params: dict[str, LayerParam], filler: PieceFiller, store: ExpertStore):
        self.module = module
        self.params = params  # attribute of the module -> its layout
        self.filler = filler
        self.dtype = store.dtype
        self.store = store
        self.count = next(iter(params.values())).experts
        self.bytes_read = 0  # benchmarks compare it with the experts' size
        self._pieces = {
            name: [[p for p in param.pieces if p.expert == e] for e in range(self.count)]
            for name, param in params.items()
        }
        self._release()
        module.register_forward_pre_hook(self._read)
        module.register_forward_hook(lambda *_: self._release())

    @classmethod
    def attach(
        cls, layer: nn.Module, params: dict[str, LayerParam], filler: PieceFiller, store: ExpertStore
    ) -> list[ExpertOffload]:
        """One offload for each experts module of ``layer`` (``params``: the layer's, by full name),
        sharing the ``store`` with every layer."""
        modules: dict[str, dict[str, LayerParam]] = {}
        for name, param in params.items():
            if param.experts:
                module_name, _, attribute = name.rpartition(".")
                modules.setdefault(module_name, {})[attribute] = param
        return [cls(layer.get_submodule(name), found, filler, store) for name, found in modules.items()]

    def _read(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden, indices, *rest = args
        chosen = torch.unique(indices)  # sorted: the order the resident forward runs the experts in
        renumber = torch.zeros(self.count, dtype=indices.dtype, device=indices.device)
        renumber[chosen] = torch.arange(len(chosen), dtype=indices.dtype, device=indices.device)
        experts = chosen.tolist()
        self.filler.after_compute()  # the previous layer's experts may still be computing from the buffer
        for name, param in self.params.items():
            buffer = self.store.buffer(param.shape)[: len(experts)]
            for slot, expert in enumerate(experts):
                key = (id(self.module), name, expert)
                hit = self.store.cached(key)
                if hit is not None:
                    buffer[slot].copy_(hit)
                    continue
                for piece in self._pieces[name][expert]:
                    self.filler.fill_piece(piece, buffer[slot])
                    self.bytes_read += piece.read_bytes()
                self.store.keep(key, buffer[slot])
            setattr(module, name, nn.Parameter(buffer, requires_grad=False))
        setattr(module, "num_experts", len(experts))  # noqa: B010 (an int on an nn.Module)
        return (hidden, renumber[indices], *rest)

    def _release(self) -> None:
        """The module holds no view of the shared buffers between its forwards."""
        empty = torch.empty(0, dtype=self.dtype, device=self.filler.device)
        for name in self.params:
            setattr(self.module, name, nn.Parameter(empty, requires_grad=False))
        setattr(self.module, "num_experts", self.count)  # noqa: B010 (an int on an nn.Module)


class TensorFiller(PieceFiller, Protocol):
    def fill(self, entry: TensorEntry, target: torch.Tensor) -> None: ...


class ModuleOffload:
    """An encoder (image, audio) read from the files when it runs and dropped after it has run.

    With the layers streaming, a vision or audio tower would otherwise stay resident for the
    model's whole life while it runs once per request (in that request's prefill): the pre-hook
    reads its parameters, the post-hook frees them."""

    def __init__(self, module: nn.Module, tensors: dict[str, TensorEntry], filler: TensorFiller, dtype: torch.dtype):
        self.module = module
        self.tensors = tensors  # name within the module -> where it is in the files
        self.filler = filler
        self.dtype = dtype
        self.reads = 0  # forwards that read the module (tests look at it)
        self._release()
        module.register_forward_pre_hook(lambda *_: self._read())
        module.register_forward_hook(lambda *_: self._release())

    def _read(self) -> None:
        self.filler.after_compute()  # its memory may come from tensors the queued compute still reads
        for name, entry in self.tensors.items():
            tensor = torch.empty(entry.shape, dtype=self.dtype, device=self.filler.device)
            self.filler.fill(entry, tensor)
            self._set(name, tensor)
        self.reads += 1

    def _release(self) -> None:
        empty = torch.empty(0, dtype=self.dtype, device=self.filler.device)
        for name in self.tensors:
            self._set(name, empty)

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        owner, _, attribute = name.rpartition(".")
        setattr(self.module.get_submodule(owner), attribute, nn.Parameter(tensor, requires_grad=False))
