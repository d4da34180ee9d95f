"""ollm.engine.mxfp4 against transformers' own MXFP4 conversion, and an MXFP4 gpt-oss checkpoint end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.utils.quantization_config import Mxfp4Config

from bench.families import build_tiny
from bench.mxfp4_checkpoint import QUANTIZATION_CONFIG, write_dequantized_twin, write_mxfp4_twin
from ollm.engine import mxfp4
from ollm.engine.base import stream
from ollm.engine.loader import load_engine
from ollm.generation import FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import load_settings


def _random_packed(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    # Scales around 2**0, clear of float32's overflow (byte 255 is 2**128) and of float16's.
    scales = torch.randint(112, 140, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_transformers(dtype: torch.dtype) -> None:
    blocks, scales = _random_packed(3, 10, 4)  # [E, rows, G]
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # undo its [E, K, rows]
    ours = mxfp4.dequantize(blocks, scales, dtype)
    assert ours.dtype == dtype and ours.shape == (3, 10, 4 * 32)
    assert torch.equal(ours, reference)
    # One expert at a time gives the same rows.
    assert torch.equal(mxfp4.dequantize(blocks[1], scales[1], dtype), ours[1])


def test_dequantize_decodes_nibbles_and_scales() -> None:
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0xF1  # low nibble 1 (+0.5) is element 0, high nibble 15 (-6.0) element 1
    scales = torch.tensor([128], dtype=torch.uint8)  # 2 ** (128 - 127)
    values = mxfp4.dequantize(blocks, scales, torch.float32)
    assert values[:2].tolist() == [1.0, -12.0] and not values[2:].any()


def test_quantize_round_trip_is_idempotent() -> None:
    generator = torch.Generator().manual_seed(1)
    # Blocks spread over twelve orders of magnitude, an all-zero block and a signed zero.
    weight = torch.randn(4, 6, 96, generator=generator) * torch.logspace(-6, 6, 6).unsqueeze(-1)
    weight[0, 0, :32] = 0.0
    weight[0, 0, 5] = -0.0
    blocks, scales = mxfp4.quantize(weight)
    assert blocks.shape == (4, 6, 3, 16) and scales.shape == (4, 6, 3)
    assert blocks.dtype == scales.dtype == torch.uint8
    rounded = mxfp4.dequantize(blocks, scales, torch.float32)
    again = mxfp4.quantize(rounded)
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)
    assert torch.equal(mxfp4.dequantize(*again, torch.float32), rounded)
    # The rounding stays within FP4's precision: a quarter of each block's largest magnitude.
    amax = weight.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
    assert ((rounded - weight).unflatten(-1, (-1, 32)).abs() <= amax / 4).all()


def test_quantize_picks_nearest_value_and_power_of_two_scale() -> None:
    weight = torch.zeros(32)
    weight[:4] = torch.tensor([12.0, -2.9, 0.2, 13.0])  # amax 13: scale 2 ** 1, values 6, -1.5 (of -1.45), 0, 6
    blocks, scales = mxfp4.quantize(weight)
    assert scales.tolist() == [128]
    assert mxfp4.dequantize(blocks, scales, torch.float32)[:4].tolist() == [12.0, -3.0, 0.0, 12.0]
    with pytest.raises(ValueError, match="divisible by 32"):
        mxfp4.quantize(torch.zeros(4, 48))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mxfp4")
    config = GptOssConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    GptOssForCausalLM(config).save_pretrained(root / "float")
    write_mxfp4_twin(root / "float", root / "mxfp4")
    write_dequantized_twin(root / "float", root / "dequantized")
    return root


def test_mxfp4_twin_has_gpt_oss_layout(checkpoints: Path) -> None:
    config = json.loads((checkpoints / "mxfp4" / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    with safe_open(checkpoints / "mxfp4" / "model.safetensors", framework="pt") as reader:
        slices = {name: reader.get_slice(name) for name in reader.keys()}  # noqa: SIM118
        shapes = {name: (piece.get_shape(), piece.get_dtype()) for name, piece in slices.items()}
    prefix = "model.layers.1.mlp.experts."
    # E=4 experts, hidden H=64, intermediate I=64: rows are the outputs, 32-value blocks run along the inputs.
    assert shapes[prefix + "gate_up_proj_blocks"] == ([4, 128, 2, 16], "U8")
    assert shapes[prefix + "gate_up_proj_scales"] == ([4, 128, 2], "U8")
    assert shapes[prefix + "down_proj_blocks"] == ([4, 64, 2, 16], "U8")
    assert shapes[prefix + "down_proj_scales"] == ([4, 64, 2], "U8")
    assert shapes[prefix + "gate_up_proj_bias"] == ([4, 128], "F32")
    assert prefix + "gate_up_proj" not in shapes and prefix + "down_proj" not in shapes


def test_transformers_loads_mxfp4_twin_as_its_dequantized_twin(checkpoints: Path) -> None:
    # On CPU transformers would fetch its Triton MXFP4 kernels from the Hub; dequantize=True loads floats instead.
    quantized = GptOssForCausalLM.from_pretrained(
        checkpoints / "mxfp4", dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
    )
    dequantized = GptOssForCausalLM.from_pretrained(checkpoints / "dequantized", dtype=torch.float32)
    original = GptOssForCausalLM.from_pretrained(checkpoints / "float", dtype=torch.float32)
    experts = quantized.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.shape == (4, 64, 128)
    assert torch.equal(experts.down_proj, dequantized.model.layers[0].mlp.experts.down_proj)
    ids = torch.tensor([[1, 7, 42, 200, 3, 99]])
    with torch.no_grad():
        logits = quantized(ids).logits
        assert torch.equal(logits, dequantized(ids).logits)
        assert not torch.equal(logits, original(ids).logits)  # the experts were really rounded


def test_ollm_serves_an_mxfp4_checkpoint_resident_and_streamed_as_its_dequantized_twin(
    tmp_path: Path, default_model_dir: Path
) -> None:
    build_tiny("gpt-oss", tmp_path / "float", default_model_dir)
    write_mxfp4_twin(tmp_path / "float", tmp_path / "mxfp4")
    write_dequantized_twin(tmp_path / "float", tmp_path / "dequantized")
    settings = load_settings({"runtime": {"models_dir": tmp_path / "models", "dtype": "float32"}})
    request = GenerationRequest(
        model="tiny", prompt="w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
        sampling=SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True),
    )  # fmt: skip

    def answer(path: Path, streaming: str) -> str:
        settings.runtime.layer_streaming = streaming  # type: ignore[assignment]
        plan = plan_model(str(path), settings.runtime)
        # The blocks count at their dequantized size: that is what the model holds.
        assert (
            plan.memory.weights_bytes
            == plan_model(str(tmp_path / "dequantized"), settings.runtime).memory.weights_bytes
        )
        engine = load_engine(plan, settings)
        try:
            final = list(stream(engine, request))[-1]
        finally:
            engine.close()
        assert isinstance(final, FinalEvent), final
        return final.text

    expected = answer(tmp_path / "dequantized", "off")
    assert answer(tmp_path / "mxfp4", "off") == expected  # transformers dequantizes on load
    assert answer(tmp_path / "mxfp4", "on") == expected  # each chosen expert dequantized as it is read
