"""Turn a float gpt-oss checkpoint into the MXFP4 layout real gpt-oss ships, and into its float twin.

Real gpt-oss stores each layer's experts as ``model.layers.N.mlp.experts.gate_up_proj_blocks`` uint8
[E, 2I, H/32, 16] with ``gate_up_proj_scales`` uint8 [E, 2I, H/32], and ``down_proj_blocks`` [E, H, I/32, 16] with
``down_proj_scales`` [E, H, I/32]: the transposes of ``GptOssExperts``' ``gate_up_proj`` [E, H, 2I] and
``down_proj`` [E, I, H], quantized along their input axis. The biases, attention, router, embeddings and head stay
float, as config.json's ``quantization_config`` says. ``write_dequantized_twin`` writes the float checkpoint with
each expert weight rounded through MXFP4, so both directories hold numerically the same model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ollm.engine import mxfp4

EXPERT_WEIGHTS = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
# openai/gpt-oss-20b's and -120b's config.json.
QUANTIZATION_CONFIG: dict[str, object] = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],  # noqa: E501
    "quant_method": "mxfp4",
}

Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def write_mxfp4_twin(src: Path, dst: Path) -> None:
    """``dst``: ``src`` with its expert weights as MXFP4 blocks and scales and an mxfp4 ``quantization_config``."""

    def convert(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks, scales = mxfp4.quantize(weight.transpose(-1, -2))
        return {f"{name}_blocks": blocks.contiguous(), f"{name}_scales": scales.contiguous()}

    _rewrite(src, dst, convert, QUANTIZATION_CONFIG)


def write_dequantized_twin(src: Path, dst: Path) -> None:
    """``dst``: ``src`` with each expert weight replaced by its MXFP4 rounding, in its own dtype."""

    def convert(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        rounded = mxfp4.dequantize(*mxfp4.quantize(weight.transpose(-1, -2)), weight.dtype)
        return {name: rounded.transpose(-1, -2).contiguous()}

    _rewrite(src, dst, convert, None)


def _rewrite(src: Path, dst: Path, convert: Convert, quantization_config: dict[str, object] | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, dst / path.name)
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard in sorted(src.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as reader:
            metadata = reader.metadata() or {"format": "pt"}
            for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = reader.get_tensor(name)
                tensors.update(convert(name, tensor) if name.endswith(EXPERT_WEIGHTS) else {name: tensor})
        save_file(tensors, dst / shard.name, metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, shard.name))
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
    index = src / "model.safetensors.index.json"
    if index.exists():
        text = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / index.name).write_text(json.dumps(text, indent=2), encoding="utf-8")
    if quantization_config is not None:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

