"""Wire format of the native ollm routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ollm.contract import WorkerInfo
from ollm.errors import SettingsError
from ollm.generation import ChatMessage, ExecutionInfo, FinishReason, ReasoningEffort, Seed, Timings
from ollm.memory import parse_size


class _Body(BaseModel):
    # A misspelt option must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


class SamplingOptions(_Body):
    """Per-request sampling; anything left out comes from the [generation] settings."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: list[str] | None = None
    repetition_penalty: float | None = Field(None, gt=0.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    think: bool | ReasoningEffort | None = Field(
        None, description="Thinking models: think or not, or how hard (low/medium/high); default: the model's."
    )

    def sampling_overrides(self) -> dict[str, Any]:
        return self.model_dump(include=set(SamplingOptions.model_fields) - {"think"})


class PromptRequest(SamplingOptions):
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="Defaults to runtime.model_reference.")
    system: str | None = None
    audio: list[str] = Field(
        default_factory=list,
        description="Base64 audio files (wav, flac, mp3, ogg) heard before the prompt (audio models).",
    )


class SessionCreateRequest(_Body):
    model: str | None = Field(None, description="Defaults to runtime.model_reference.")
    system: str | None = None


class SessionPromptRequest(SamplingOptions):
    prompt: str = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptResponse(BaseModel):
    id: str
    model: str
    text: str
    # A thinking model's reasoning, apart from the answer in ``text``.
    reasoning: str = ""
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    execution: ExecutionInfo | None = None
    session_id: str | None = None


class TokenChunk(BaseModel):
    """``event: token`` of the native SSE stream; ``event: final`` carries a PromptResponse."""

    id: str
    text: str
    reasoning: str = ""


class SessionResponse(BaseModel):
    id: str
    model: str
    system: str | None
    messages: list[ChatMessage]
    created_at: float
    updated_at: float


class PlanRequest(_Body):
    model: str | None = Field(None, description="Defaults to runtime.model_reference.")
    backend: Literal["auto", "optimized-native", "transformers-generic"] | None = None
    device: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    use_specialization: bool | None = None
    memory_budget: int | str | None = Field(None, description="Bytes, a size such as 8GiB, or auto.")
    dense_projection_chunk_rows: int | None = Field(None, ge=0)
    layer_streaming: Literal["auto", "on", "off"] | None = Field(
        None, description="Stream decoder layers from disk: auto (when the weights exceed the budget), on or off."
    )
    context_tokens: int | None = Field(
        None, ge=1, description="Tokens of KV cache the memory estimate covers (default: the model's context)."
    )

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return None
        try:
            return parse_size(value)
        except SettingsError as exc:
            raise ValueError(str(exc)) from None


class LoadUnderWay(BaseModel):
    """One worker loading the model now: how far it has got."""

    worker: str
    bytes_read: int
    bytes_total: int = Field(description="0 when the load cannot tell.")
    progress: float | None = Field(None, description="Share done, 0 to 1; null when the total is unknown.")
    started_at: float


class ModelServing(BaseModel):
    workers: int
    hosts: list[str]
    in_flight: int
    loading: list[LoadUnderWay] = Field(default_factory=list, description="Loads of the model under way.")


class RedisStatus(BaseModel):
    status: Literal["ok", "unavailable"]
    error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    redis: RedisStatus
    models: dict[str, ModelServing]
    workers: list[WorkerInfo]
