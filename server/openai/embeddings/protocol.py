"""Request side of the OpenAI embeddings wire format; the response uses the `openai` package's types."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # OpenAI's limits: at most 2048 inputs per request.
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a list of texts, a token array, or a list of token arrays."
    )
    model: str = DEFAULT_EMBEDDING_MODEL
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Truncate to this many dimensions and renormalize.")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # With encoding_format "base64": the little-endian float32 values, base64-encoded (as
    # OpenAI sends them, although the `openai` package's type only declares the float list).
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """The response as sent, float or base64: ``openai.types.CreateEmbeddingResponse`` plus the
    base64 form."""

    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: EmbeddingsUsage
