"""MXFP4, the format gpt-oss ships its expert weights in, to and from floats.

transformers dequantizes a whole MXFP4 checkpoint as it loads it (``Mxfp4Config(dequantize=True)``, or by itself
when its Triton kernels are missing), which needs every expert in float at once. Layer streaming and expert
offload read one layer's, or one expert's, bytes at a time instead, so they dequantize each expert as it is read
with :func:`dequantize`, never the whole model. :func:`quantize` is its inverse, to write MXFP4 checkpoints.

Layout (OCP Microscaling, as in transformers.integrations.mxfp4): a block of 32 consecutive values along the last
axis shares one scale byte, an E8M0 power of two biased by 127 (value ``2 ** (byte - 127)``); each value is an
E2M1 (FP4) code, a sign bit over 3 bits indexing ``FP4_VALUES``, packed two per byte, the even element in the
low nibble. ``blocks`` is uint8 ``[..., G, 16]`` and ``scales`` uint8 ``[..., G]`` for ``G * 32`` values.

gpt-oss stores ``gate_up_proj_blocks`` [E, 2I, H/32, 16] and ``down_proj_blocks`` [E, H, I/32, 16] (the
output rows first), while ``GptOssExperts`` holds ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H]:
a dequantized ``[..., rows, G * 32]`` tensor is transposed on its last two axes to give the parameter.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
_SCALE_BIAS = 127
# Between consecutive magnitudes of FP4_VALUES: a value on one rounds to the smaller magnitude.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# E2M1's largest exponent: a block's largest magnitude lands in [4, 8) once divided by its scale.
_EMAX = 2


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``blocks`` [..., G, 16] and ``scales`` [..., G] to ``dtype`` [..., G * 32], as transformers'
    ``convert_moe_packed_tensors`` computes them (before its transpose)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    # A byte's two values at once (low nibble first): one lookup per byte, not per value.
    pairs = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)
    values = pairs[blocks.to(torch.int64)].flatten(-2)  # [..., G, 32]
    powers = torch.exp2(scales.to(torch.float32) - _SCALE_BIAS).to(dtype).unsqueeze(-1)
    if bool(torch.isfinite(powers).all()) and bool((powers >= torch.finfo(dtype).tiny).all()):
        # Multiplying by a power of two is exact, and twice as fast as ldexp (measured on CPU): expert
        # offload dequantizes the chosen experts at every step.
        return (values * powers).flatten(-2)
    exponents = scales.to(torch.int32).unsqueeze(-1) - _SCALE_BIAS  # beyond the dtype's normal range
    return torch.ldexp(values, exponents).flatten(-2)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``weight`` [..., K] (K a multiple of 32) to MXFP4 ``(blocks [..., K/32, 16], scales [..., K/32])``.

    Each block's scale is the power of two that brings its largest magnitude into [4, 8) (the OCP spec's choice;
    OpenAI's Triton kernels round the scale up instead, so nothing clips); each value is the nearest FP4 value,
    clamped to +-6. ``quantize(dequantize(*quantize(w)))`` gives back the same bytes.
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs a last dimension divisible by {BLOCK}, not {weight.shape[-1]}")
    w = weight.detach().float().contiguous().unflatten(-1, (-1, BLOCK))  # [..., G, 32]
    amax = w.abs().amax(dim=-1)
    _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, m in [0.5, 1): floor(log2(amax)) = exponent - 1
    shared = torch.where(amax > 0, exponent - 1 - _EMAX, -_SCALE_BIAS).clamp(-_SCALE_BIAS, _SCALE_BIAS)
    scaled = torch.ldexp(w, -shared.unsqueeze(-1))
    midpoints = torch.tensor(_MIDPOINTS, device=w.device)
    codes = torch.bucketize(scaled.abs().clamp(max=6.0), midpoints) | (torch.signbit(scaled).to(torch.int64) << 3)
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))  # [..., G, 16, 2]
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (shared + _SCALE_BIAS).to(torch.uint8)
