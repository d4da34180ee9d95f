"""Anthropic Messages wire format (``POST /v1/messages``, ``/v1/messages/count_tokens``) as pydantic models.

Requests are lenient about fields ollm has no use for (``cache_control``, ``anthropic-beta``
extras, ``container``, ...), which clients such as Claude Code send on every call, but strict
about the ones it acts on, so a bad value is a 400 in Anthropic's error shape that names the
field. Responses and stream events are the shapes the ``anthropic`` SDK parses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# ---- requests --------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class Base64Source(_Lenient):
    type: Literal["base64"]
    media_type: str = Field(examples=["image/png"])
    data: str


class URLSource(_Lenient):
    type: Literal["url"]
    url: str


class ImageBlock(_Lenient):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] = ""
    is_error: bool = False


class ThinkingBlock(_Lenient):
    """An earlier turn's thinking, sent back by clients (the template keeps or drops it); a
    redacted one carries nothing a local model can read."""

    type: Literal["thinking", "redacted_thinking"]
    thinking: str = ""


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]


class Message(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> Message:
        if isinstance(self.content, str):
            return self
        kinds = {block.type for block in self.content}
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("tool_use blocks belong in assistant messages; answer them with tool_result blocks")
        if self.role == "assistant" and kinds & {"tool_result", "image"}:
            raise ValueError("assistant messages hold text, tool_use and thinking blocks only")
        return self


class Tool(_Lenient):
    # Anthropic's own server tools (web_search_..., bash_..., text_editor_...) have a versioned
    # type and no input_schema; ollm runs no tools itself, so only client tools are accepted.
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    input_schema: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _client_tool(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise ValueError(
                f"tool type {data['type']!r} is one of Anthropic's server tools, which ollm does not run; "
                "define it as a client tool (name, description, input_schema) and run it yourself"
            )
        return data

    @model_validator(mode="after")
    def _object_schema(self) -> Tool:
        if self.input_schema.get("type") != "object":
            raise ValueError('input_schema must be a JSON schema of "type": "object"')
        return self


class ToolChoiceAuto(_Lenient):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Lenient):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Lenient):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Lenient):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class JSONOutputFormat(_Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    format: JSONOutputFormat | None = None
    # Accepted for compatibility; ollm has no effort setting.
    effort: str | None = None


class ThinkingConfig(_Lenient):
    """Thinking models: "enabled" thinks for at most ``budget_tokens``, "disabled" asks a thinking
    template not to (gpt-oss always reasons: low effort); the others leave the model's default."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1)


class Metadata(_Lenient):
    user_id: str | None = None


class CountTokensRequest(_Lenient):
    """What makes the prompt: the fields both ``/v1/messages`` and ``/v1/messages/count_tokens`` take."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    # The structured-outputs beta's spelling of output_config.format.
    output_format: JSONOutputFormat | None = None

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self) -> CountTokensRequest:
        choice = self.tool_choice
        if choice is None or choice.type in ("auto", "none"):
            return self
        if not self.tools:
            raise ValueError(f'tool_choice "{choice.type}" needs tools')
        if isinstance(choice, ToolChoiceTool) and choice.name not in {tool.name for tool in self.tools}:
            raise ValueError(f"tool_choice names tool {choice.name!r}, which is not in tools")
        return self

    @property
    def format(self) -> JSONOutputFormat | None:
        return (self.output_config.format if self.output_config else None) or self.output_format


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None


# ---- responses -------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class OutTextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class OutToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class OutThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    # Anthropic signs its thinking so it can be verified when sent back; a local model's has none.
    signature: str = ""


OutContentBlock = Annotated[OutTextBlock | OutToolUseBlock | OutThinkingBlock, Field(discriminator="type")]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    # ollm has no prompt cache that bills differently; clients read these as numbers.
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[OutContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class MessageTokensCount(BaseModel):
    input_tokens: int


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: MessageResponse


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: OutContentBlock


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class InputJSONDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | InputJSONDelta | ThinkingDelta, Field(discriminator="type")]


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDeltaUsage(BaseModel):
    # Cumulative: input tokens are known only once the worker has read the prompt.
    input_tokens: int
    output_tokens: int


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


ErrorType = Literal[
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error", "request_too_large",
    "rate_limit_error", "api_error", "overloaded_error", "timeout_error",
]  # fmt: skip


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str


class ErrorResponse(BaseModel):
    """The body of every failure, and the data of a stream's ``error`` event."""

    type: Literal["error"] = "error"
    error: ErrorDetail
