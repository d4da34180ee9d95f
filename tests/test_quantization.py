"""runtime.quantization: packed int8/int4 decoder weights, their plan, and GGUF Q4_1 bits loaded as int4.

Everything that compares tokens runs in float32 on the real SmolLM2, where the kernels are exact
enough for equality; the agreement rates with the unquantized model are the documented floor
(docs/configuration.md), measured here on a fixed text.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from ollm.engine.base import Event
from ollm.engine.gguf_weights import find_gguf, q4_1_to_int4
from ollm.engine.loader import load_engine
from ollm.engine.quantize import QuantizedLinear, quantize_model
from ollm.generation import FinalEvent, GenerationRequest, SamplingParams
from ollm.plan import plan_model
from ollm.settings import RuntimeSettings, load_settings

pytestmark = pytest.mark.slow

# Teacher-forced greedy top-1 agreement with the unquantized float32 model on TEXT, the floor
# asserted (measured: see docs/configuration.md).
AGREEMENT_FLOOR = {"int8": 0.95, "int4": 0.80}
TEXT = (
    "The history of the Roman Empire spans many centuries. It began when Augustus became the first "
    "emperor in 27 BC and, in the west, ended in AD 476. At its height the empire stretched from Britain "
    "to Egypt, and its roads, laws and language shaped Europe for a thousand years after its fall. "
    "Water reached the cities through aqueducts, some of which still stand today, and the Latin of its "
    "soldiers and merchants grew into Italian, French, Spanish, Portuguese and Romanian."
)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 96), (48, 160)])
def test_quantized_linear_multiplies_by_its_dequantized_weight(mode: str, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=True)
    quantized = QuantizedLinear.from_linear(linear, mode, torch.float32)  # type: ignore[arg-type]
    x = torch.randn(3, 5, shape[1])
    expected = F.linear(x, quantized.dequantized(), linear.bias)
    torch.testing.assert_close(quantized(x), expected, rtol=1e-5, atol=1e-5)
    error = (quantized.dequantized() - linear.weight).abs().max().item()
    step = linear.weight.abs().max().item() / (127 if mode == "int8" else 7.5)
    assert 0 < error <= step  # quantized, within one step of the grid


def _model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _top1(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].argmax(-1)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_smollm2_agrees_with_the_float_model(default_model_dir: Path, mode: str) -> None:
    ids = AutoTokenizer.from_pretrained(default_model_dir)(TEXT, return_tensors="pt").input_ids
    model = _model(default_model_dir)
    reference = _top1(model, ids)
    swapped = quantize_model(model, mode)  # type: ignore[arg-type]
    assert swapped == 30 * 7  # every projection of every layer
    agreement = (_top1(model, ids) == reference).float().mean().item()
    assert agreement >= AGREEMENT_FLOOR[mode], f"{mode}: {agreement:.3f}"


def _dequantized_copy(model: Any) -> None:
    """Replace every QuantizedLinear with an nn.Linear holding its dequantized weight: the float reference."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = nn.Parameter(child.dequantized())
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.float())
                setattr(parent, name, linear)


def _greedy(model: Any, tokenizer: Any, prompt: str, max_new: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None)
    return list(out[0, ids.shape[1] :].tolist())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_greedy_tokens_equal_a_float_reference_of_the_same_weights(default_model_dir: Path, mode: str) -> None:
    """Computing in float32 (exact, but torch's packed kernels are slow with float32 activations on CPU:
    ~50 ms per int4 call on an AVX2 machine, so few tokens): the packed layers are their dequantized weights."""
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    quantized = _model(default_model_dir)
    quantize_model(quantized, mode, torch.float32)  # type: ignore[arg-type]
    reference = _model(default_model_dir)
    quantize_model(reference, mode, torch.float32)  # type: ignore[arg-type]  # deterministic: the same weights
    _dequantized_copy(reference)
    prompt = PROMPTS[0]
    assert _greedy(quantized, tokenizer, prompt, 4) == _greedy(reference, tokenizer, prompt, 4)


def test_engine_serves_int4_as_the_quantized_model_generates(default_model_dir: Path) -> None:
    """Through the real loader and engine, as a worker serves it (bfloat16 compute on CPU)."""
    settings = load_settings(
        {"runtime": {"model_reference": str(default_model_dir), "dtype": "float32", "quantization": "int4"}}
    )
    plan = plan_model(settings.runtime.model_reference, settings.runtime)
    assert plan.quantization == "int4"
    engine = load_engine(plan, settings)
    inbox: queue.Queue[Event] = queue.Queue()
    try:
        sampling = SamplingParams(temperature=0.0, max_new_tokens=12)
        engine.submit(GenerationRequest(model=str(default_model_dir), prompt=PROMPTS[0], sampling=sampling), inbox.put)
        served: list[int] = []
        while not isinstance(event := inbox.get(timeout=600), FinalEvent):
            assert event.type == "token", event
            served.extend(event.token_ids)
        assert event.execution is not None and event.execution.quantization == "int4"
    finally:
        engine.close()
    model = _model(default_model_dir)
    quantize_model(model, "int4")
    assert served == _greedy(model, AutoTokenizer.from_pretrained(default_model_dir), PROMPTS[0], len(served))


def test_plan_counts_packed_bytes(default_model_dir: Path) -> None:
    def plan(mode: str) -> Any:
        runtime = RuntimeSettings.model_validate(
            {"models_dir": default_model_dir.parent, "dtype": "bfloat16", "quantization": mode}
        )
        return plan_model(str(default_model_dir), runtime)

    none, int8, int4 = plan("none"), plan("int8"), plan("int4")
    # 30 layers x (q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down: 576x1536) in bfloat16.
    per_layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576
    rows = 2 * 576 + 2 * 192 + 2 * 1536 + 576
    assert int8.memory.quantization_saved_bytes == 30 * (per_layer * 2 - (per_layer + rows * 2))
    assert int4.memory.quantization_saved_bytes == 30 * (per_layer * 2 - (per_layer // 2 + 2 * per_layer // 32 * 2))
    for quantized in (int8, int4):
        assert quantized.memory.weights_bytes == none.memory.weights_bytes - quantized.memory.quantization_saved_bytes
        assert quantized.memory.expected_peak_bytes < none.memory.expected_peak_bytes
    assert none.memory.quantization_saved_bytes is None and none.quantization == "none"


# -- GGUF Q4_1 ------------------------------------------------------------------------------------


@pytest.fixture
def pulled_from_gguf(default_model_dir: Path) -> Path:
    """SmolLM2 as `ollm pull` (here `make dev`) leaves it: converted from the Q4_1 GGUF wheel, which is kept."""
    return default_model_dir


def test_q4_1_tensor_dequantizes_as_the_gguf_package_does(pulled_from_gguf: Path) -> None:
    gguf_file = find_gguf(pulled_from_gguf)
    assert gguf_file is not None
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    for name in ("blk.0.ffn_down.weight", "blk.7.attn_v.weight", "blk.29.ffn_gate.weight"):
        tensor = tensors[name]
        assert tensor.tensor_type == GGMLQuantizationType.Q4_1
        values, scale, zero = q4_1_to_int4(np.asarray(tensor.data))
        layer = QuantizedLinear.from_int4(values, scale, zero, torch.float32)  # float32 scales: exact
        expected = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        np.testing.assert_array_equal(layer.dequantized().numpy(), expected)


def test_int4_runs_the_gguf_bits_of_the_default_model(pulled_from_gguf: Path) -> None:
    gguf_file = find_gguf(pulled_from_gguf)
    assert gguf_file is not None
    config = AutoConfig.from_pretrained(pulled_from_gguf).to_dict()
    processor = LlamaTensorProcessor(config=config)
    settings = load_settings({"runtime": {"model_reference": str(pulled_from_gguf), "dtype": "float32",
                                          "quantization": "int4"}})  # fmt: skip
    engine = load_engine(plan_model(settings.runtime.model_reference, settings.runtime), settings)
    try:
        layers = engine.runner.model.model.layers  # type: ignore[attr-defined]
        tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
        for gguf_name, module in (("blk.3.attn_q.weight", layers[3].self_attn.q_proj),
                                  ("blk.3.attn_k.weight", layers[3].self_attn.k_proj),
                                  ("blk.11.ffn_up.weight", layers[11].mlp.up_proj)):  # fmt: skip
            tensor = tensors[gguf_name]
            # transformers' own GGUF reading: dequantize, then undo llama.cpp's q/k row order.
            expected = processor.process(dequantize(np.asarray(tensor.data), tensor.tensor_type), gguf_name).weights
            assert isinstance(module, QuantizedLinear)
            # Served with bfloat16 scales and zeros on CPU (compute_dtype): within their rounding.
            np.testing.assert_allclose(module.dequantized().numpy(), expected, rtol=0, atol=np.abs(expected).max() / 64)
    finally:
        engine.close()
