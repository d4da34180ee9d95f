"""A synthetic llama checkpoint: random weights from a fixed seed, written as a local model directory.

The directory is what `ollm models pull` would materialize: config.json, generation_config.json,
safetensors shards with their index, and SmolLM2's tokenizer files (so the vocabulary is SmolLM2's
49152 tokens). Shards are generated and written one at a time, so writing a multi-gigabyte
checkpoint holds one shard in memory, never the whole model.

    python -m bench.synthetic /tmp/llama-2g --layers 50 --hidden 768 --intermediate 8192
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from math import prod
from pathlib import Path

import torch
from safetensors.torch import save_file

from ollm.memory import human

SMOLLM2 = Path("~/.ollm/models/smollm2-135m-instruct").expanduser()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class LlamaShape:
    layers: int = 3
    hidden: int = 64
    intermediate: int = 160
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 49152
    context: int = 2048
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, index: int) -> dict[str, tuple[int, ...]]:
        prefix, kv = f"model.layers.{index}.", self.kv_heads * self.head_dim
        return {
            prefix + "input_layernorm.weight": (self.hidden,),
            prefix + "post_attention_layernorm.weight": (self.hidden,),
            prefix + "self_attn.q_proj.weight": (self.hidden, self.hidden),
            prefix + "self_attn.k_proj.weight": (kv, self.hidden),
            prefix + "self_attn.v_proj.weight": (kv, self.hidden),
            prefix + "self_attn.o_proj.weight": (self.hidden, self.hidden),
            prefix + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
            prefix + "mlp.up_proj.weight": (self.intermediate, self.hidden),
            prefix + "mlp.down_proj.weight": (self.hidden, self.intermediate),
        }

    def outer_tensors(self) -> dict[str, tuple[int, ...]]:
        tensors = {"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,)}
        if not self.tie_embeddings:
            tensors["lm_head.weight"] = (self.vocab, self.hidden)
        return tensors

    def parameters(self) -> int:
        shapes = [*self.outer_tensors().values()] + [
            s for i in range(self.layers) for s in self.layer_tensors(i).values()
        ]
        return sum(prod(shape) for shape in shapes)

    def config(self, dtype: str) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.context,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "tie_word_embeddings": self.tie_embeddings,
            "vocab_size": self.vocab,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "attention_bias": False,
            "mlp_bias": False,
            "dtype": dtype,
        }


def _tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        # Norm gains near 1, as in a trained model, so activations keep their scale through the layers.
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    # Scaled like an initializer: a projection keeps its input's variance.
    return (torch.randn(shape, generator=generator) * shape[-1] ** -0.5).to(dtype)


def write_llama_checkpoint(
    path: Path,
    shape: LlamaShape,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_bytes: int = 512 * 2**20,
    tokenizer_dir: Path = SMOLLM2,
) -> Path:
    """Write the checkpoint under ``path`` (created) and return it; the same seed writes the same bytes."""
    if shape.vocab != 49152:
        raise ValueError("the tokenizer is SmolLM2's: vocab must be 49152")
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = _DTYPES[dtype]
    groups: list[dict[str, tuple[int, ...]]] = [shape.outer_tensors()]
    for index in range(shape.layers):
        tensors = shape.layer_tensors(index)
        size = sum(prod(s) for s in groups[-1].values()) * torch_dtype.itemsize
        if size and size + sum(prod(s) for s in tensors.values()) * torch_dtype.itemsize > shard_bytes:
            groups.append({})
        groups[-1].update(tensors)
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard = {tensor: _tensor(tensor, s, generator, torch_dtype) for tensor, s in group.items()}
        save_file(shard, str(path / name), metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(group, name))
    total = shape.parameters() * torch_dtype.itemsize
    shard_index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(shard_index, indent=1))
    (path / "config.json").write_text(json.dumps(shape.config(dtype), indent=1))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (path / "generation_config.json").write_text(json.dumps(generation))
    (path / "synthetic.json").write_text(json.dumps({"seed": seed, "dtype": dtype, **asdict(shape)}))
    for file in _TOKENIZER_FILES:
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, path / file)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = LlamaShape(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads)
    write_llama_checkpoint(args.path, shape, args.dtype, args.seed)
    print(f"{args.path}: {shape.parameters():,} parameters, {human(shape.parameters() * 2)} in bfloat16")


if __name__ == "__main__":
    main()
