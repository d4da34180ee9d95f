"""Anthropic Messages: pure translation to and from the internal model, then the shared dispatch.

``from_messages_request`` maps a Messages request onto ``GenerationRequest`` (system, text and
image blocks, tool_use / tool_result turns, tools and tool_choice, output_config.format, stop
sequences, sampling); ``to_message`` and ``StreamFrames`` map the worker's events back to a
``message`` or to Anthropic's typed SSE events. Tool calls and JSON output use the same grammar
constraints and the same call parser as the OpenAI families (``ollm.tools``, ``server.translation``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ollm.generation import (
    ChatMessage,
    ContentPart,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
    ToolCall,
)
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings
from ollm.tools import ToolPlan, tool_plan
from server.anthropic.errors import error_body
from server.anthropic.protocol import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    ImageBlock,
    InputJSONDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessageResponse,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    MessageTokensCount,
    OutContentBlock,
    OutTextBlock,
    OutThinkingBlock,
    OutToolUseBlock,
    PingEvent,
    StopReason,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingConfig,
    ThinkingDelta,
    Tool,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
    Usage,
)
from server.services import Services
from server.sse import event_stream, first_event, sse
from server.translation import image_part, json_constraint

# ---- pure translation: request ---------------------------------------------------------------


def image_of(block: ImageBlock, param: str) -> ContentPart:
    source = block.source
    if source.type == "base64":
        return ContentPart(type="image", image=f"data:{source.media_type};base64,{source.data}")
    return image_part(source.url, param)


def _parts(blocks: Iterable[TextBlock | ImageBlock], param: str) -> list[ContentPart]:
    return [
        ContentPart(type="text", text=block.text) if isinstance(block, TextBlock) else image_of(block, param)
        for block in blocks
    ]


def _tool_result(block: ToolResultBlock, names: dict[str, str], param: str) -> ChatMessage:
    content: str | list[ContentPart] = block.content if isinstance(block.content, str) else _parts(block.content, param)
    if block.is_error:
        # The model reads text only; say plainly that the call failed.
        prefix = ContentPart(type="text", text="Error: ")
        content = f"Error: {content}" if isinstance(content, str) else [prefix, *content]
    return ChatMessage(role="tool", content=content, tool_call_id=block.tool_use_id, name=names.get(block.tool_use_id))


def from_message(message: Message, index: int, names: dict[str, str]) -> list[ChatMessage]:
    """One Anthropic turn as internal messages: a user turn's tool_result blocks become tool
    messages (first, as Anthropic requires them to come first), the rest one user message; an
    assistant turn's tool_use blocks become its tool calls. ``names`` maps tool_use ids to tool
    names, filled from assistant turns, so a tool result can name its tool."""
    param = f"messages.{index}.content"
    if isinstance(message.content, str):
        return [ChatMessage(role=message.role, content=message.content)]
    parts: list[ContentPart] = []
    calls: list[ToolCall] = []
    results: list[ChatMessage] = []
    thinking: list[str] = []
    for block in message.content:
        if isinstance(block, TextBlock | ImageBlock):
            parts += _parts([block], param)
        elif isinstance(block, ToolUseBlock):
            names[block.id] = block.name
            calls.append(ToolCall(id=block.id, name=block.name, arguments=block.input))
        elif isinstance(block, ToolResultBlock):
            results.append(_tool_result(block, names, param))
        elif isinstance(block, ThinkingBlock):
            thinking.append(block.thinking)
    if message.role == "assistant":
        return [ChatMessage(role="assistant", content=parts, tool_calls=calls, reasoning="".join(thinking))]
    return results + ([ChatMessage(role="user", content=parts)] if parts or not results else [])


def system_of(body: CountTokensRequest) -> list[ChatMessage]:
    if body.system is None:
        return []
    text = body.system if isinstance(body.system, str) else "\n\n".join(block.text for block in body.system)
    return [ChatMessage(role="system", content=text)] if text else []


def function_tool(tool: Tool) -> dict[str, Any]:
    """A tool in the OpenAI shape, which chat templates and ``ollm.tools`` read."""
    function = {"name": tool.name, "description": tool.description or "", "parameters": tool.input_schema}
    return {"type": "function", "function": function}


def plan_of(body: CountTokensRequest) -> ToolPlan:
    """Anthropic's tool_choice over the shared meanings: any = OpenAI's "required", tool = a name."""
    tools = [function_tool(tool) for tool in body.tools or []]
    choice = body.tool_choice
    if choice is None:
        name = None
    elif isinstance(choice, ToolChoiceTool):
        name = choice.name
    else:
        name = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return tool_plan(tools or None, name)


def messages_of(body: CountTokensRequest) -> list[ChatMessage]:
    names: dict[str, str] = {}
    conversation = [out for i, message in enumerate(body.messages) for out in from_message(message, i, names)]
    return system_of(body) + conversation


def from_messages_request(body: MessagesRequest, defaults: GenerationSettings) -> GenerationRequest:
    sampling = sampling_params(
        defaults,
        max_new_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
    )
    plan = plan_of(body)
    output = body.format
    schema = json_constraint("json_schema", output.schema_, "output_config.format.schema") if output else None
    return GenerationRequest(
        model=body.model,
        messages=messages_of(body),
        tools=plan.tools,
        sampling=sampling,
        # A forced tool call wins over the output format: its input follows the tool's schema.
        constraint=plan.constraint or schema,
        **thinking_of(body.thinking),
    )


def thinking_of(config: ThinkingConfig | None) -> dict[str, Any]:
    """``thinking`` as GenerationRequest fields: enabled (with its budget), disabled, or the model's default."""
    if config is None or config.type not in ("enabled", "disabled"):
        return {}
    if config.type == "disabled":
        return {"think": False}
    return {"think": True, "reasoning_budget": config.budget_tokens}


def count_request(body: CountTokensRequest) -> GenerationRequest:
    """The same prompt as ``from_messages_request`` renders (system, messages, offered tools),
    run for one greedy token: the worker's usage then counts it with the model's own template and
    tokenizer, so the count equals ``usage.input_tokens`` of the real request."""
    return GenerationRequest(
        model=body.model,
        messages=messages_of(body),
        tools=plan_of(body).tools,
        sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
    )


# ---- pure translation: response --------------------------------------------------------------


def message_id(request: GenerationRequest) -> str:
    return f"msg_{request.id}"


def tool_use_block(call: ToolCall) -> OutToolUseBlock:
    return OutToolUseBlock(id="toolu_" + call.id.removeprefix("call_"), name=call.name, input=call.arguments)


def stop_reason(final: FinalEvent, called_tools: bool) -> StopReason:
    # Cut short wins over a call: a call cut by max_tokens is partial.
    if final.finish_reason == "length":
        return "max_tokens"
    if called_tools:
        return "tool_use"
    # "cancelled" is only ever seen by a client that went away.
    return "stop_sequence" if final.stop_sequence is not None else "end_turn"


def usage_of(final: FinalEvent) -> Usage:
    return Usage(input_tokens=final.usage.prompt_tokens, output_tokens=final.usage.completion_tokens)


def to_message(request: GenerationRequest, final: FinalEvent) -> MessageResponse:
    calls = final.tool_calls
    content: list[OutContentBlock] = [OutThinkingBlock(thinking=final.reasoning)] if final.reasoning else []
    content += [OutTextBlock(text=final.text)] if final.text else []
    content += [tool_use_block(call) for call in calls]
    return MessageResponse(
        id=message_id(request), model=request.model,
        # Always one block, as the stream always opens one: an empty answer is one empty text.
        content=content or [OutTextBlock(text="")],
        stop_reason=stop_reason(final, bool(calls)), stop_sequence=final.stop_sequence, usage=usage_of(final),
    )  # fmt: skip


def frame(event: BaseModel) -> str:
    """One typed SSE event: its ``event:`` name is its ``type``, as Anthropic sends them."""
    data = event.model_dump(mode="json")
    return sse(data, event=data["type"])


class StreamFrames:
    """Anthropic's event sequence for one generation: ``start()`` gives message_start; then each
    event adds content blocks (content_block_start, a ping after the first, deltas,
    content_block_stop) and the final event adds message_delta (stop reason, usage) and
    message_stop. Reasoning is a thinking block of thinking_delta events; tool calls arrive
    whole, each as one input_json_delta."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.index = -1
        self.open: str | None = None
        self.pinged = False
        self.calls = 0
        # Whitespace before any text is held: before a tool call it is no text block at all
        # (the non-streamed message strips it the same way).
        self.held = ""

    def start(self) -> str:
        message = MessageResponse(
            id=message_id(self.request), model=self.request.model, content=[], stop_reason=None,
            usage=Usage(input_tokens=0, output_tokens=0),
        )  # fmt: skip
        return frame(MessageStartEvent(message=message))

    def _open(self, block: OutContentBlock) -> list[str]:
        out = self._close()
        self.index += 1
        self.open = block.type
        out.append(frame(ContentBlockStartEvent(index=self.index, content_block=block)))
        if not self.pinged:
            self.pinged = True
            out.append(frame(PingEvent()))
        return out

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [frame(ContentBlockStopEvent(index=self.index))]

    def _text(self, text: str) -> list[str]:
        out: list[str] = []
        if self.open != "text":
            text, self.held = self.held + text, ""
            if not text.strip():
                self.held = text
                return []
            out += self._open(OutTextBlock(text=""))
        return [*out, frame(ContentBlockDeltaEvent(index=self.index, delta=TextDelta(text=text)))]

    def _tool_uses(self, calls: list[ToolCall]) -> list[str]:
        out: list[str] = []
        for call in calls:
            block = tool_use_block(call)
            out += self._open(block.model_copy(update={"input": {}}))
            delta = InputJSONDelta(partial_json=json.dumps(call.arguments, ensure_ascii=False))
            out += [frame(ContentBlockDeltaEvent(index=self.index, delta=delta)), *self._close()]
            self.held = ""
            self.calls += 1
        return out

    def _thinking(self, text: str) -> list[str]:
        out = [] if self.open == "thinking" else self._open(OutThinkingBlock(thinking=""))
        return [*out, frame(ContentBlockDeltaEvent(index=self.index, delta=ThinkingDelta(thinking=text)))]

    def __call__(self, event: Event) -> list[str]:
        if isinstance(event, TokenEvent):
            out = self._thinking(event.reasoning) if event.reasoning else []
            return out + (self._text(event.text) if event.text else []) + self._tool_uses(event.tool_calls)
        if isinstance(event, FinalEvent):
            out = []
            if self.index < 0:
                out += self._open(OutTextBlock(text=""))
                if self.held:
                    out.append(frame(ContentBlockDeltaEvent(index=self.index, delta=TextDelta(text=self.held))))
            out += self._close()
            usage = MessageDeltaUsage(
                input_tokens=event.usage.prompt_tokens, output_tokens=event.usage.completion_tokens
            )
            delta = MessageDelta(stop_reason=stop_reason(event, self.calls > 0), stop_sequence=event.stop_sequence)
            return [*out, frame(MessageDeltaEvent(delta=delta, usage=usage)), frame(MessageStopEvent())]
        assert isinstance(event, ErrorEvent)
        return [sse(error_body(event.status, event.message), event="error")]


# ---- wiring ----------------------------------------------------------------------------------


async def create_message(services: Services, http: Request, body: MessagesRequest) -> Response:
    request = from_messages_request(body, services.settings.generation)
    if not body.stream:
        done = await services.dispatcher.generate(request, http.is_disconnected)
        return JSONResponse(to_message(request, done.final).model_dump(mode="json"))
    job = await services.dispatcher.submit(request)
    first = await first_event(job, http.is_disconnected)
    frames = StreamFrames(request)
    return event_stream(job, first, frames, head=[frames.start()])


async def count_tokens(services: Services, http: Request, body: CountTokensRequest) -> MessageTokensCount:
    done = await services.dispatcher.generate(count_request(body), http.is_disconnected)
    return MessageTokensCount(input_tokens=done.final.usage.prompt_tokens)
