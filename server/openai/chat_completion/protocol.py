"""Request side of the OpenAI chat completions wire format; responses use the `openai` package's types."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from ollm.generation import Seed

# OpenAI's reasoning effort values; "minimal" reads as low, "none" as no thinking.
ReasoningEffortValue = Literal["none", "minimal", "low", "medium", "high"]


class _Lenient(BaseModel):
    # OpenAI adds fields often; unknown ones are ignored like the OpenAI API itself ignores them.
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str


class InputAudio(_Lenient):
    data: str = Field(description="Base64-encoded audio file")
    format: Literal["wav", "mp3", "flac", "ogg"] = Field(description="Informative: the file's own header is read")


class FileRef(_Lenient):
    file_id: str | None = Field(None, description="A /v1/files upload (purpose user_data or assistants)")
    file_data: str | None = Field(None, description="Base64 bytes or a data: URI")
    filename: str | None = None


class ContentPart(_Lenient):
    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None
    file: FileRef | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # An earlier answer's reasoning given back (Ollama's compatibility layer; vLLM's older name).
    reasoning: str | None = Field(None, validation_alias=AliasChoices("reasoning", "reasoning_content"))

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class Reasoning(_Lenient):
    effort: ReasoningEffortValue | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="Choices; each is its own request (seed, seed+1, ... when seeded).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # Reasoning models: how hard to think ("none" asks a thinking template not to); `reasoning.effort`
    # is the same (Ollama's compatibility layer accepts both).
    reasoning_effort: ReasoningEffortValue | None = None
    reasoning: Reasoning | None = None
    # Extension (as in vLLM and llama.cpp's server): never stop at end-of-sequence; for benchmarks.
    ignore_eos: bool = False
