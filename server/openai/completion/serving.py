"""Completions: prompts onto internal raw-prompt requests, results back as text_completion objects."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from openai.types import Completion, CompletionChoice
from openai.types.completion_choice import Logprobs

from ollm.errors import InvalidRequestError
from ollm.generation import ErrorEvent, Event, FinalEvent, GenerationRequest, TokenEvent, TokenLogprob, Usage
from ollm.sampling_defaults import sampling_params
from ollm.settings import GenerationSettings
from server.dispatch import Completed
from server.errors import error_body
from server.openai.common import completion_usage, fan_out, finish_reason, stop_list, total_usage
from server.openai.completion.protocol import CompletionRequest
from server.openai.fanin import fan_in_stream, open_streams
from server.openai.runs import generate_all
from server.services import Services
from server.sse import DONE, event_stream, first_event, sse


def prompts_of(request: CompletionRequest) -> list[str]:
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if not all(isinstance(item, str) for item in prompt):
        raise InvalidRequestError("token-id prompts are not supported; send the prompt as text", param="prompt")
    return [item for item in prompt if isinstance(item, str)]


def from_completion_request(request: CompletionRequest, defaults: GenerationSettings) -> list[GenerationRequest]:
    """One request per prompt and choice: prompt i's choices are indexes i*n .. i*n+n-1."""
    if request.echo and request.logprobs is not None:
        # Echoed logprobs would be the prompt's own, which the engine does not compute.
        raise InvalidRequestError("echo with logprobs is not supported", param="echo")
    sampling = sampling_params(
        defaults,
        max_new_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=stop_list(request.stop),
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        logprobs=request.logprobs is not None,
        top_logprobs=request.logprobs,
    )
    requests: list[GenerationRequest] = []
    for prompt in prompts_of(request):
        requests += fan_out(GenerationRequest(model=request.model, prompt=prompt, sampling=sampling), request.n)
    return requests


def completion_id(request_id: str) -> str:
    return f"cmpl-{request_id}"


def legacy_logprobs(logprobs: list[TokenLogprob], offset: int) -> Logprobs:
    """The completions API's own logprobs shape; ``text_offset`` counts from ``offset`` (the echo)."""
    offsets = []
    for item in logprobs:
        offsets.append(offset)
        offset += len(item.token)
    return Logprobs(
        tokens=[item.token for item in logprobs],
        token_logprobs=[item.logprob for item in logprobs],
        top_logprobs=[{top.token: top.logprob for top in item.top} for item in logprobs],
        text_offset=offsets,
    )


def choice_text(request: GenerationRequest, body: CompletionRequest, text: str) -> str:
    # The suffix is text that follows the completion; the model itself only sees the prompt.
    echo = (request.prompt or "") if body.echo else ""
    return echo + text + (body.suffix or "")


def to_completion(body: CompletionRequest, requests: list[GenerationRequest], done: list[Completed]) -> Completion:
    choices = []
    for index, (request, result) in enumerate(zip(requests, done, strict=True)):
        echo = len(request.prompt or "") if body.echo else 0
        choices.append(
            CompletionChoice(
                index=index,
                text=choice_text(request, body, result.final.text),
                finish_reason=finish_reason(result.final.finish_reason),
                logprobs=legacy_logprobs(result.logprobs, echo) if request.sampling.logprobs else None,
            )  # fmt: skip
        )
    usage = total_usage(dict(enumerate(result.final for result in done)), body.n)
    return Completion(
        id=completion_id(requests[0].id), object="text_completion", created=int(time.time()), model=body.model,
        choices=choices, usage=completion_usage(usage),
    )  # fmt: skip


class CompletionFrames:
    """SSE chunks of one streamed completion: the echo first, text deltas, the suffix and finish."""

    def __init__(
        self, request: GenerationRequest, body: CompletionRequest, created: int, include_usage: bool, index: int = 0
    ) -> None:
        self.request = request
        self.body = body
        self.created = created
        self.include_usage = include_usage
        self.index = index
        self.offset = 0

    def chunk(self, text: str, finish: str | None = None, logprobs: list[TokenLogprob] | None = None) -> str:
        choice: dict[str, Any] = {"index": self.index, "text": text, "finish_reason": finish, "logprobs": None}
        if logprobs is not None:
            choice["logprobs"] = legacy_logprobs(logprobs, self.offset).model_dump(mode="json")
        self.offset += len(text)
        return self._frame([choice])

    def usage_frame(self, usage: Usage) -> str:
        return self._frame([], usage=usage)

    def _frame(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        chunk: dict[str, Any] = {
            "id": completion_id(self.request.id), "object": "text_completion", "created": self.created,
            "model": self.body.model, "choices": choices,
        }  # fmt: skip
        if usage is not None:
            chunk["usage"] = completion_usage(usage).model_dump(mode="json")
        return sse(chunk)

    def head(self) -> list[str]:
        return [self.chunk(self.request.prompt or "")] if self.body.echo else []

    def __call__(self, event: Event) -> Iterable[str]:
        if isinstance(event, TokenEvent):
            return [self.chunk(event.text, logprobs=event.logprobs if self.request.sampling.logprobs else None)]
        if isinstance(event, FinalEvent):
            out = [self.chunk(self.body.suffix)] if self.body.suffix else []
            out.append(self.chunk("", finish=finish_reason(event.finish_reason)))
            if self.include_usage:
                out.append(self.usage_frame(event.usage))
            return out
        assert isinstance(event, ErrorEvent)
        return [sse(error_body(event.status, event.message, code=event.code))]


async def create_completion(services: Services, http: Request, body: CompletionRequest) -> Response:
    requests = from_completion_request(body, services.settings.generation)
    if not body.stream:
        done = await generate_all(services.dispatcher, requests, http.is_disconnected)
        return JSONResponse(to_completion(body, requests, done).model_dump(mode="json", exclude_unset=True))
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if len(requests) == 1:
        job = await services.dispatcher.submit(requests[0])
        first = await first_event(job, http.is_disconnected)
        frames = CompletionFrames(requests[0], body, created, include_usage)
        return event_stream(job, first, frames, head=frames.head(), tail=[DONE])
    # Several prompts and/or choices: one job each, their chunks interleaved, then one usage chunk
    # that sums them all.
    streams, firsts = await open_streams(services.dispatcher, requests, http.is_disconnected)
    choices = [CompletionFrames(request, body, created, False, index) for index, request in enumerate(requests)]

    def tail(finals: dict[int, FinalEvent]) -> list[str]:
        done = include_usage and len(finals) == len(requests)
        return [*([choices[0].usage_frame(total_usage(finals, body.n))] if done else []), DONE]

    head = [frame for choice in choices for frame in choice.head()]
    return fan_in_stream(streams, firsts, lambda index, event: choices[index](event), head=head, tail=tail)
