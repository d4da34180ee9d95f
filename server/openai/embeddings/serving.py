"""Embeddings: OpenAI's request onto the internal EmbeddingRequest, the result back, base64 included."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from ollm.errors import InvalidRequestError
from ollm.generation import EmbeddingRequest, EmbeddingResult
from server.openai.embeddings.protocol import EmbeddingRequest as OpenAIEmbeddingRequest
from server.services import Services

_MAX_INPUTS = 2048


def from_embedding_request(request: OpenAIEmbeddingRequest) -> EmbeddingRequest:
    raw = request.input
    inputs: list[str] | list[list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif raw and all(isinstance(item, int) for item in raw):
        inputs = [[int(item) for item in raw if isinstance(item, int)]]  # one token array
    else:
        inputs = raw  # type: ignore[assignment]  # list[str] or list[list[int]], as validated
    if not inputs:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(inputs) > _MAX_INPUTS:
        raise InvalidRequestError(f"at most {_MAX_INPUTS} inputs per request, got {len(inputs)}", param="input")
    if any(len(item) == 0 for item in inputs):
        raise InvalidRequestError("an input is empty", param="input")
    # OpenAI refuses over-long inputs rather than silently embedding a prefix of them.
    return EmbeddingRequest(model=request.model, inputs=inputs, truncate=False, dimensions=request.dimensions)


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """base64 is the little-endian float32 bytes, which is what the `openai` client decodes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def to_embedding_response(result: EmbeddingResult, encoding_format: str) -> dict[str, Any]:
    """OpenAI's CreateEmbeddingResponse as JSON (a dict: its type has no room for base64 strings,
    though base64 is what the `openai` client asks for by default and decodes)."""
    data = [
        {"object": "embedding", "index": i, "embedding": encode(vector, encoding_format)}
        for i, vector in enumerate(result.embeddings)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "model": result.model, "data": data, "usage": usage}


async def create_embeddings(services: Services, body: OpenAIEmbeddingRequest) -> dict[str, Any]:
    result = await services.dispatcher.embed(from_embedding_request(body))
    return to_embedding_response(result, body.encoding_format)
