"""Layer streaming (the ``<family>.layer-offload`` pass): decoder layers read from disk as they run.

The model is built with its decoder layers' parameters not materialized; the resident parts
(embeddings, final norm, an untied head) are read once and the buffers (rotary frequencies,
gemma3's embedding scale) computed as the constructors compute them. Which tensors in the files
fill which parameter of a layer is the family provider's layout (``ollm/specialization``, read by
``ollm/tensor_index.py``): plain tensors, experts fused from one tensor each (qwen3-next), MXFP4
blocks dequantized as they are read (gpt-oss). Every decoder layer's parameters are then bound,
permanently, to views of one of ``slots`` reusable buffers shaped like one layer of its kind
(layers of one shape share a set of slots; a hybrid model has a set per kind), so loading layer i
means filling its slot in place: nothing is allocated per forward and the module tree is the
generic one, so batching, chunked MLPs and batch-invariant mode work unchanged. Mixture-of-experts
layers keep their experts out of the slots: ``ExpertOffload`` reads only the experts the router
picks, at each forward (ollm/engine/expert_offload.py).

A forward pre-hook on layer i waits for layer i's fill and starts the fill of the next layer
(wrapping to layer 0 for the next forward) on a background thread while layer i computes. When
the next layer shares layer i's slot (an odd layer count with two slots wraps onto slot 0), its
fill starts after layer i instead.

Reads are plain positioned reads (``os.preadv``) at the offsets of the safetensors headers, not
``mmap``: mapped pages would count against the process. A tensor already in the run dtype is read
straight into its slot on the host; others go through one reused staging buffer a piece at a time
and are cast into the slot. On CUDA the staging buffer is pinned, the copies are non-blocking on
a copy stream that first waits for the compute that last used the slot, and the fill completes
only when its copies have.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from math import prod
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key

from ollm.engine.expert_offload import ExpertOffload, ExpertStore, ModuleOffload
from ollm.engine.gguf_weights import int4_gguf
from ollm.engine.mxfp4 import dequantize
from ollm.engine.packed_layers import ensure_packed
from ollm.engine.positioned_io import pread_full, tensor_bytes
from ollm.engine.quantize import RUN_DTYPE_NAMES, QuantizedLinear
from ollm.errors import UnsupportedModelError
from ollm.packed_index import quantized_projections
from ollm.settings import Quantization
from ollm.specialization import streaming_layout
from ollm.tensor_index import MXFP4_ROWS, LayerLayout, LayerParam, Piece, TensorEntry

log = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32,  # packed (quantized) layers, held as stored
}  # fmt: skip
_ALIGN = 64  # bytes: every view in a slot starts on a cache line


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN


class _Reader:
    """Positioned reads from the checkpoint's files into caller-owned memory."""

    def __init__(self, files: set[Path]) -> None:
        self._fds: dict[Path, int] = {}
        try:
            for file in sorted(files):
                self._fds[file] = os.open(file, os.O_RDONLY)
        except BaseException:
            self.close()  # the shards opened before the one that failed
            raise

    def read(self, entry: TensorEntry, target: memoryview, start: int = 0) -> None:
        """Bytes ``start .. start + len(target)`` of ``entry`` into ``target``."""
        if pread_full(self._fds[entry.file], target, entry.offset + start) < len(target):
            raise OSError(f"{entry.file} ended inside {entry.name}: the checkpoint is truncated")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Filler:
    """Copies tensors from the files into run-dtype tensors on the device, through one staging buffer."""

    def __init__(self, reader: _Reader, device: torch.device, staging_bytes: int) -> None:
        self.reader = reader
        self.device = device
        cuda = device.type == "cuda"
        self.staging = torch.empty(max(staging_bytes, 1), dtype=torch.uint8, pin_memory=cuda)
        self._staging_bytes = tensor_bytes(self.staging)
        self.copy_stream = torch.cuda.Stream(device) if cuda else None

    def fill(self, entry: TensorEntry, target: torch.Tensor) -> None:
        """``target`` (contiguous, the entry's shape) := the entry's tensor, cast to target's dtype."""
        source_dtype = _TORCH_DTYPES[entry.dtype]
        if target.device.type == "cpu" and source_dtype == target.dtype:
            # Straight into the destination: no staging, no second copy.
            self.reader.read(entry, tensor_bytes(target))
            return
        flat = target.view(-1)
        item = torch.empty((), dtype=source_dtype).element_size()
        per_piece = max(len(self._staging_bytes) // item, 1)
        for first in range(0, flat.numel(), per_piece):
            count = min(per_piece, flat.numel() - first)
            self.reader.read(entry, self._staging_bytes[: count * item], first * item)
            piece = self.staging[: count * item].view(source_dtype)
            if self.copy_stream is None:
                flat[first : first + count].copy_(piece)
                continue
            with torch.cuda.stream(self.copy_stream):
                flat[first : first + count].copy_(piece, non_blocking=True)
            # The next piece reuses the pinned buffer: wait until this copy has read it.
            self.copy_stream.synchronize()

    def after_compute(self) -> None:
        """On CUDA, the next copies wait for the compute queued so far (it may still read the target)."""
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def fill_piece(self, piece: Piece, target: torch.Tensor) -> None:
        """``target`` (the parameter, or its expert's slice) := what ``piece`` holds for it."""
        if piece.scales is not None:
            # MXFP4 (gpt-oss experts): read the blocks and scales, dequantize, store transposed.
            blocks = torch.empty(piece.entry.shape, dtype=torch.uint8)
            scales = torch.empty(piece.scales.shape, dtype=torch.uint8)
            self.reader.read(piece.entry, tensor_bytes(blocks))
            self.reader.read(piece.scales, tensor_bytes(scales))
            # A few rows at a time: dequantizing builds an int64 index, 8x the blocks' bytes.
            for first in range(0, blocks.shape[0], MXFP4_ROWS):
                rows = slice(first, first + MXFP4_ROWS)
                target[:, rows].copy_(dequantize(blocks[rows], scales[rows], target.dtype).T)
            return
        if target.shape != piece.entry.shape:
            target = target[piece.row : piece.row + piece.entry.shape[0]]  # fused: this piece's rows
        self.fill(piece.entry, target)


class LayerStreamer:
    """Binds each decoder layer to a slot and keeps the next layer's slot filling in the background.

    Layers of one shape share ``slots`` buffers (a hybrid model has a set per kind of layer). With
    ``offload_experts``, a layer's expert parameters are in no slot: an ``ExpertOffload`` reads the
    experts the router picks at each forward.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        layout: LayerLayout,
        filler: _Filler,
        dtype: torch.dtype,
        slots: int,
        expert_filler: _Filler | None = None,
        expert_cache_bytes: int = 0,
    ) -> None:
        self.layers = layers
        self.layout = layout
        self.filler = filler
        offload = expert_filler is not None
        self._slots: list[dict[str, torch.Tensor]] = []
        self._slot_of_layer = [0] * len(layers)
        for numbers in layout.kinds(offload).values():
            count = max(1, min(slots, len(numbers)))
            first = len(self._slots)
            shapes = layout.slot_params(numbers[0], offload)
            self._slots += [self._slot(shapes, dtype, filler.device) for _ in range(count)]
            for position, number in enumerate(numbers):
                self._slot_of_layer[number] = first + position % count
        self._params = [layout.slot_params(number, offload) for number in range(len(layout.layers))]
        self.experts: list[ExpertOffload] = []
        self.expert_store = ExpertStore(dtype, filler.device, expert_cache_bytes)
        for number, layer in enumerate(layers):
            for name, view in self._slots[self._slot_of_layer[number]].items():
                module_name, _, attribute = name.rpartition(".")
                setattr(layer.get_submodule(module_name), attribute, nn.Parameter(view, requires_grad=False))
            if expert_filler is not None:
                self.experts += ExpertOffload.attach(layer, layout.layers[number], expert_filler, self.expert_store)
        self._holds = [-1] * len(self._slots)  # which layer each slot holds now (-1: none, or being filled)
        self._pending: dict[int, Future[None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ollm-layer-fill")
        self._after: dict[int, int] = {}  # layer -> the layer whose fill starts once it has run
        self.fills = 0  # layers read so far (tests and benchmarks look at it)
        for number, layer in enumerate(layers):
            layer.register_forward_pre_hook(self._make_pre_hook(number))
            layer.register_forward_hook(self._make_post_hook(number))

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    @staticmethod
    def _slot(params: dict[str, LayerParam], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """One layer's parameters as views of one flat buffer (packed ones in their stored dtype)."""
        dtypes = {name: _TORCH_DTYPES[param.stored] if param.stored else dtype for name, param in params.items()}
        sizes = {name: prod(param.shape) * dtypes[name].itemsize for name, param in params.items()}
        flat = torch.empty(sum(_aligned(size) for size in sizes.values()), dtype=torch.uint8, device=device)
        views, offset = {}, 0
        for name, param in params.items():
            views[name] = flat[offset : offset + sizes[name]].view(dtypes[name]).view(param.shape)
            offset += _aligned(sizes[name])
        return views

    # -- filling -------------------------------------------------------------------------------

    def _slot_of(self, layer: int) -> int:
        return self._slot_of_layer[layer]

    def _fill(self, layer: int, slot_free: Any) -> None:
        slot = self._slot_of(layer)
        self._holds[slot] = -1
        if slot_free is not None and self.filler.copy_stream is not None:
            # The slot's previous layer may still be computing on the GPU: copies wait for it.
            self.filler.copy_stream.wait_event(slot_free)
        views = self._slots[slot]
        pieces = [(piece, name) for name, param in self._params[layer].items() for piece in param.pieces]
        for piece, name in sorted(pieces, key=lambda item: (item[0].entry.file, item[0].entry.offset)):
            target = views[name] if piece.expert is None else views[name][piece.expert]
            self.filler.fill_piece(piece, target)
        self._holds[slot] = layer
        self.fills += 1

    def _slot_free(self) -> Any:
        """On CUDA, an event after the compute queued so far: a fill's copies wait for it."""
        if self.filler.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.filler.device))
        return event

    def _start(self, layer: int) -> None:
        # Called on the compute thread after the previous fill was awaited: no fill is running.
        if layer in self._pending or self._holds[self._slot_of(layer)] == layer:
            return
        self._pending[layer] = self._executor.submit(self._fill, layer, self._slot_free())

    def _make_pre_hook(self, number: int) -> Any:
        following = (number + 1) % len(self.layers)

        def pre_hook(_module: nn.Module, _args: Any) -> None:
            pending = self._pending.pop(number, None)
            if pending is not None:
                pending.result()  # a failed read fails this forward, with the reader's message
            if self._holds[self._slot_of(number)] != number:
                # Nothing prefetched it (first forward, or one that failed half-way): fill it now,
                # once no background fill can still be writing a slot.
                self._drain()
                self._fill(number, self._slot_free())
            if following == number:
                return
            if self._slot_of(following) == self._slot_of(number):
                self._after[number] = following
            else:
                self._start(following)

        return pre_hook

    def _drain(self) -> None:
        pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            future.exception()  # waits; a failed fill left its slot marked empty

    def _make_post_hook(self, number: int) -> Any:
        def post_hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            following = self._after.pop(number, None)
            if following is not None:
                self._start(following)

        return post_hook

    def close(self) -> None:
        for pending in self._pending.values():
            pending.cancel()
        self._executor.shutdown(wait=True)
        self.filler.reader.close()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (nothing allocated, no initializer run)
    and their buffers computed as usual: the rotary frequencies and gemma3's embedding scale are
    computed in the modules' constructors, not read from the files."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load_streamed(
    path: Path,
    dtype: torch.dtype,
    device: str,
    slots: int = 2,
    attn_implementation: str | None = None,
    auto_class: Any = AutoModelForCausalLM,
    expert_cache_bytes: int = 0,
    quantization: Quantization = "none",
) -> PreTrainedModel:
    """A causal LM from ``path`` whose decoder layers stream from the files at each forward.

    The layout (which tensors fill which layer's parameters) is the family provider's; MoE layers'
    experts are offloaded (read per forward, only the chosen ones). With ``quantization``, the
    layers' projections are ``QuantizedLinear`` and stream packed, from the packed file
    (ollm/engine/packed_layers.py). Raises UnsupportedModelError (with the reason) when the
    checkpoint cannot stream; the planner checks the same layout first, so this is a second line
    of defence.
    """
    config = AutoConfig.from_pretrained(path)
    layout = streaming_layout(path, config.to_dict())
    if isinstance(layout, str):
        raise UnsupportedModelError(f"cannot stream the layers of {path}: {layout}")
    with _parameters_on_meta():
        model = auto_class.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    layout = _in_model_names(layout, model)
    target = torch.device(device)
    for number, layer in enumerate(model.get_submodule(layout.layers_module)):
        built = {name: tuple(p.shape) for name, p in layer.named_parameters()}
        mapped = {name: param.shape for name, param in layout.layers[number].items()}
        if built != mapped:
            raise UnsupportedModelError(
                f"cannot stream the layers of {path}: layer {number}'s tensors in the files {sorted(mapped.items())} "
                f"are not the model's {sorted(built.items())}"
            )
    if quantization != "none":
        layout = _packed(path, model, layout, quantization, dtype, target)
    reader = _Reader(layout.files())
    try:
        run = RUN_DTYPE_NAMES[dtype]
        filler = _Filler(reader, target, layout.staging_bytes(run, target.type))
        # Experts and encoders are read on the compute thread, while a layer may be filling in the
        # background: they have their own staging buffer.
        on_compute = layout.has_experts() or bool(layout.on_demand)
        side = _Filler(reader, target, layout.staging_bytes(run, target.type)) if on_compute else None
        return _assemble(path, model, layout, filler, dtype, slots, side, expert_cache_bytes)
    except BaseException:
        # Until the model owns the streamer (and its finalizer closes the files), this does.
        reader.close()
        raise


def _packed(
    path: Path, model: Any, layout: LayerLayout, mode: Quantization, dtype: torch.dtype, device: torch.device
) -> LayerLayout:
    """The layout with the layers' projections packed (the packed file written first if need be), and
    the model's projections swapped for ``QuantizedLinear`` modules shaped for it (still unloaded)."""
    layers = model.get_submodule(layout.layers_module)
    projections = [
        [name for name in quantized_projections(params, mode) if type(layers[number].get_submodule(name)) is nn.Linear]
        for number, params in enumerate(layout.layers)
    ]
    gguf_file = int4_gguf(path, model.config.model_type) if mode == "int4" else None
    reader = _Reader(layout.files())
    try:
        filler = _Filler(reader, torch.device("cpu"), layout.staging_bytes(RUN_DTYPE_NAMES[dtype], "cpu"))

        def weight_of(number: int, name: str) -> torch.Tensor:
            param = layout.layers[number][f"{name}.weight"]
            weight = torch.empty(param.shape, dtype=dtype)
            for piece in param.pieces:
                filler.fill_piece(piece, weight)
            return weight

        packed = ensure_packed(path, layout, projections, mode, dtype, device, weight_of, gguf_file, model.config)
    finally:
        reader.close()
    for number, names in enumerate(projections):
        for name in names:
            parent_name, _, attribute = name.rpartition(".")
            parent = layers[number].get_submodule(parent_name)
            linear = getattr(parent, attribute)
            values, scales = (packed.layers[number][f"{name}.{part}"] for part in ("packed", "scales"))
            assert values.stored is not None and scales.stored is not None
            setattr(parent, attribute, QuantizedLinear(
                mode, linear.in_features, linear.out_features,
                torch.empty(values.shape, dtype=_TORCH_DTYPES[values.stored], device="meta"),
                torch.empty(scales.shape, dtype=_TORCH_DTYPES[scales.stored], device="meta"),
                linear.bias,
            ))  # fmt: skip
    return packed


def _in_model_names(layout: LayerLayout, model: Any) -> LayerLayout:
    """``layout`` with the model's names for what is outside the layers. Checkpoints keep their
    original names (``language_model.model.layers`` for Voxtral) while transformers' classes nest
    them differently (``model.language_model.layers``); transformers' own renaming rules map them."""
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    names = dict(model.state_dict())

    def rename(name: str) -> str:
        return str(rename_source_key(name, renamings, [], model.base_model_prefix, names)[0])

    def module(name: str, some_tensor: str) -> str:
        return rename(f"{name}.{some_tensor}").removesuffix(f".{some_tensor}")

    first = next(iter(layout.layers[0])) if layout.layers and layout.layers[0] else "weight"
    return replace(
        layout,
        resident={rename(name): entry for name, entry in layout.resident.items()},
        layers_module=module(f"{layout.layers_module}.0", first).removesuffix(".0"),
        on_demand={module(m, next(iter(t))): t for m, t in layout.on_demand.items()},
    )


def _assemble(
    path: Path,
    model: Any,
    layout: LayerLayout,
    filler: _Filler,
    dtype: torch.dtype,
    slots: int,
    side: _Filler | None,
    expert_cache_bytes: int,
) -> PreTrainedModel:
    """Read the resident tensors, bind the layers to the streamer, and hand the files to the model."""
    target = filler.device
    tied = not any(name.endswith("lm_head.weight") for name in layout.resident)  # the layout read the config
    for name, entry in layout.resident.items():
        module_name, _, attribute = name.rpartition(".")
        tensor = torch.empty(entry.shape, dtype=dtype, device=target)
        filler.fill(entry, tensor)  # in pieces when it is larger than the staging buffer
        setattr(model.get_submodule(module_name), attribute, nn.Parameter(tensor, requires_grad=False))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:  # a packed layer's buffers: the streamer binds them
                module._buffers[name] = buffer.to(target)
    if side is not None:
        model.encoders = [ModuleOffload(model.get_submodule(m), t, side, dtype) for m, t in layout.on_demand.items()]
    experts = side if layout.has_experts() else None
    layers = model.get_submodule(layout.layers_module)
    streamer = LayerStreamer(layers, layout, filler, dtype, slots, experts, expert_cache_bytes)
    leftovers = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        streamer.close()
        raise UnsupportedModelError(f"cannot stream the layers of {path}: {leftovers} were not loaded")
    generation = path / "generation_config.json"
    if generation.exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    model.layer_streamer = streamer
    weakref.finalize(model, streamer.close)
    return model


def streamer_of(model: nn.Module) -> LayerStreamer | None:
    streamer = getattr(model, "layer_streamer", None)
    return streamer if isinstance(streamer, LayerStreamer) else None
