"""Responses: input items onto the internal conversation, output back as typed items and events.

A response's conversation is what ``previous_response_id`` continues: the stored ``messages``
(earlier inputs, outputs, function calls and their outputs, in the internal form) plus this
request's input. ``instructions`` are not part of it: like OpenAI, each request brings its own.
Streamed and non-streamed responses are built by the same ``ResponseBuilder`` and stored alike.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from openai.types.responses import Response as OpenAIResponse

from ollm.errors import InvalidRequestError, OllmError
from ollm.generation import (
    ChatMessage,
    ContentPart,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    TokenEvent,
    ToolCall,
    Usage,
)
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings
from ollm.tools import ToolPlan, tool_plan
from server.documents import UploadedFile, referenced_file, uploaded_files
from server.openai.common import arguments_json, parse_arguments, think_of
from server.openai.responses.protocol import (
    FunctionCallItem,
    InputFile,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    NamedFunction,
    ReasoningItem,
    Refusal,
    ResponseRequest,
)
from server.services import Services
from server.sse import event_stream, first_event, sse
from server.stores.responses import ResponseStore, StoredResponse
from server.translation import image_part, json_constraint


class ResponseNotFoundError(OllmError):
    status = 404
    code = "not_found"
    kind = "invalid_request_error"


class PreviousResponseNotFoundError(InvalidRequestError):
    # OpenAI answers an unknown previous_response_id with 400 (a bad parameter), not 404.
    code = "previous_response_not_found"


class StoreDisabledError(InvalidRequestError):
    code = "response_store_disabled"

    def __init__(self, param: str | None = None) -> None:
        super().__init__(
            "stored responses are disabled (server.response_store_backend = none); set "
            "server.response_store_backend to redis or memory to retrieve responses or use previous_response_id",
            param=param,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- input -----------------------------------------------------------------------------------


def file_ids(body: ResponseRequest) -> set[str]:
    """The /v1/files uploads this request's parts name (read before translating)."""
    return {
        part.file_id
        for item in input_of(body)
        if isinstance(item, MessageItem) and not isinstance(item.content, str)
        for part in item.content
        if isinstance(part, InputFile | InputImage) and part.file_id is not None
    }


def _content(item: MessageItem, files: dict[str, UploadedFile], param: str) -> str | list[ContentPart]:
    if isinstance(item.content, str):
        return item.content
    parts: list[ContentPart] = []
    for i, part in enumerate(item.content):
        where = f"{param}.content.{i}"
        if isinstance(part, InputText):
            parts.append(ContentPart(type="text", text=part.text))
        elif isinstance(part, Refusal):
            parts.append(ContentPart(type="text", text=part.refusal))
        elif isinstance(part, InputImage) and part.image_url is not None:
            parts.append(image_part(part.image_url, where))
        elif isinstance(part, InputImage):
            parts.append(referenced_file(part.file_id, None, None, files, where))
        else:
            parts.append(referenced_file(part.file_id, part.file_data, part.filename, files, where))
    return parts


def _call_names(messages: list[ChatMessage]) -> dict[str, str]:
    return {call.id: call.name for message in messages for call in message.tool_calls}


def to_messages(
    items: list[InputItem], prior: list[ChatMessage], files: dict[str, UploadedFile] | None = None
) -> list[ChatMessage]:
    """Input items as internal messages; consecutive function calls share one assistant turn."""
    out: list[ChatMessage] = []
    for i, item in enumerate(items):
        param = f"input.{i}"
        if isinstance(item, ReasoningItem):
            # Reasoning opens the assistant turn that its message or calls continue.
            out.append(ChatMessage(role="assistant", reasoning="".join(part.text for part in item.content or [])))
        elif isinstance(item, MessageItem):
            if item.role == "assistant" and out and out[-1].role == "assistant" and not out[-1].text():
                out[-1].content = _content(item, files or {}, param)
            else:
                out.append(ChatMessage(role=item.role, content=_content(item, files or {}, param)))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, name=item.name, arguments=parse_arguments(item.arguments, param))
            # Calls following an assistant message (or each other) belong to that same turn.
            if out and out[-1].role == "assistant":
                out[-1].tool_calls.append(call)
            else:
                out.append(ChatMessage(role="assistant", tool_calls=[call]))
        else:
            name = _call_names(prior + out).get(item.call_id)
            if name is None:
                raise InvalidRequestError(
                    f"no function_call with call_id {item.call_id!r} precedes this function_call_output",
                    param=param,
                )
            output = item.output if isinstance(item.output, str) else "".join(part.text for part in item.output)
            out.append(ChatMessage(role="tool", content=output, tool_call_id=item.call_id, name=name))
    return out


def input_of(body: ResponseRequest) -> list[InputItem]:
    """A string input is one user message."""
    return [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input)


def stored_items(body: ResponseRequest) -> list[dict[str, Any]]:
    """This request's input as the items ``input_items`` lists: ids assigned, messages normalized."""
    out: list[dict[str, Any]] = []
    for item in input_of(body):
        if isinstance(item, ReasoningItem):
            out.append(reasoning_item(item.id or new_id("rs"), "".join(part.text for part in item.content or [])))
        elif isinstance(item, MessageItem):
            text_type = "output_text" if item.role == "assistant" else "input_text"
            content = [{"type": text_type, "text": item.content}] if isinstance(item.content, str) else [
                part.model_dump(mode="json", exclude_none=True, by_alias=True) for part in item.content
            ]  # fmt: skip
            out.append({"id": item.id or new_id("msg"), "type": "message", "role": item.role, "content": content,
                        "status": "completed"})  # fmt: skip
        elif isinstance(item, FunctionCallItem):
            out.append({"id": item.id or new_id("fc"), "type": "function_call", "call_id": item.call_id,
                        "name": item.name, "arguments": item.arguments, "status": "completed"})  # fmt: skip
        else:
            output = item.output if isinstance(item.output, str) else [p.model_dump(mode="json") for p in item.output]
            out.append({"id": item.id or new_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                        "output": output, "status": "completed"})  # fmt: skip
    return out


def plan_of(body: ResponseRequest) -> ToolPlan:
    choice = body.tool_choice
    name = choice.name if isinstance(choice, NamedFunction) else choice
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    return tool_plan(tools, name)


@dataclass
class Translation:
    """A Responses request made internal: the generation, and what the stored response keeps."""

    id: str
    body: ResponseRequest
    request: GenerationRequest
    plan: ToolPlan
    conversation: list[ChatMessage]
    items: list[dict[str, Any]]
    created_at: float = field(default_factory=time.time)


def from_response_request(
    body: ResponseRequest,
    prior: list[ChatMessage],
    defaults: GenerationSettings,
    files: dict[str, UploadedFile] | None = None,
) -> Translation:
    """``files``: the uploads the request names by file_id (``file_ids``), already read."""
    items = input_of(body)
    conversation = prior + to_messages(items, prior, files)
    instructions = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    plan = plan_of(body)
    text_format = body.text.format if body.text else None
    constraint = json_constraint(text_format.type, text_format.schema_, "text.format.schema") if text_format else None
    sampling = sampling_params(
        defaults, max_new_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
        seed=body.seed,
    )  # fmt: skip
    request = GenerationRequest(
        model=body.model, messages=instructions + conversation, tools=plan.tools, sampling=sampling,
        # A forced tool call wins over text.format: the call's arguments follow the tool's schema.
        constraint=plan.constraint or constraint,
        think=think_of(body.reasoning.effort if body.reasoning else None),
    )  # fmt: skip
    response_id = new_id("resp")
    return Translation(response_id, body, request, plan, conversation, stored_items(body))


# ---- output ----------------------------------------------------------------------------------


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }  # fmt: skip


def _text_config(body: ResponseRequest) -> dict[str, Any]:
    text_format = body.text.format if body.text else None
    if text_format is None or text_format.type == "text":
        return {"format": {"type": "text"}}
    if text_format.type == "json_object":
        return {"format": {"type": "json_object"}}
    return {"format": {"type": "json_schema", "name": text_format.name or "response", "schema": text_format.schema_,
                       "strict": text_format.strict, "description": text_format.description}}  # fmt: skip


def _tool_choice(body: ResponseRequest) -> Any:
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        return {"type": "function", "name": choice.name}
    return choice or "auto"


def message_item(item_id: str, text: str | None) -> dict[str, Any]:
    """A message output item: in progress with no content yet (``text`` None), or completed."""
    if text is None:
        return {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": content}


def reasoning_item(item_id: str, text: str | None) -> dict[str, Any]:
    """A reasoning output item: in progress (``text`` None) or completed with its reasoning text."""
    if text is None:
        return {"id": item_id, "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
    content = [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": "completed"}


def call_item(item_id: str, call: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call.id, "name": call.name, "arguments": arguments,
            "status": status}  # fmt: skip


class ResponseBuilder:
    """The response object of one translation, its output items as they complete, and (streaming)
    the typed events that describe each step, numbered by ``sequence_number``."""

    def __init__(self, translation: Translation) -> None:
        self.t = translation
        self.output: list[dict[str, Any]] = []
        self.sequence = 0
        self.text = ""
        self.calls: list[ToolCall] = []
        self.reasoning = ""
        self._reasoning: str | None = None  # id of the reasoning item being streamed
        self._message: str | None = None  # id of the message item being streamed
        self._pending = ""  # leading whitespace held back until the message clearly has content

    # -- snapshots

    def snapshot(self, status: str, usage: Usage | None = None, error: dict[str, Any] | None = None,
                 incomplete: str | None = None) -> dict[str, Any]:  # fmt: skip
        body = self.t.body
        response = {
            "id": self.t.id, "object": "response", "created_at": self.t.created_at, "model": body.model,
            "status": status, "output": list(self.output), "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "tools": [tool.model_dump(mode="json", exclude_none=True) for tool in body.tools or []],
            "tool_choice": _tool_choice(body), "parallel_tool_calls": body.parallel_tool_calls is not False,
            "temperature": self.t.request.sampling.temperature, "top_p": self.t.request.sampling.top_p,
            "max_output_tokens": body.max_output_tokens, "previous_response_id": body.previous_response_id,
            "text": _text_config(body), "usage": _usage(usage) if usage is not None else None,
            "user": body.user, "store": body.store, "truncation": "disabled", "background": False,
            "completed_at": time.time() if status == "completed" else None,
        }  # fmt: skip
        # Validated against the SDK's own type, so a field we get wrong fails here, not in a client.
        return OpenAIResponse.model_validate(response).model_dump(mode="json", by_alias=True, exclude_unset=True)

    def complete(self, final: FinalEvent) -> dict[str, Any]:
        """The whole output at once (non-streamed)."""
        text, calls = final.text, final.tool_calls
        if final.reasoning:
            self.output.append(reasoning_item(new_id("rs"), final.reasoning))
        if text.strip():
            self.output.append(message_item(new_id("msg"), text))
        for call in calls:
            self.output.append(call_item(new_id("fc"), call, arguments_json(call), "completed"))
        self.text, self.calls, self.reasoning = text, calls, final.reasoning
        return self.final_snapshot(final)

    def final_snapshot(self, final: FinalEvent) -> dict[str, Any]:
        if final.finish_reason == "length":
            return self.snapshot("incomplete", final.usage, incomplete="max_output_tokens")
        return self.snapshot("completed", final.usage)

    def record(self, response: dict[str, Any]) -> StoredResponse:
        answer = ChatMessage(
            role="assistant", content=self.text.strip(), tool_calls=self.calls, reasoning=self.reasoning
        )
        return StoredResponse(
            id=self.t.id, response=response, input_items=self.t.items, messages=[*self.t.conversation, answer]
        )

    # -- events

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, event=kind)

    def start(self) -> list[str]:
        created = self.snapshot("in_progress")
        return [self.event("response.created", response=created), self.event("response.in_progress", response=created)]

    def _reasoning_delta(self, text: str) -> list[str]:
        out = []
        index = len(self.output)
        if self._reasoning is None:
            self._reasoning = new_id("rs")
            item = reasoning_item(self._reasoning, None)
            out.append(self.event("response.output_item.added", output_index=index, item=item))
        self.reasoning += text
        return out + [self.event("response.reasoning_text.delta", output_index=index, item_id=self._reasoning,
                                 content_index=0, delta=text)]  # fmt: skip

    def _close_reasoning(self) -> list[str]:
        if self._reasoning is None:
            return []
        item_id, index = self._reasoning, len(self.output)
        self._reasoning = None
        item = reasoning_item(item_id, self.reasoning)
        self.output.append(item)
        return [
            self.event("response.reasoning_text.done", output_index=index, item_id=item_id, content_index=0,
                       text=self.reasoning),
            self.event("response.output_item.done", output_index=index, item=item),
        ]  # fmt: skip

    def _text_delta(self, text: str) -> list[str]:
        if self._message is None:
            if not (self._pending + text).strip():
                self._pending += text
                return []
            text, self._pending = self._pending + text, ""
            self._message = new_id("msg")
            index = len(self.output)
            out = [
                self.event("response.output_item.added", output_index=index,
                           item=message_item(self._message, None)),
                self.event("response.content_part.added", output_index=index, item_id=self._message, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
            ]  # fmt: skip
        else:
            out = []
        self.text += text
        index = len(self.output)
        return out + [self.event("response.output_text.delta", output_index=index, item_id=self._message,
                                 content_index=0, delta=text, logprobs=[])]  # fmt: skip

    def _close_message(self) -> list[str]:
        if self._message is None:
            return []
        item_id, index, text = self._message, len(self.output), self.text
        self._message = None
        item = message_item(item_id, text)
        self.output.append(item)
        part = item["content"][0]
        return [
            self.event("response.output_text.done", output_index=index, item_id=item_id, content_index=0, text=text,
                       logprobs=[]),
            self.event("response.content_part.done", output_index=index, item_id=item_id, content_index=0, part=part),
            self.event("response.output_item.done", output_index=index, item=item),
        ]  # fmt: skip

    def _call(self, call: ToolCall) -> list[str]:
        out = self._close_message()
        item_id, index, arguments = new_id("fc"), len(self.output), arguments_json(call)
        self.calls.append(call)
        done = call_item(item_id, call, arguments, "completed")
        self.output.append(done)
        return out + [
            self.event("response.output_item.added", output_index=index,
                       item=call_item(item_id, call, "", "in_progress")),
            self.event("response.function_call_arguments.delta", output_index=index, item_id=item_id, delta=arguments),
            self.event("response.function_call_arguments.done", output_index=index, item_id=item_id,
                       arguments=arguments, name=call.name),
            self.event("response.output_item.done", output_index=index, item=done),
        ]  # fmt: skip

    def on_token(self, event: TokenEvent) -> list[str]:
        out = self._reasoning_delta(event.reasoning) if event.reasoning else []
        if event.text.strip() or event.tool_calls:
            # The answer has begun: the reasoning item is done.
            out += self._close_reasoning()
        out += self._text_delta(event.text) if event.text else []
        for call in event.tool_calls:
            out += self._call(call)
        return out

    def on_final(self, final: FinalEvent) -> tuple[list[str], dict[str, Any]]:
        """The closing events and the finished response (whose event comes last)."""
        out = self._close_reasoning() + self._close_message()
        response = self.final_snapshot(final)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return [*out, self.event(kind, response=response)], response

    def on_error(self, event: ErrorEvent) -> list[str]:
        # Items still open are dropped: the failed response lists only what was finished.
        self._message = None
        error = {"code": "server_error", "message": event.message}
        return [self.event("response.failed", response=self.snapshot("failed", error=error))]


# ---- wiring ----------------------------------------------------------------------------------


def _require_store(store: ResponseStore, param: str | None = None) -> None:
    if not store.enabled:
        raise StoreDisabledError(param)


async def _prior(store: ResponseStore, previous_id: str | None) -> list[ChatMessage]:
    if previous_id is None:
        return []
    _require_store(store, "previous_response_id")
    stored = await store.get(previous_id)
    if stored is None:
        raise PreviousResponseNotFoundError(
            f"previous response {previous_id!r} not found (deleted, expired, or stored with store: false)",
            param="previous_response_id",
        )
    return stored.messages


class StreamFrames:
    """The relay's view of a streamed response: frames per event, and the store at the end."""

    def __init__(self, builder: ResponseBuilder, store: ResponseStore | None) -> None:
        self.builder = builder
        self.store = store
        self.closing: list[str] = []

    async def on_final(self, final: FinalEvent) -> None:
        sequence = self.builder.sequence
        self.closing, response = self.builder.on_final(final)
        if self.store is not None:
            try:
                await self.store.put(self.builder.t.id, self.builder.record(response))
            except Exception:
                # The relay ends the stream with response.failed instead; number it right after
                # what was sent, since the closing events never will be.
                self.builder.sequence = sequence
                raise

    def __call__(self, event: Event) -> Iterable[str]:
        if isinstance(event, TokenEvent):
            return self.builder.on_token(event)
        if isinstance(event, FinalEvent):
            return self.closing
        assert isinstance(event, ErrorEvent)
        return self.builder.on_error(event)


async def create_response(services: Services, http: Request, body: ResponseRequest) -> Response:
    store = services.responses
    files = await uploaded_files(services.files, file_ids(body))
    translation = from_response_request(
        body, await _prior(store, body.previous_response_id), services.settings.generation, files
    )
    builder = ResponseBuilder(translation)
    keep = store if body.store and store.enabled else None
    if not body.stream:
        done = await services.dispatcher.generate(translation.request, http.is_disconnected)
        response = builder.complete(done.final)
        if keep is not None:
            await keep.put(translation.id, builder.record(response))
        return JSONResponse(response)
    job = await services.dispatcher.submit(translation.request)
    first = await first_event(job, http.is_disconnected)
    frames = StreamFrames(builder, keep)
    return event_stream(job, first, frames, head=builder.start(), on_final=frames.on_final)


async def retrieve_response(services: Services, response_id: str) -> dict[str, Any]:
    return (await _stored(services.responses, response_id)).response


async def delete_response(services: Services, response_id: str) -> dict[str, Any]:
    _require_store(services.responses)
    if not await services.responses.delete(response_id):
        raise ResponseNotFoundError(f"response {response_id!r} not found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}


async def list_input_items(
    services: Services, response_id: str, limit: int, order: str, after: str | None
) -> dict[str, Any]:
    items = list((await _stored(services.responses, response_id)).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequestError(f"no input item {after!r} in response {response_id!r}", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit,
    }  # fmt: skip


async def _stored(store: ResponseStore, response_id: str) -> StoredResponse:
    _require_store(store)
    stored = await store.get(response_id)
    if stored is None:
        raise ResponseNotFoundError(f"response {response_id!r} not found")
    return stored
