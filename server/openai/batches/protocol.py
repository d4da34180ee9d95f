"""The Batch API's wire format: the create request; the Batch object is ``server.stores.batches.BatchRecord``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.openai.files.protocol import ExpiresAfter
from server.stores.batches import BatchRecord

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(description="A file uploaded with purpose `batch`: one request per JSONL line.")
    endpoint: Endpoint = Field(description="The route every line of the file is sent to.")
    completion_window: Literal["24h"] = Field(description="Lines not run within it end with `batch_expired`.")
    metadata: dict[str, str] | None = Field(None, description="At most 16 pairs; keys up to 64, values up to 512.")
    output_expires_after: ExpiresAfter | None = Field(
        None, description="When the output and error files expire; without it they are kept until deleted."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # OpenAI's limits, so that what works here works there.
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 metadata pairs")
        if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return value


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchRecord]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
