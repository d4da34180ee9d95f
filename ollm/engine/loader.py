"""RuntimePlan -> a loaded engine. The plan decides; this module only carries it out."""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoModelForSeq2SeqLM,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging
from transformers.utils.quantization_config import Mxfp4Config

from ollm.embeddings import Embedder
from ollm.engine.audio_prompt import audio_inputs
from ollm.engine.base import Engine, EventSink, refuse_audio
from ollm.engine.batch_invariant import make_batch_invariant
from ollm.engine.batching import BatchingEngine, SequenceBuilder, supports_batching
from ollm.engine.chunked_mlp import chunk_mlps
from ollm.engine.constrained import GrammarCompiler
from ollm.engine.decode_attention import ATTENTION as DECODE_ATTENTION
from ollm.engine.gguf_weights import int4_gguf, load_gguf_int4
from ollm.engine.kv_offload import KVOffloadStore
from ollm.engine.layer_streaming import load_streamed
from ollm.engine.output import harmony_markers
from ollm.engine.prompting import harmony_constraint, render_ids, render_text
from ollm.engine.quantize import compute_dtype, quantize_model
from ollm.engine.sequence import Sequence
from ollm.engine.single import SingleEngine
from ollm.errors import ContextLengthError, InvalidRequestError, MemoryBudgetError, UnsupportedModelError
from ollm.generation import ExecutionInfo, GenerationRequest
from ollm.plan import RuntimePlan, max_batch_for
from ollm.settings import Settings

transformers_logging.disable_progress_bar()  # load progress would garble CLI output and worker logs

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def execution_info(plan: RuntimePlan) -> ExecutionInfo:
    return ExecutionInfo(
        model=plan.reference,
        backend=plan.backend,
        specialization_state=plan.specialization_state,
        device=plan.device,
        dtype=plan.dtype,
        batch_invariant=plan.batch_invariant,
        quantization=plan.quantization,
        applied_passes=list(plan.applied_passes),
        fallback_reason=plan.fallback_reason,
    )


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


class _SequenceFactory:
    """Everything a request needs before it can run: ids, length budget, grammar, sampler."""

    def __init__(self, plan: RuntimePlan, model: Any, tokenizer: PreTrainedTokenizerBase, settings: Settings):
        self.plan = plan
        self.tokenizer = tokenizer
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.context = plan.context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.settings_kv_budget = settings.worker.kv_cache_max_tokens
        self.kv_budget = kv_token_budget(plan, settings)
        self.device = model.device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.harmony = bool(harmony_markers(tokenizer))
        self._grammars: GrammarCompiler | None = None

    def grammars(self) -> GrammarCompiler:
        # Built on first use: compiling the tokenizer's vocabulary costs a second or two.
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_ids))
        return self._grammars

    def sequence(
        self, request: GenerationRequest, sink: EventSink, submitted: float, prompt_ids: list[int]
    ) -> Sequence:
        if len(prompt_ids) >= self.context:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens; model {self.plan.reference} has a context of "
                f"{self.context} tokens. Shorten the input."
            )
        max_new = min(request.sampling.max_new_tokens, self.context - len(prompt_ids))
        if len(prompt_ids) + max_new > self.kv_budget:
            source = (
                "worker.kv_cache_max_tokens"
                if self.kv_budget == self.settings_kv_budget
                else "what runtime.memory_budget leaves beside the weights; see docs/memory.md"
            )
            raise ContextLengthError(
                f"the request needs {len(prompt_ids) + max_new} tokens of KV cache, more than this worker's "
                f"budget of {self.kv_budget} ({source}). Lower max tokens or raise the budget."
            )
        constraint = harmony_constraint(request.constraint) if self.harmony else request.constraint
        grammar = self.grammars().mask_for(constraint) if constraint else None
        return Sequence(
            request,
            sink,
            prompt_ids,
            max_new,
            self.tokenizer,
            self.vocab_size,
            self.device,
            self.eos_ids,
            grammar,
            submitted,
        )


def kv_token_budget(plan: RuntimePlan, settings: Settings) -> int:
    """KV tokens the engine may hold: the worker's setting, capped by what an explicit memory budget leaves."""
    limit = plan.memory.kv_cache_token_limit
    if plan.memory.enforced and limit:
        return min(settings.worker.kv_cache_max_tokens, limit)
    return settings.worker.kv_cache_max_tokens


def _refuse_images(plan: RuntimePlan, request: GenerationRequest) -> None:
    if request.messages and any(m.images() for m in request.messages):
        raise InvalidRequestError(
            f"model {plan.reference} does not accept images (it has no vision support); send text only "
            "or use a vision model",
            param="messages",
        )


def _decode_image(data: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    data = data.strip()
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        # validate=True: the lenient default skips stray characters and turns garbage into bytes.
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise InvalidRequestError(
            f"an image is not valid base64 ({exc}); send base64-encoded image bytes or a data: URI",
            param="messages",
        ) from exc
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")  # convert() reads the pixels now, inside this try
    except UnidentifiedImageError as exc:
        raise InvalidRequestError(
            f"an image ({len(raw)} bytes) is not in a format Pillow can read; send PNG, JPEG, GIF or WebP",
            param="messages",
        ) from exc
    except Exception as exc:  # truncated files, decompression bombs...
        raise InvalidRequestError(f"an image could not be decoded: {exc}", param="messages") from exc


def _contiguous_head_input(model: Any) -> None:
    """Give the LM head an input with plain row-major strides.

    With ``logits_to_keep=1`` Transformers hands the head a strided view of each row's last
    position. In bfloat16 on CPU, ``F.linear`` then copies the head's weight (for one row whose
    view keeps the prompt's stride: 72 MiB for a 49152 x 768 head) or broadcasts it once per batch
    row (16 rows: 1.1 GiB), on every prefill. ``.contiguous()`` is not enough: a ``[1, 1, hidden]``
    view already counts as contiguous. A fresh copy of ``[batch, 1, hidden]`` costs nothing beside
    that and keeps the head one plain matrix multiplication.
    """
    head = model.get_output_embeddings()
    if head is None:
        return

    def plain_strides(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device).copy_(hidden), *args[1:])

    head.register_forward_pre_hook(plain_strides)


def quantize_weights(model: Any, plan: RuntimePlan, dtype: torch.dtype) -> None:
    """``runtime.quantization``: int4 takes a kept Q4_1 GGUF's own bits where it has them, then the
    remaining decoder projections are quantized from the loaded weights."""
    assert plan.path is not None
    compute = compute_dtype(dtype, model.device)
    gguf_file = int4_gguf(plan.path, plan.model_type) if plan.quantization == "int4" else None
    if gguf_file is not None:
        load_gguf_int4(model, gguf_file, compute)
    quantize_model(model, plan.quantization, compute)


def _dequantizing(plan: RuntimePlan) -> dict[str, Any]:
    """MXFP4 checkpoints (gpt-oss) dequantized as transformers loads them, tensor by tensor: its
    MXFP4 kernels would otherwise be fetched from the Hugging Face Hub, which ollm never reaches."""
    assert plan.path is not None
    config = json.loads((plan.path / "config.json").read_text(encoding="utf-8"))
    if (config.get("quantization_config") or {}).get("quant_method") != "mxfp4":
        return {}
    return {"quantization_config": Mxfp4Config(dequantize=True)}


def load_engine(plan: RuntimePlan, settings: Settings) -> Engine:
    """A model with weights (echo is built by ``ollm.engine.load_engine``, without torch)."""
    if plan.kind == "embedding":
        raise UnsupportedModelError(f"{plan.reference} is an embedding model; it cannot generate text")
    if plan.path is None:
        raise UnsupportedModelError(f"{plan.reference} is not materialized; run `ollm models pull {plan.reference}`")
    started = time.perf_counter()
    dtype = _DTYPES[plan.dtype]
    info = execution_info(plan)
    if plan.memory.refuses_load():
        raise MemoryBudgetError(f"cannot load {plan.reference}: {plan.memory.reason}")
    if plan.kind == "causal-lm":
        model = _decoder_model(plan, AutoModelForCausalLM, dtype)
        _contiguous_head_input(model)
        tokenizer = AutoTokenizer.from_pretrained(plan.path)
        factory = _SequenceFactory(plan, model, tokenizer, settings)

        def build(request: GenerationRequest, sink: EventSink, submitted: float) -> Sequence:
            _refuse_images(plan, request)
            refuse_audio(plan.reference, request)
            return factory.sequence(request, sink, submitted, render_ids(tokenizer, request))

        return _batching_engine(plan, settings, model, info, build, factory, started)
    if plan.kind == "seq2seq":
        return _seq2seq_engine(plan, settings, info, dtype, started)
    if plan.kind == "audio-text":
        return _audio_text_engine(plan, settings, info, dtype, started)
    return _image_text_engine(plan, settings, info, dtype, started)


def _batching_engine(
    plan: RuntimePlan,
    settings: Settings,
    model: Any,
    info: ExecutionInfo,
    build: SequenceBuilder,
    factory: _SequenceFactory,
    started: float,
) -> BatchingEngine:
    """The continuous-batching engine over ``model`` (text, image-text and audio-text alike)."""
    why_not = supports_batching(model)
    if why_not:
        info.fallback_reason = "; ".join(filter(None, [info.fallback_reason, why_not]))
    max_batch = 1 if why_not else max_batch_for(plan, settings.worker)
    if plan.batch_invariant:
        make_batch_invariant(model, rows=max_batch)
    kv_store = None
    if plan.memory.kv_offload:
        kv_store = KVOffloadStore(settings.runtime.resolved_kv_offload_dir(), plan.device)
    return BatchingEngine(
        model,
        info,
        build,
        max_batch=max_batch,
        max_tokens_per_step=settings.worker.max_tokens_per_step,
        kv_cache_max_tokens=factory.kv_budget,
        batch_invariant=plan.batch_invariant,
        load_ms=(time.perf_counter() - started) * 1000,
        kv_store=kv_store,
    )


def _attention(plan: RuntimePlan) -> str | None:
    """The <family>.sdpa-attention pass: SDPA's fused kernels, which never hold [tokens x tokens]
    (tests/test_attention_memory.py), rather than whatever the checkpoint's config asks for; decode
    queries packed onto their key/value heads (ollm/engine/decode_attention.py)."""
    return DECODE_ATTENTION if any(p.endswith(".sdpa-attention") for p in plan.applied_passes) else None


def _decoder_model(plan: RuntimePlan, auto_class: Any, dtype: torch.dtype) -> Any:
    """A causal, image-text or audio-text model as the plan says: its decoder layers streamed (and an
    encoder read when it runs) or loaded whole; its weights quantized and its MLPs chunked when asked."""
    assert plan.path is not None
    attention = _attention(plan)
    if plan.memory.layer_streaming:
        slots = plan.memory.stream_slots or 2
        cache = plan.memory.expert_cache_bytes or 0
        # Quantized layers stream packed: the loader quantizes them once into a file it then reads.
        model = load_streamed(plan.path, dtype, plan.device, slots, attention, auto_class, cache, plan.quantization)
    else:
        extra = _dequantizing(plan)
        model = auto_class.from_pretrained(plan.path, dtype=dtype, attn_implementation=attention, **extra)
        model = model.to(plan.device).eval()
        if plan.quantization != "none":  # causal LMs only: the plan skips it for the others
            quantize_weights(model, plan, dtype)
    if plan.dense_projection_chunk_rows and any(p.endswith(".chunked-mlp") for p in plan.applied_passes):
        chunk_mlps(model, plan.dense_projection_chunk_rows)
    return model


def _seq2seq_engine(
    plan: RuntimePlan, settings: Settings, info: ExecutionInfo, dtype: torch.dtype, started: float
) -> Engine:
    assert plan.path is not None
    model = AutoModelForSeq2SeqLM.from_pretrained(plan.path, dtype=dtype).to(plan.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(plan.path)
    factory = _SequenceFactory(plan, model, tokenizer, settings)

    def build(request: GenerationRequest, sink: EventSink, submitted: float) -> tuple[Sequence, dict[str, Any]]:
        _refuse_images(plan, request)
        refuse_audio(plan.reference, request)
        if request.prompt is None and not (request.chat_template or tokenizer.chat_template):
            # Encoder-decoder models rarely have chat templates: the encoder reads the text itself.
            text = "\n".join(m.text() for m in request.messages or [])
        else:
            text = render_text(tokenizer, request)
        # Special tokens always: encoders are trained on inputs that end in EOS (T5's </s>).
        ids = list(tokenizer(text)["input_ids"])
        if not text.strip() or not ids:
            raise InvalidRequestError(
                "the prompt is empty", param="prompt" if request.prompt is not None else "messages"
            )
        seq = factory.sequence(request, sink, submitted, ids)
        return seq, {"input_ids": torch.tensor([ids], device=model.device)}

    return SingleEngine(model, info, build, tokenizer.pad_token_id, (time.perf_counter() - started) * 1000)


def _image_text_engine(
    plan: RuntimePlan, settings: Settings, info: ExecutionInfo, dtype: torch.dtype, started: float
) -> Engine:
    assert plan.path is not None
    model = _decoder_model(plan, AutoModelForImageTextToText, dtype)
    processor = AutoProcessor.from_pretrained(plan.path)
    tokenizer = processor.tokenizer
    if processor.chat_template and not tokenizer.chat_template:
        # Vision checkpoints often keep the template on the processor only; render_text reads the tokenizer's.
        tokenizer.chat_template = processor.chat_template
    factory = _SequenceFactory(plan, model, tokenizer, settings)

    def build(request: GenerationRequest, sink: EventSink, submitted: float) -> Sequence:
        refuse_audio(plan.reference, request)
        images = [_decode_image(data) for m in request.messages or [] for data in m.images()]
        text = render_text(tokenizer, request, image_placeholders=True)
        try:
            inputs = processor(
                text=text,
                images=images or None,
                # As in render_ids: a chat template writes its own BOS, a raw prompt gets the tokenizer's.
                add_special_tokens=request.prompt is not None,
                return_tensors="pt",
            )
        except ValueError as exc:  # e.g. image placeholders in the text that no image fills
            raise InvalidRequestError(f"the images do not fit the prompt: {exc}", param="messages") from exc
        prompt_ids = inputs["input_ids"][0].tolist()
        if not prompt_ids:
            raise InvalidRequestError(
                "the prompt is empty", param="prompt" if request.prompt is not None else "messages"
            )
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        # prompt_ids include the image placeholder tokens the processor expanded: they fill the context too.
        seq = factory.sequence(request, sink, submitted, prompt_ids)
        seq.model_inputs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return seq

    return _batching_engine(plan, settings, model, info, build, factory, started)


def _audio_text_engine(
    plan: RuntimePlan, settings: Settings, info: ExecutionInfo, dtype: torch.dtype, started: float
) -> Engine:
    """Voxtral: a Whisper-style audio encoder and projector in front of a Mistral decoder.

    The audio encoder runs once per request, inside its prefill forward (alone, whole); decode steps
    read the cache, batched with every other request's.
    """
    assert plan.path is not None
    model = _decoder_model(plan, AutoModelForMultimodalLM, dtype)
    processor = AutoProcessor.from_pretrained(plan.path)
    tokenizer = processor.tokenizer
    factory = _SequenceFactory(plan, model, tokenizer, settings)

    def build(request: GenerationRequest, sink: EventSink, submitted: float) -> Sequence:
        _refuse_images(plan, request)
        inputs = audio_inputs(processor, request, settings.audio, plan.reference)
        if not inputs.prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        seq = factory.sequence(request, sink, submitted, inputs.prompt_ids)
        if inputs.input_features is not None:
            seq.model_inputs = {"input_features": inputs.input_features.to(model.device, dtype)}
        return seq

    return _batching_engine(plan, settings, model, info, build, factory, started)


def load_embedder(plan: RuntimePlan, settings: Settings) -> Embedder:
    if plan.kind != "embedding" or plan.path is None:
        raise UnsupportedModelError(
            f"{plan.reference} is not a materialized embedding model; use an embedding model such as "
            f"{settings.runtime.embedding_model_reference}"
        )
    return Embedder(plan.reference, plan.path, plan.device, _DTYPES[plan.dtype])
