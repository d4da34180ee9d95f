"""A tiny random Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration), built with the libraries' own APIs.

The tokenizer is SmolLM2's (a local directory) with the three tokens Gemma3Processor reads added as
named special tokens: ``boi_token`` (``<start_of_image>``, the placeholder a prompt carries for each
image), ``image_token`` (``<image_soft_token>``, which the processor repeats ``mm_tokens_per_image``
times between ``boi`` and ``eoi``) and ``eoi_token`` (``<end_of_image>``). The model is a 4-layer
Gemma 3 decoder (3 sliding-window layers, 1 full) behind a 2-layer SigLIP tower whose 4 x 4 patches
the projector pools to 2 x 2 = 4 image tokens. The processor keeps Gemma 3's PIL image processor
(the default one needs torchvision) and a ChatML template that writes ``<start_of_image>`` for image
parts, the way Gemma's own template does. The real loading code reads these files as it reads a
pulled Gemma 3.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
)

IMAGE_SIZE = 32
PATCH = 8
# The projector average-pools the (IMAGE_SIZE / PATCH)^2 = 16 patches to a 2 x 2 grid.
MM_TOKENS_PER_IMAGE = 4
BOI_TOKEN = "<start_of_image>"
EOI_TOKEN = "<end_of_image>"
IMAGE_TOKEN = "<image_soft_token>"
# ChatML (SmolLM2's own turn markers); an image part is Gemma's placeholder, which the processor expands.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}" + BOI_TOKEN + "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int), token
    return token_id


def build(path: Path, tokenizer_dir: Path) -> Path:
    """Write the checkpoint (config, float32 weights, tokenizer, processor, template) to ``path``."""
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_dir,
        extra_special_tokens={"boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN, "image_token": IMAGE_TOKEN},
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        max_position_embeddings=512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=_id(tokenizer, BOI_TOKEN),
        eoi_token_index=_id(tokenizer, EOI_TOKEN),
        image_token_index=_id(tokenizer, IMAGE_TOKEN),
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)  # float32: torch's default dtype
    # Gemma initializes the image projection to zeros: every image would embed alike. Random, so images count.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    model.save_pretrained(path)
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    ).save_pretrained(path)
    return path
