"""The one internal generation request and event stream every API family translates to and from.

A request travels as JSON (RQ job argument); events travel as JSON over Redis pub/sub. Translator
modules (OpenAI chat/completions/Responses, native ollm routes, Ollama /api) map their wire
formats onto these types and back; the engine only ever sees these.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ollm.errors import OllmError
from ollm.settings import Quantization

Role = Literal["system", "developer", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]
# How hard a reasoning model thinks: gpt-oss's "Reasoning: low|medium|high" (Ollama's `think`
# levels, OpenAI's `reasoning_effort`).
ReasoningEffort = Literal["low", "medium", "high"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(Strict):
    type: Literal["text", "image", "audio"]
    text: str | None = None
    # Base64 image bytes or a data: URI.
    image: str | None = None
    # Base64 bytes of an audio file (wav, flac, mp3, ogg): decoded by the model's engine (ollm.audio).
    audio: str | None = None


class ToolCall(Strict):
    id: str = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    name: str
    # Parsed JSON object; translators serialize it to a string where the wire format wants one.
    arguments: dict[str, Any] = Field(default_factory=dict)
    # The arguments exactly as generated, set only when output ended (max tokens) before they were
    # complete JSON; ``arguments`` then holds what could be read of them.
    partial_arguments: str | None = None


class ChatMessage(Strict):
    role: Role
    content: str | list[ContentPart] = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None
    # An assistant turn's reasoning, given back in a later turn (templates keep or drop it).
    reasoning: str = ""

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def images(self) -> list[str]:
        if isinstance(self.content, str):
            return []
        return [part.image for part in self.content if part.type == "image" and part.image]

    def audios(self) -> list[str]:
        if isinstance(self.content, str):
            return []
        return [part.audio for part in self.content if part.type == "audio" and part.audio]


# A sampling seed: what a 64-bit generator takes (torch refuses larger ones at sampling time, a
# 500 deep in a worker); every API family's protocol uses this type, so a bigger one is a 4xx.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class SamplingParams(Strict):
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list)
    repetition_penalty: float = Field(1.0, gt=0.0)
    # Tokens (prompt and output) the repetition penalty looks back over: -1 all, 0 none (Ollama's).
    repeat_last_n: int = Field(-1, ge=-1)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    # Generate exactly max_new_tokens (benchmarks; vLLM and llama.cpp's server offer the same).
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Constraint(Strict):
    """Constrained decoding: the output must match this, enforced token by token by a grammar."""

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None
    # Literal text the output must start and end with around the JSON (e.g. a tool-call wrapper).
    prefix: str = ""
    suffix: str = ""
    # A forced tool call: the tools it may go to (formats that name the call outside the JSON,
    # harmony's recipient, put a single one in the prompt and constrain only the arguments).
    calls: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _schema_present(self) -> Constraint:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema constraint needs json_schema")
        return self


class Transcription(Strict):
    """Transcribe the request's one audio part in the model's own transcription format (not a chat)."""

    # ISO-639-1 code; None lets the model detect the language.
    language: str | None = Field(None, min_length=2, max_length=2)


class GenerationRequest(Strict):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    model: str
    # Exactly one of messages (rendered with the chat template) or prompt (used as raw text).
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    # A Jinja chat template that replaces the tokenizer's own (Ollama `template`, created models).
    chat_template: str | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    constraint: Constraint | None = None
    transcription: Transcription | None = None
    # Thinking models only: None = the model's default; False asks a template with an
    # enable_thinking switch not to think; True or an effort asks it to (gpt-oss always reasons,
    # at the given effort, medium by default).
    think: bool | ReasoningEffort | None = None
    # Reasoning tokens allowed before the model is made to answer (Anthropic's budget_tokens).
    reasoning_budget: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.transcription is not None and sum(len(m.audios()) for m in self.messages or []) != 1:
            raise ValueError("a transcription needs messages holding exactly one audio part")
        return self


class TopLogprob(Strict):
    token: str
    token_id: int
    logprob: float


class TokenLogprob(Strict):
    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob] = Field(default_factory=list)


class Usage(Strict):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(Strict):
    """Milliseconds. queue: submitted -> admitted; prompt_eval: prefill; generation: decode."""

    queue_ms: float = 0.0
    load_ms: float = 0.0
    prompt_eval_ms: float = 0.0
    generation_ms: float = 0.0
    total_ms: float = 0.0


class ExecutionInfo(Strict):
    model: str
    backend: str
    specialization_state: str
    device: str
    dtype: str
    batch_invariant: bool = False
    quantization: Quantization = "none"
    applied_passes: list[str] = Field(default_factory=list)
    fallback_reason: str | None = None


class TokenEvent(Strict):
    """One step of output, already split (ollm.reasoning): ``text`` is answer content, ``reasoning``
    the model's thinking, ``tool_calls`` the calls completed at this step."""

    type: Literal["token"] = "token"
    text: str
    reasoning: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    token_ids: list[int] = Field(default_factory=list)
    logprobs: list[TokenLogprob] = Field(default_factory=list)


class FinalEvent(Strict):
    type: Literal["final"] = "final"
    finish_reason: FinishReason
    # The whole answer content, reasoning and tool calls (the TokenEvents' joined).
    text: str
    reasoning: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage
    timings: Timings
    execution: ExecutionInfo | None = None
    # The stop sequence (of ``sampling.stop``) that ended the output, when one did (Anthropic's
    # ``stop_sequence`` names it; finish_reason is "stop" either way).
    stop_sequence: str | None = None


class ErrorEvent(Strict):
    type: Literal["error"] = "error"
    message: str
    status: int = 500
    code: str = "generation_failed"

    @classmethod
    def from_error(cls, exc: OllmError) -> ErrorEvent:
        return cls(message=exc.message, status=exc.status, code=exc.code)


Event = Annotated[TokenEvent | FinalEvent | ErrorEvent, Field(discriminator="type")]


class EmbeddingRequest(Strict):
    model: str
    inputs: list[str] | list[list[int]]
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)


class EmbeddingResult(Strict):
    model: str
    embeddings: list[list[float]]
    prompt_tokens: int
