"""Ollama's /api wire format (see Ollama's api.md / openapi.yaml): requests in, responses out.

Requests are lenient like Ollama's own JSON decoding: unknown fields (``context``,
image-generation sizes) are ignored. Responses are built as these models and dumped without
None fields, so every object carries exactly the keys Ollama would send.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ollm.generation import Seed

# A duration: seconds as a number, or a Go duration string ("5m", "1h30m", "-1"); negative = forever.
KeepAliveValue = float | str | None
# "" / "json" / a JSON schema.
FormatValue = str | dict[str, Any] | None
# Thinking models: on/off, or how hard (gpt-oss's levels).
ThinkValue = bool | Literal["low", "medium", "high"] | None


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# Older clients send "name" where newer ones send "model"; Ollama accepts both.
_MODEL = Field(validation_alias=AliasChoices("model", "name"), min_length=1)


class Options(_Lenient):
    """Modelfile parameters ollm maps onto its sampling; the rest (num_ctx, num_gpu, mirostat...)
    are accepted and ignored, as Ollama ignores options a runner does not use."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = None
    num_predict: int | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class FunctionCall(_Lenient):
    name: str
    # Ollama sends a JSON object; a JSON string (OpenAI style) is accepted too.
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(_Lenient):
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    # An earlier answer's thinking, given back.
    thinking: str | None = None


class GenerateRequest(_Lenient):
    model: str = _MODEL
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[str] | None = None
    format: FormatValue = None
    think: ThinkValue = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: KeepAliveValue = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(_Lenient):
    model: str = _MODEL
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    format: FormatValue = None
    think: ThinkValue = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: KeepAliveValue = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbedRequest(_Lenient):
    model: str = _MODEL
    input: str | list[str] | list[list[int]] = ""
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: KeepAliveValue = None


class EmbeddingsRequest(_Lenient):
    """The legacy /api/embeddings: one prompt, one vector."""

    model: str = _MODEL
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAliveValue = None


class ModelRequest(_Lenient):
    """/api/show, /api/delete."""

    model: str = _MODEL
    verbose: bool = False


class PullRequest(_Lenient):
    """/api/pull, /api/push."""

    model: str = _MODEL
    insecure: bool = False
    stream: bool = True


class CreateRequest(_Lenient):
    model: str = _MODEL
    from_: str | None = Field(None, alias="from")
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[Message] | None = None
    license: str | list[str] | None = None
    stream: bool = True
    # Building weights (GGUF/safetensors blobs, adapters, quantization) is not something ollm does
    # through this route; these are only read to refuse them clearly.
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None


class CopyRequest(_Lenient):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


# ---- responses ---------------------------------------------------------------------------------


class _Out(BaseModel):
    def wire(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True, by_alias=True)
        # Ollama's order: who and when first, statistics last (inherited fields would lead).
        head: dict[str, Any] = {key: data.pop(key) for key in ("model", "created_at") if key in data}
        return {**head, **data}


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob] | None = None


class Timings(_Out):
    """The statistics of a final object; durations in nanoseconds."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateResponse(Timings):
    model: str
    created_at: str
    response: str
    thinking: str | None = None
    done: bool
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None


class OutToolCall(_Out):
    function: FunctionCall


class OutMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str
    thinking: str | None = None
    tool_calls: list[OutToolCall] | None = None


class ChatResponse(Timings):
    model: str
    created_at: str
    message: OutMessage
    done: bool
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None


class EmbedResponse(_Out):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsResponse(_Out):
    embedding: list[float]


class ModelDetails(_Out):
    parent_model: str = ""
    format: str = "safetensors"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(_Out):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class ListResponse(_Out):
    models: list[ListedModel]


class Loading(_Out):
    """ollm's addition to a /api/ps entry: the model is still loading, this far."""

    bytes_read: int
    bytes_total: int
    progress: float | None = None


class RunningModel(_Out):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int = 0
    context_length: int | None = None
    loading: Loading | None = None


class ProcessResponse(_Out):
    models: list[RunningModel]


class ShowResponse(_Out):
    modelfile: str
    parameters: str
    template: str
    system: str | None = None
    license: str | None = None
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str | None = None


class ProgressResponse(_Out):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class VersionResponse(_Out):
    version: str
