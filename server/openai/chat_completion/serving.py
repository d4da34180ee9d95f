"""Chat completions: pure translation to and from the internal model, then the shared dispatch."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)
from openai.types.chat.chat_completion_token_logprob import TopLogprob

from ollm.errors import InvalidRequestError
from ollm.generation import (
    ChatMessage,
    Constraint,
    ContentPart,
    ErrorEvent,
    Event,
    FinalEvent,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
    ToolCall,
    Usage,
)
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings
from ollm.tools import ToolPlan, tool_plan
from server.dispatch import Completed
from server.documents import UploadedFile, referenced_file, uploaded_files
from server.errors import error_body
from server.openai.chat_completion.protocol import ChatCompletionRequest, FileRef, Message, NamedToolChoice
from server.openai.common import (
    arguments_json,
    completion_usage,
    fan_out,
    finish_reason,
    parse_arguments,
    stop_list,
    think_of,
    total_usage,
)
from server.openai.fanin import fan_in_stream, open_streams
from server.openai.runs import generate_all
from server.services import Services
from server.sse import DONE, event_stream, first_event, sse
from server.translation import image_part, json_constraint

# ---- pure translation ------------------------------------------------------------------------


def from_message(message: Message, index: int, files: dict[str, UploadedFile] | None = None) -> ChatMessage:
    content: str | list[ContentPart]
    if message.content is None or isinstance(message.content, str):
        content = message.content or ""
    else:
        content = []
        for part in message.content:
            if part.type == "text":
                content.append(ContentPart(type="text", text=part.text or ""))
            elif part.type == "file":
                ref = part.file or FileRef()
                param = f"messages.{index}.content"
                content.append(referenced_file(ref.file_id, ref.file_data, ref.filename, files or {}, param))
            elif part.type == "input_audio":
                if part.input_audio is None:
                    raise InvalidRequestError(
                        "an input_audio part needs input_audio.data and .format", param=f"messages.{index}.content"
                    )
                content.append(ContentPart(type="audio", audio=part.input_audio.data))
            elif part.image_url is not None:
                content.append(image_part(part.image_url.url, f"messages.{index}.content"))
            else:
                raise InvalidRequestError("an image_url part needs image_url.url", param=f"messages.{index}.content")
    tool_calls = [
        ToolCall(
            id=call.id, name=call.function.name,
            arguments=parse_arguments(call.function.arguments, f"messages.{index}.tool_calls"),
        )
        for call in message.tool_calls or []
    ]  # fmt: skip
    return ChatMessage(
        role=message.role, content=content, tool_calls=tool_calls, tool_call_id=message.tool_call_id,
        name=message.name, reasoning=message.reasoning or "",
    )  # fmt: skip


def constraint_of(request: ChatCompletionRequest) -> Constraint | None:
    response_format = request.response_format
    if response_format is None:
        return None
    schema = response_format.json_schema.schema_ if response_format.json_schema else None
    return json_constraint(response_format.type, schema, "response_format.json_schema")


def plan_of(request: ChatCompletionRequest) -> ToolPlan:
    choice = request.tool_choice
    name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
    return tool_plan(tools, name)


def file_ids(request: ChatCompletionRequest) -> set[str]:
    """The /v1/files uploads this request's file parts name (read before translating)."""
    return {
        part.file.file_id
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
        if part.file is not None and part.file.file_id is not None
    }


def from_chat_request(
    request: ChatCompletionRequest, defaults: GenerationSettings, files: dict[str, UploadedFile] | None = None
) -> GenerationRequest:
    """``files``: the uploads the request names by file_id (``file_ids``), already read."""
    sampling = sampling_params(
        defaults,
        max_new_tokens=request.max_completion_tokens or request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop_list(request.stop),
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs if request.logprobs else None,
        ignore_eos=request.ignore_eos,
    )
    plan = plan_of(request)
    return GenerationRequest(
        model=request.model,
        messages=[from_message(message, i, files) for i, message in enumerate(request.messages)],
        tools=plan.tools,
        sampling=sampling,
        # A forced tool call wins over response_format: the call's arguments follow the tool's schema.
        constraint=plan.constraint or constraint_of(request),
        think=think_of(request.reasoning_effort or (request.reasoning.effort if request.reasoning else None)),
    )


def token_logprobs(logprobs: list[TokenLogprob]) -> list[ChatCompletionTokenLogprob]:
    return [
        ChatCompletionTokenLogprob(
            token=item.token, bytes=list(item.token.encode()), logprob=item.logprob,
            top_logprobs=[TopLogprob(token=t.token, bytes=list(t.token.encode()), logprob=t.logprob) for t in item.top],
        )
        for item in logprobs
    ]  # fmt: skip


def completion_id(request_id: str) -> str:
    return f"chatcmpl-{request_id}"


def _message_tool_call(call: ToolCall) -> ChatCompletionMessageFunctionToolCall:
    return ChatCompletionMessageFunctionToolCall(
        id=call.id, type="function", function=Function(name=call.name, arguments=arguments_json(call))
    )


def to_choice(request: GenerationRequest, index: int, final: FinalEvent, logprobs: list[TokenLogprob]) -> Choice:
    calls = final.tool_calls
    message = ChatCompletionMessage(
        role="assistant", content=final.text if final.text or not calls else None,
        tool_calls=[_message_tool_call(call) for call in calls] or None,
    )  # fmt: skip
    if final.reasoning:
        # Ollama's compatibility layer's name (the `openai` types keep unknown fields).
        message.reasoning = final.reasoning  # type: ignore[attr-defined]
    return Choice(
        index=index, message=message, finish_reason=finish_reason(final.finish_reason, bool(calls)),
        logprobs=ChoiceLogprobs(content=token_logprobs(logprobs)) if request.sampling.logprobs else None,
    )  # fmt: skip


def to_chat_completion(
    request: GenerationRequest, final: FinalEvent, logprobs: list[TokenLogprob], created: int,
    more: Sequence[Completed] = (),
) -> ChatCompletion:  # fmt: skip
    """Choice 0 from ``final``; choices 1.. (``n`` > 1) from ``more``; usage is their sum."""
    choices = [to_choice(request, 0, final, logprobs)]
    choices += [to_choice(request, i, done.final, done.logprobs) for i, done in enumerate(more, start=1)]
    finals = [final, *(done.final for done in more)]
    usage = total_usage(dict(enumerate(finals)), len(finals))
    return ChatCompletion(
        id=completion_id(request.id), object="chat.completion", created=created, model=request.model,
        choices=choices, usage=completion_usage(usage),
    )  # fmt: skip


def _chunk(request: GenerationRequest, created: int, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
    chunk = ChatCompletionChunk(
        id=completion_id(request.id), object="chat.completion.chunk", created=created, model=request.model,
        choices=choices, usage=completion_usage(usage) if usage is not None else None,
    )  # fmt: skip
    return sse(chunk.model_dump(mode="json", exclude_unset=True))


def first_chunk(request: GenerationRequest, created: int, index: int = 0) -> str:
    delta = ChoiceDelta(role="assistant", content="")
    return _chunk(request, created, [ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=None)])


class ChunkFrames:
    """SSE frames for each event of one streamed choice: content deltas, tool-call deltas (a call's
    id and name first, then its arguments), the finishing chunk(s), or an error object."""

    def __init__(self, request: GenerationRequest, created: int, include_usage: bool, index: int = 0) -> None:
        self.request = request
        self.created = created
        self.include_usage = include_usage
        self.index = index
        self.calls = 0

    def _choice(self, delta: ChoiceDelta, logprobs: list[TokenLogprob] | None = None, finish: Any = None) -> str:
        chunk_logprobs = ChunkLogprobs(content=token_logprobs(logprobs)) if logprobs is not None else None
        choice = ChunkChoice(index=self.index, delta=delta, logprobs=chunk_logprobs, finish_reason=finish)
        return _chunk(self.request, self.created, [choice])

    def _call_frames(self, calls: list[ToolCall]) -> list[str]:
        out = []
        for call in calls:
            head = ChoiceDeltaToolCall(
                index=self.calls, id=call.id, type="function",
                function=ChoiceDeltaToolCallFunction(name=call.name, arguments=""),
            )  # fmt: skip
            arguments = ChoiceDeltaToolCall(
                index=self.calls, function=ChoiceDeltaToolCallFunction(arguments=arguments_json(call))
            )
            out += [self._choice(ChoiceDelta(tool_calls=[head])), self._choice(ChoiceDelta(tool_calls=[arguments]))]
            self.calls += 1
        return out

    def __call__(self, event: Event) -> Iterable[str]:
        if isinstance(event, TokenEvent):
            logprobs = event.logprobs if self.request.sampling.logprobs else None
            out = []
            if event.reasoning:
                out.append(self._choice(ChoiceDelta(reasoning=event.reasoning)))
            if event.text or logprobs:
                out.append(self._choice(ChoiceDelta(content=event.text), logprobs))
            return out + self._call_frames(event.tool_calls)
        if isinstance(event, FinalEvent):
            out = []
            finish = finish_reason(event.finish_reason, self.calls > 0)
            out.append(self._choice(ChoiceDelta(), finish=finish))
            if self.include_usage:
                out.append(_chunk(self.request, self.created, [], usage=event.usage))
            return out
        assert isinstance(event, ErrorEvent)
        return [sse(error_body(event.status, event.message, code=event.code))]


def chunk_frames(request: GenerationRequest, created: int, include_usage: bool) -> ChunkFrames:
    return ChunkFrames(request, created, include_usage)


# ---- wiring ----------------------------------------------------------------------------------


async def stream_choices(
    services: Services, http: Request, body: ChatCompletionRequest, request: GenerationRequest, created: int
) -> Response:
    """``n`` > 1 streamed: one job per choice, their chunks interleaved, one usage chunk at the end."""
    requests = fan_out(request, body.n)
    streams, firsts = await open_streams(services.dispatcher, requests, http.is_disconnected)
    frames = [ChunkFrames(choice, created, False, index) for index, choice in enumerate(requests)]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def tail(finals: dict[int, FinalEvent]) -> list[str]:
        done = include_usage and len(finals) == len(requests)
        usage = [_chunk(request, created, [], usage=total_usage(finals, body.n))] if done else []
        return [*usage, DONE]

    return fan_in_stream(
        streams, firsts, lambda index, event: frames[index](event),
        head=[first_chunk(request, created, index) for index in range(body.n)], tail=tail,
    )  # fmt: skip


async def create_chat_completion(services: Services, http: Request, body: ChatCompletionRequest) -> Response:
    files = await uploaded_files(services.files, file_ids(body))
    request = from_chat_request(body, services.settings.generation, files)
    created = int(time.time())
    if not body.stream:
        done, *more = await generate_all(services.dispatcher, fan_out(request, body.n), http.is_disconnected)
        completion = to_chat_completion(request, done.final, done.logprobs, created, more)
        return JSONResponse(completion.model_dump(mode="json", exclude_unset=True))
    if body.n > 1:
        return await stream_choices(services, http, body, request, created)
    job = await services.dispatcher.submit(request)
    first = await first_event(job, http.is_disconnected)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return event_stream(
        job, first, chunk_frames(request, created, include_usage),
        head=[first_chunk(request, created)], tail=[DONE],
    )  # fmt: skip
