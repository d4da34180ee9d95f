"""Chat completions: pure translation to and from the internal model, then the shared dispatch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.chat.chat_completion_chunk import ChoiceLogprobs as ChunkLogprobs
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_usage import CompletionUsage

from ollm.errors import InvalidRequestError
from ollm.generation import (
    ChatMessage,
    Constraint,
    ContentPart,
    ErrorEvent,
    Event,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    TokenLogprob,
    ToolCall,
    Usage,
)
from ollm.settings import GenerationSettings
from server.errors import error_body
from server.openai.chat_completion.protocol import ChatCompletionRequest, Message
from server.sampling import sampling_params
from server.services import Services
from server.sse import DONE, event_stream, first_event, sse

OpenAIFinish = Literal["stop", "length", "tool_calls"]

# ---- pure translation ------------------------------------------------------------------------


def from_message(message: Message) -> ChatMessage:
    content: str | list[ContentPart]
    if message.content is None or isinstance(message.content, str):
        content = message.content or ""
    else:
        content = []
        for part in message.content:
            if part.type == "text":
                content.append(ContentPart(type="text", text=part.text or ""))
            elif part.image_url is not None:
                content.append(ContentPart(type="image", image=part.image_url.url))
    tool_calls = []
    for call in message.tool_calls or []:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"tool call {call.id} has arguments that are not JSON: {exc}", param="messages"
            ) from None
        tool_calls.append(ToolCall(id=call.id, name=call.function.name, arguments=arguments))
    return ChatMessage(
        role=message.role, content=content, tool_calls=tool_calls, tool_call_id=message.tool_call_id,
        name=message.name,
    )  # fmt: skip


def constraint_of(request: ChatCompletionRequest) -> Constraint | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint(type="json_object")
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise InvalidRequestError(
            "response_format json_schema needs json_schema.schema", param="response_format.json_schema"
        )
    return Constraint(type="json_schema", json_schema=response_format.json_schema.schema_)


def from_chat_request(request: ChatCompletionRequest, defaults: GenerationSettings) -> GenerationRequest:
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    sampling = sampling_params(
        defaults,
        max_new_tokens=request.max_completion_tokens or request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs if request.logprobs else None,
    )
    return GenerationRequest(
        model=request.model,
        messages=[from_message(message) for message in request.messages],
        tools=request.tools,
        sampling=sampling,
        constraint=constraint_of(request),
    )


def finish_reason(reason: FinishReason) -> OpenAIFinish:
    # OpenAI has no "cancelled"; a cancelled request is only ever seen by a client that went away.
    return "stop" if reason == "cancelled" else reason


def completion_usage(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
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


def to_chat_completion(
    request: GenerationRequest, final: FinalEvent, logprobs: list[TokenLogprob], created: int
) -> ChatCompletion:
    choice = Choice(
        index=0,
        message=ChatCompletionMessage(role="assistant", content=final.text),
        finish_reason=finish_reason(final.finish_reason),
        logprobs=ChoiceLogprobs(content=token_logprobs(logprobs)) if request.sampling.logprobs else None,
    )
    return ChatCompletion(
        id=completion_id(request.id), object="chat.completion", created=created, model=request.model,
        choices=[choice], usage=completion_usage(final.usage),
    )  # fmt: skip


def _chunk(request: GenerationRequest, created: int, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
    chunk = ChatCompletionChunk(
        id=completion_id(request.id), object="chat.completion.chunk", created=created, model=request.model,
        choices=choices, usage=completion_usage(usage) if usage is not None else None,
    )  # fmt: skip
    return sse(chunk.model_dump(mode="json", exclude_unset=True))


def first_chunk(request: GenerationRequest, created: int) -> str:
    delta = ChoiceDelta(role="assistant", content="")
    return _chunk(request, created, [ChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=None)])


def chunk_frames(request: GenerationRequest, created: int, include_usage: bool) -> Any:
    """SSE frames for one event: a content delta, the finishing chunk(s), or an error object."""

    def frames(event: Event) -> Iterable[str]:
        if isinstance(event, TokenEvent):
            logprobs = ChunkLogprobs(content=token_logprobs(event.logprobs)) if request.sampling.logprobs else None
            delta = ChoiceDelta(content=event.text)
            choice = ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=None)
            return [_chunk(request, created, [choice])]
        if isinstance(event, FinalEvent):
            finish = ChunkChoice(index=0, delta=ChoiceDelta(), finish_reason=finish_reason(event.finish_reason))
            out = [_chunk(request, created, [finish])]
            if include_usage:
                out.append(_chunk(request, created, [], usage=event.usage))
            return out
        assert isinstance(event, ErrorEvent)
        return [sse(error_body(event.status, event.message, code=event.code))]

    return frames


# ---- wiring ----------------------------------------------------------------------------------


async def create_chat_completion(services: Services, http: Request, body: ChatCompletionRequest) -> Response:
    request = from_chat_request(body, services.settings.generation)
    created = int(time.time())
    if not body.stream:
        done = await services.dispatcher.generate(request, http.is_disconnected)
        completion = to_chat_completion(request, done.final, done.logprobs, created)
        return JSONResponse(completion.model_dump(mode="json", exclude_unset=True))
    job = await services.dispatcher.submit(request)
    first = await first_event(job)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return event_stream(
        job, first, chunk_frames(request, created, include_usage),
        head=[first_chunk(request, created)], tail=[DONE],
    )  # fmt: skip
