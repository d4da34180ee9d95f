"""Batches: create, retrieve, list, cancel. Running them is ``runner.py``; their lines ``lines.py``."""

from __future__ import annotations

import time
import uuid

from ollm.errors import InvalidRequestError, OllmError
from server.openai.batches.protocol import BatchCreateRequest, BatchList
from server.services import Services
from server.stores.batches import BatchRecord

_WINDOWS = {"24h": 24 * 3600}


class NoSuchBatchError(OllmError):
    status = 404
    code = "batch_not_found"
    kind = "invalid_request_error"


class TooManyActiveBatchesError(OllmError):
    """429, as OpenAI answers a limit that clears with time: the official clients back off and try
    again by themselves, and a batch ending frees a place (409 would say the request itself
    conflicts, and is never retried)."""

    status = 429
    code = "too_many_active_batches"
    kind = "rate_limit_error"


class BatchNotCancellableError(OllmError):
    status = 409
    code = "batch_not_cancellable"
    kind = "invalid_request_error"


def new_batch(body: BatchCreateRequest, now: int) -> BatchRecord:
    return BatchRecord(
        id=f"batch_{uuid.uuid4().hex}",
        endpoint=body.endpoint,
        input_file_id=body.input_file_id,
        completion_window=body.completion_window,
        status="validating",
        created_at=now,
        expires_at=now + _WINDOWS[body.completion_window],
        metadata=body.metadata,
    )


async def create_batch(services: Services, body: BatchCreateRequest) -> BatchRecord:
    source = await services.files.get(body.input_file_id)
    if source.purpose != "batch":
        raise InvalidRequestError(
            f"file {source.id} has purpose {source.purpose!r}; a batch reads a file uploaded with purpose 'batch'",
            param="input_file_id",
        )
    record = new_batch(body, int(time.time()))
    cap = services.settings.server.max_active_batches
    expiry = body.output_expires_after.seconds if body.output_expires_after else None
    if not await services.batches.create(record, max_active=cap, output_expires_after=expiry):
        raise TooManyActiveBatchesError(
            f"{cap} batches are already validating, running or finishing (server.max_active_batches); "
            "wait for one to end, or cancel one, then create this batch again"
        )
    return record


async def retrieve_batch(services: Services, batch_id: str) -> BatchRecord:
    record = await services.batches.get(batch_id)
    if record is None:
        raise NoSuchBatchError(f"no batch with id {batch_id!r}", param="batch_id")
    return record


async def list_batches(services: Services, after: str | None, limit: int) -> BatchList:
    """Newest first, as OpenAI lists them."""
    data, has_more = await services.batches.listing(after, limit)
    return BatchList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=has_more
    )


async def cancel_batch(services: Services, batch_id: str) -> BatchRecord:
    """The batch stops taking lines (its running ones finish), then is ``cancelled`` with the
    output and error files of what ran. Cancelling a cancelled batch again changes nothing."""
    record = await retrieve_batch(services, batch_id)
    if record.status in ("cancelling", "cancelled"):
        return record
    if not await services.batches.move(batch_id, "cancelling", from_=("validating", "in_progress")):
        record = await retrieve_batch(services, batch_id)
        if record.status in ("cancelling", "cancelled"):
            return record
        raise BatchNotCancellableError(
            f"batch {batch_id} is {record.status}; only a validating or in-progress batch can be cancelled"
        )
    return await retrieve_batch(services, batch_id)
