"""Weight-only quantization (``runtime.quantization``): int8 or int4 ``nn.Linear`` weights on torch's packed kernels.

The decoder layers' projections are swapped for :class:`QuantizedLinear`, which keeps the packed
weight and its scales and calls torch's own weight-only kernels, so a decode step reads a half
(int8) or a quarter (int4) of the bytes bf16 would:

* int8: one scale per output row (symmetric, ``w = q * scale``), ``torch.ops.aten._weight_int8pack_mm``.
  torch's int8 kernel takes one scale per row only, so int8 has no smaller groups.
* int4: one scale and one zero per group of ``INT4_GROUP`` inputs (asymmetric,
  ``w = (q - 8) * scale + zero``, q in 0..15), ``torch.ops.aten._weight_int4pack_mm_for_cpu``
  (``_weight_int4pack_mm`` on CUDA). That is GGUF's Q4_1 layout (``w = d * q + m`` per 32), so a
  Q4_1 tensor maps onto it exactly: ``scale = d``, ``zero = m + 8 d`` (ollm/engine/gguf_weights.py).

The kernels take their activations in the scales' dtype, the *compute dtype*. On CPU that is
bfloat16 even for a float32 model (:func:`compute_dtype`): torch vectorizes these kernels for
bfloat16 activations only; with float32 ones they took 28-55 ms for one 576x1536 row on this AVX2
CPU against 0.1-0.2 ms in bfloat16 (a float32 ``F.linear``: 0.14-0.5 ms). Such a layer casts its
input to bfloat16 and its output back.

The CUDA paths follow torch's documented CUDA kernels but are untested here (no GPU on the
machine they were written on); CPU is measured in docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ollm.memory import INT4_GROUP, quantizable
from ollm.packed_index import INT4_INNER_K_TILES, compute_dtype_name
from ollm.settings import Quantization

# torch dtype -> the run dtype names of settings and plans.
RUN_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class QuantizedLinear(nn.Module):
    """A weight-only quantized ``nn.Linear``: same inputs and outputs, packed weight.

    Built with :meth:`from_linear` (quantize a float weight) or :meth:`from_int4` (values and
    per-group scale/zero already known, e.g. from a GGUF Q4_1 tensor).
    """

    packed: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        mode: Quantization,
        in_features: int,
        out_features: int,
        packed: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.in_features = in_features
        self.out_features = out_features
        # Buffers, not parameters: nothing trains them, and .to(device) must still move them.
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: Quantization, dtype: torch.dtype) -> QuantizedLinear:
        """Quantize ``linear``'s weight; ``dtype`` is the compute dtype (:func:`compute_dtype`)."""
        return cls.from_weight(linear.weight.detach(), mode, dtype, _bias(linear))

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, mode: Quantization, dtype: torch.dtype, bias: torch.Tensor | None = None
    ) -> QuantizedLinear:
        """Quantize an ``[out, in]`` weight (int8: a scale per row; int4: scale and zero per group)."""
        weight = weight.float()
        out_features, in_features = weight.shape
        if mode == "int8":
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
            values = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return cls(mode, in_features, out_features, values, scale.to(dtype), bias)
        groups = weight.view(out_features, -1, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        values = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).view_as(weight)
        return cls.from_int4(values.to(torch.int32), scale, low + 8 * scale, dtype, bias)

    @classmethod
    def from_int4(
        cls,
        values: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """``values`` int32 ``[out, in]`` in 0..15; ``scale``/``zero`` ``[out, in / INT4_GROUP]``;
        the weight is ``(values - 8) * scale + zero`` per group."""
        out_features, in_features = values.shape
        device = values.device
        if device.type == "cuda":
            # The CUDA kernel packs two values per byte first (high nibble first), then tiles.
            pairs = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, INT4_INNER_K_TILES)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, INT4_INNER_K_TILES)
        # torch's layout: [in / group, out, 2] with scale then zero, in the activations' dtype.
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls("int4", in_features, out_features, packed, scales_and_zeros, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x.reshape(-1, self.in_features).to(self.scales.dtype)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.mode == "int8":
            if rows.device.type == "cuda":  # no packed int8 kernel on CUDA: dequantize in the matmul's dtype
                return F.linear(rows, self.packed.to(rows.dtype)) * self.scales
            return torch.ops.aten._weight_int8pack_mm(rows, self.packed, self.scales)
        if rows.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(rows, self.packed, INT4_GROUP, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, as a float32 ``[out, in]`` tensor (for references and tests)."""
        if self.mode == "int8":
            return self.packed.float() * self.scales.float()[:, None]
        # The packed layout is the kernel's own (tiled differently per device), so the kernel unpacks:
        # the identity times the packed weight with scale 1 and zero 8 is q itself, exact in
        # bfloat16 (0..15), where the kernel is fast (float32 activations: ~80 s for SmolLM2).
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=eye.device).expand(*self.scales.shape[:2], 2)
        unpack = (
            torch.ops.aten._weight_int4pack_mm
            if eye.device.type == "cuda"
            else torch.ops.aten._weight_int4pack_mm_for_cpu
        )
        values = unpack(eye, self.packed, INT4_GROUP, unit.contiguous()).t().float()
        scale, zero = (part.t().repeat_interleave(INT4_GROUP, dim=1) for part in self.scales.float().unbind(-1))
        return (values - 8) * scale + zero


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


def decoder_linears(model: Any) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every ``nn.Linear`` inside the decoder layers."""
    layers = model.get_decoder().layers
    for layer in layers:
        for parent in layer.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    yield parent, name, child


def compute_dtype(run_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The activations' dtype in the packed kernels (``ollm.packed_index.compute_dtype_name``)."""
    name = compute_dtype_name(RUN_DTYPE_NAMES[run_dtype], torch.device(device).type)
    return next(dtype for dtype, known in RUN_DTYPE_NAMES.items() if known == name)


def quantize_model(model: Any, mode: Quantization, dtype: torch.dtype | None = None) -> int:
    """Swap the decoder layers' linears for packed ones in place; returns how many were swapped.

    The LM head stays in the run dtype. Measured on SmolLM2 (2-core AVX2 CPU): an int4 head made
    the one-stream int4 decode step 15% faster (20.5 -> 17.4 ms) but moved its perplexity on the
    bench's text from 12.49 to 13.14 and its top-1 agreement with the float model from 97.5% to
    86.5%; an int8 head (what GGUF publishers keep: SmolLM2's Q4_1 file has its head in Q8_0) made
    the step slower (22 -> 24 ms at one row, 62 -> 73 ms at 16). Tied to the embeddings, a packed
    copy would also add its bytes. ``dtype`` is the compute dtype (default: :func:`compute_dtype`).
    """
    if mode == "none":
        return 0
    dtype = dtype or compute_dtype(model.dtype, model.device)
    swapped = 0
    for parent, name, linear in list(decoder_linears(model)):
        if quantizable(tuple(linear.weight.shape), mode):
            setattr(parent, name, QuantizedLinear.from_linear(linear, mode, dtype))
            swapped += 1
    return swapped
