"""Quantized layers that stream (runtime.quantization with llama.layer-offload): the packed file,
its reuse, and greedy tokens equal to the same quantization held resident (float32 run dtype)."""

from __future__ import annotations

import os
from math import prod
from pathlib import Path

import pytest
import torch

from bench.synthetic import LlamaShape, write_llama_checkpoint
from ollm.engine.layer_streaming import streamer_of
from ollm.engine.loader import load_engine
from ollm.engine.packed_layers import _pack
from ollm.engine.quantize import QuantizedLinear
from ollm.errors import OllmError
from ollm.packed_index import PACKED_DIR
from ollm.plan import plan_model
from ollm.tensor_index import LayerLayout
from tests.conftest import DEFAULT_CHAT_MODEL
from tests.test_layer_streaming import _answers, _settings

# gate and up have 1024 rows: quantized in two chunks of 512 (packed_layers._ROWS).
SHAPE = LlamaShape(layers=3, hidden=64, intermediate=1024, heads=4, kv_heads=2, context=256)
PROMPTS = ["Hello", "The sky is", "word " * 40]  # the last one prefills over several steps


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_checkpoint(tmp_path_factory.mktemp("packed"), SHAPE, "bfloat16", shard_bytes=2**20)


def _packed_bytes(mode: str) -> int:
    """One layer's projections packed (CPU: bfloat16 scales), plus its two float32 norms."""
    total = 2 * SHAPE.hidden * 4
    for shape in SHAPE.layer_tensors(0).values():
        if len(shape) == 2:
            out, inputs = shape
            total += out * inputs + out * 2 if mode == "int8" else out * inputs // 2 + inputs // 32 * out * 2 * 2
    return total


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streamed_quantized_layers_equal_the_resident_quantized_model(synthetic: Path, mode: str) -> None:
    plan = plan_model(str(synthetic), _settings(synthetic, quantization=mode, layer_streaming="on").runtime)
    assert plan.quantization == mode and plan.memory.layer_streaming
    assert plan.fallback_reason is None  # nothing ignored: the layers stream packed
    assert plan.memory.layer_bytes == _packed_bytes(mode)
    float_layer = sum(prod(shape) for shape in SHAPE.layer_tensors(0).values()) * 4
    assert plan.memory.layer_bytes < float_layer / (3 if mode == "int8" else 6)

    resident = _answers(synthetic, PROMPTS, quantization=mode)
    streamed = _answers(synthetic, PROMPTS, quantization=mode, layer_streaming="on")
    assert [f.text for f in streamed] == [f.text for f in resident]
    assert streamed[0].execution is not None and "llama.layer-offload" in streamed[0].execution.applied_passes
    assert (synthetic / PACKED_DIR / f"{mode}-cpu-bfloat16.safetensors").is_file()


def test_slots_hold_the_packed_bytes_the_plan_counts(synthetic: Path) -> None:
    settings = _settings(synthetic, quantization="int4", layer_streaming="on")
    plan = plan_model(str(synthetic), settings.runtime)
    engine = load_engine(plan, settings)
    try:
        model = engine.runner.model  # type: ignore[attr-defined]
        streamer = streamer_of(model)
        assert streamer is not None
        layer = model.model.layers[1]
        assert isinstance(layer.mlp.gate_proj, QuantizedLinear) and layer.mlp.gate_proj.packed.dtype == torch.uint8
        # Every layer's projections are views of the slots: one slot's bytes are the plan's layer.
        slot = streamer._slots[0]
        assert sum(view.nbytes for view in slot.values()) == plan.memory.layer_bytes
        assert layer.mlp.gate_proj.packed.untyped_storage().data_ptr() in {
            view.untyped_storage().data_ptr() for one in streamer._slots for view in one.values()
        }
    finally:
        engine.close()


def test_the_packed_file_is_reused_and_rewritten_when_the_checkpoint_changes(
    tmp_path: Path,
) -> None:
    path = write_llama_checkpoint(tmp_path / "llama", SHAPE, "bfloat16", seed=5)
    packed = path / PACKED_DIR / "int8-cpu-bfloat16.safetensors"
    first = _answers(path, PROMPTS[:2], quantization="int8", layer_streaming="on")
    written, whole = packed.stat().st_mtime_ns, packed.stat().st_size
    again = _answers(path, PROMPTS[:2], quantization="int8", layer_streaming="on")
    assert packed.stat().st_mtime_ns == written  # read as it is
    assert [f.text for f in again] == [f.text for f in first]

    # A file cut short (a crash mid-write leaves only a .partial, but a disk can still lose bytes) is
    # rewritten, never read.
    with packed.open("r+b") as handle:
        handle.truncate(packed.stat().st_size - 100)
    cut = _answers(path, PROMPTS[:2], quantization="int8", layer_streaming="on")
    assert [f.text for f in cut] == [f.text for f in first]
    assert packed.stat().st_size == whole and not list(packed.parent.glob("*.partial"))

    # A checkpoint whose files changed gets a new packed file.
    shard = next(path.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    before = packed.stat().st_mtime_ns
    _answers(path, PROMPTS[:1], quantization="int8", layer_streaming="on")
    assert packed.stat().st_mtime_ns != before


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packing_in_row_chunks_equals_packing_the_whole_weight(mode: str) -> None:
    torch.manual_seed(0)
    weight = torch.randn(1536, 576, dtype=torch.bfloat16)  # three chunks of 512 rows
    layout = LayerLayout(resident={}, layers=[{}])
    whole = QuantizedLinear.from_weight(weight, mode, torch.bfloat16)  # type: ignore[arg-type]
    chunked = _pack(0, "mlp.up_proj", mode, torch.bfloat16, torch.device("cpu"),  # type: ignore[arg-type]
                    lambda number, name: weight, None, layout)  # fmt: skip
    assert torch.equal(chunked["packed"], whole.packed) and torch.equal(chunked["scales"], whole.scales)


@pytest.mark.slow
def test_smollm2_int4_streams_its_gguf_bits_as_the_resident_model_runs_them(default_model_dir: Path) -> None:
    questions = ["What is the capital of France?", "Count to five."]
    models = {"models_dir": default_model_dir.parent, "chat": True}
    resident = _answers(DEFAULT_CHAT_MODEL, questions, quantization="int4", **models)
    streamed = _answers(DEFAULT_CHAT_MODEL, questions, quantization="int4", layer_streaming="on", **models)
    assert [f.text for f in streamed] == [f.text for f in resident]
    assert streamed[0].execution is not None
    assert streamed[0].execution.applied_passes == ["llama.sdpa-attention", "llama.layer-offload"]


def test_a_packed_file_that_cannot_be_written_fails_the_load_with_what_to_do(tmp_path: Path) -> None:
    path = write_llama_checkpoint(tmp_path / "llama", SHAPE, "bfloat16", seed=7)
    (path / PACKED_DIR).write_text("not a directory")  # as unwritable as a read-only models dir
    settings = _settings(path, quantization="int4", layer_streaming="on")
    with pytest.raises(OllmError, match=r"cannot write the quantized layers of llama to .*runtime.quantization=none"):
        load_engine(plan_model(str(path), settings.runtime), settings)
