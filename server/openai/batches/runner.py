"""Driving batches: every `ollm serve` process runs one ``BatchRunner``, which finds the batches not
yet final in Redis, takes a lease on each it can, and runs it to the end.

* **One driver per batch.** The lease ``<ns>:batch-lease:<id>`` is taken with ``SET NX PX`` and
  renewed while the batch runs; two server replicas never run one batch. A server that stops
  gives its leases back; one that dies loses them after ``server.batch_lease_seconds``, and
  whichever server scans next resumes the batch.
* **Resumable.** Everything lives in Redis (``server.stores.batches``): the status, the counts
  and each finished line's result. A resumed batch re-reads its input file and runs the lines
  that have no result yet; a line that was running when its server died runs again.
* **Read, never held.** The input file is read from disk a piece at a time (``lines.InputReader``)
  each time it is needed: once to validate it (rejected lines get their error line, the 50,000
  cap is applied as it is read), once to run its lines, and once more if the window ends first.
  A batch being run holds its running lines and one piece of the file, whatever the file's size;
  its output and error files are written from Redis a slice of results at a time.
* **Each line is a request to the app itself**, through an in-process ASGI transport: the route
  of the batch's endpoint validates and translates the body and answers exactly as it would over
  HTTP, so the output line's ``status_code`` and ``body`` are the route's own, and no family's
  translation is repeated here. ``server.dispatch.batch_priority`` sends the line's jobs to the
  model's batch queue, which workers take only after their interactive work.
* **Bounded.** At most ``server.batch_concurrency`` lines of a batch are queued or running at
  once; the rest wait here, not in RQ, so a cancel (or the 24 h window running out) stops a
  batch at once: its remaining lines are never enqueued, the running ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import redis
from starlette.types import ASGIApp

from ollm.contract import Keys
from server.dispatch import batch_priority
from server.openai.batches.lease import Leases
from server.openai.batches.lines import (
    BatchLine,
    InputReader,
    InvalidInputFile,
    Rejected,
    error_line,
    rejected_line,
    response_line,
    succeeded,
)
from server.stores.batches import BatchError, BatchRecord, BatchStore, Done, Status
from server.stores.files import FileStore, NoSuchFileError, derived_file_id

log = logging.getLogger(__name__)

_SCAN_SECONDS = 1.0
# Expired files and batches, and orphaned .part files, are swept at start and this often.
_SWEEP_SECONDS = 60.0
_ATTEMPTS = 3
_RETRY_SECONDS = 2.0
# Result lines written to an output file per chunk.
_WRITE_LINES = 200


class BatchRunner:
    def __init__(
        self,
        app: ASGIApp,
        connection: redis.asyncio.Redis,
        keys: Keys,
        batches: BatchStore,
        files: FileStore,
        *,
        concurrency: int,
        lease_seconds: float,
        max_line_bytes: int,
        api_key: str | None,
    ) -> None:
        self.batches = batches
        self.files = files
        self.concurrency = concurrency
        self.max_line_bytes = max_line_bytes
        self.leases = Leases(connection, keys, uuid.uuid4().hex, lease_seconds)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # raise_app_exceptions=False: an unexpected error is the app's own 500 body, an error line.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(
            transport=transport, base_url="http://ollm-batch", headers=headers, timeout=None
        )
        self._driving: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._scanner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._scanner = asyncio.create_task(self._scan(), name="ollm-batch-scan")

    def wake(self) -> None:
        """A batch was just created: look for it now rather than at the next scan."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop driving: running lines are cancelled (their jobs too) and run again by whoever
        resumes the batch; the leases are given back so that is at once."""
        tasks = [t for t in (self._scanner, *self._driving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    # ---- finding batches -----------------------------------------------------------------------

    async def _scan(self) -> None:
        swept = -_SWEEP_SECONDS
        while True:
            try:
                if time.monotonic() - swept >= _SWEEP_SECONDS:
                    await self._sweep()
                    swept = time.monotonic()
                for batch_id in await self.batches.active():
                    if batch_id not in self._driving and await self.leases.take(batch_id):
                        self._driving[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch {batch_id}")
            except redis.RedisError as exc:
                log.warning("batch scan: Redis is unavailable (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=_SCAN_SECONDS)
            self._wake.clear()

    async def _sweep(self) -> None:
        files, batches = await self.files.sweep(), await self.batches.sweep()
        if files or batches:
            log.info("removed %d expired files and %d expired batches", files, batches)

    async def _keep(self, batch_id: str, driver: asyncio.Task[None]) -> None:
        """Renew the lease; once it cannot be (another server holds it, Redis was gone for the
        whole lease), stop driving: someone else may be running the batch by now."""
        lease = self.leases.ms / 1000
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(lease / 3)
            try:
                if not await self.leases.renew(batch_id):
                    log.warning("lost the lease on batch %s; another server drives it now", batch_id)
                    driver.cancel()
                    return
                renewed = time.monotonic()
            except redis.RedisError as exc:
                if time.monotonic() - renewed > lease:
                    log.warning("could not renew the lease on batch %s (%s); stopping", batch_id, exc)
                    driver.cancel()
                    return

    async def _drive(self, batch_id: str) -> None:
        driver = asyncio.current_task()
        assert driver is not None
        keeper = asyncio.create_task(self._keep(batch_id, driver))
        release = True
        try:
            await BatchRun(self, batch_id).run()
        except Exception:
            # Kept leased until it expires: the next try is one lease period away, not a busy loop.
            log.exception("batch %s stopped on an error; it is tried again in %.0fs", batch_id, self.leases.ms / 1000)
            release = False
        finally:
            keeper.cancel()
            self._driving.pop(batch_id, None)
            if release:
                with contextlib.suppress(redis.RedisError):
                    await self.leases.release(batch_id)

    # ---- running one line ----------------------------------------------------------------------

    async def send(self, endpoint: str, line: BatchLine) -> dict[str, Any]:
        """Run one line through the app's own route, at batch priority; its output or error line."""
        batch_priority.set(True)  # this task's own context: only this line's jobs
        request_id = f"req_{uuid.uuid4().hex}"
        try:
            response = await self.client.post(endpoint, json=line.body, headers={"x-request-id": request_id})
        except httpx.HTTPError as exc:
            return error_line(line.custom_id, "internal_error", f"the request could not be run: {exc}")
        try:
            body: Any = response.json()
        except ValueError:
            body = {"error": {"message": response.text, "type": "server_error", "param": None, "code": None}}
        return response_line(line.custom_id, response.status_code, request_id, body)


class BatchRun:
    """One batch driven by this server, from wherever its Redis state says it is."""

    def __init__(self, runner: BatchRunner, batch_id: str) -> None:
        self.runner = runner
        self.store = runner.batches
        self.id = batch_id

    async def run(self) -> None:
        record = await self.store.get(self.id)
        if record is None or record.final:
            await self.store.inactive(self.id)
            return
        if record.status == "validating":
            if not await self._validate(record):
                return
            await self.store.move(self.id, "in_progress", from_=("validating",))
            record = await self._reread()
        if record.status == "in_progress" and not await self._run_lines(record):
            return
        await self._finish()

    async def _reread(self) -> BatchRecord:
        record = await self.store.get(self.id)
        if record is None:
            raise RuntimeError(f"batch {self.id} vanished from Redis while it ran")
        return record

    async def _requests(
        self, record: BatchRecord, *, validate: bool = False, skip: Done | None = None
    ) -> AsyncGenerator[list[BatchLine | Rejected]]:
        """The input file's requests a piece at a time, read in a thread (``skip``: those left out)."""
        path = await self.runner.files.content(record.input_file_id)
        reader = await asyncio.to_thread(_reader, path, record.endpoint, self.runner.max_line_bytes, validate, skip)
        try:
            while piece := await asyncio.to_thread(reader.read):
                yield piece
        finally:
            await asyncio.to_thread(reader.close)

    async def _validate(self, record: BatchRecord) -> bool:
        """Read the whole file once: every rejected line gets its error line, the total is set.
        False when the batch failed (the file is gone, or cannot be a batch)."""
        total = 0
        try:
            async with contextlib.aclosing(self._requests(record, validate=True)) as pieces:
                async for piece in pieces:
                    total = piece[-1].index
                    rejected = [_result(r.index, rejected_line(r)) for r in piece if isinstance(r, Rejected)]
                    await self.store.record_all(self.id, rejected)
        except (NoSuchFileError, InvalidInputFile) as exc:
            await self._fail(exc)
            return False
        await self.store.update(self.id, total=total)
        return True

    async def _fail(self, exc: NoSuchFileError | InvalidInputFile) -> None:
        if isinstance(exc, NoSuchFileError):
            code, message = "invalid_input_file", f"input_file_id: {exc.message}"
        else:
            code, message = exc.code, exc.message
        errors = {"object": "list", "data": [BatchError(code=code, message=message, line=None).model_dump()]}
        await self.store.update(self.id, errors=errors)
        if await self.store.move(self.id, "failed", from_=("validating", "in_progress", "cancelling")):
            await self.store.drop_results(self.id)

    async def _record(self, index: int, line: dict[str, Any]) -> None:
        await self.store.record(self.id, *_result(index, line))

    async def _run_lines(self, record: BatchRecord) -> bool:
        """Run every request without a result, at most ``concurrency`` at once, until the batch is
        cancelled or its window ends. False when the batch failed (its input file is gone)."""
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch(stop))
        slots = asyncio.Semaphore(self.runner.concurrency)

        async def run(line: BatchLine) -> None:
            try:
                await self._record(line.index, await self._attempts(record.endpoint, line))
            finally:
                slots.release()

        try:
            skip = await self.store.done(self.id)
            async with asyncio.TaskGroup() as group, contextlib.aclosing(self._requests(record, skip=skip)) as pieces:
                async for piece in pieces:
                    for request in piece:
                        if isinstance(request, Rejected):  # recorded at validation; the file changed since
                            await self._record(request.index, rejected_line(request))
                            continue
                        await slots.acquire()
                        if stop.is_set():
                            slots.release()
                            return True
                        group.create_task(run(request))
        except (NoSuchFileError, InvalidInputFile) as exc:
            await self._fail(exc)
            return False
        finally:
            watcher.cancel()
        return True

    async def _attempts(self, endpoint: str, line: BatchLine) -> dict[str, Any]:
        """A 503 is the service's state, not the line's fault (its worker died or was stopped
        mid-answer, Redis blinked, a model is still being placed): the line runs again, a few
        times, before its 503 is its result."""
        for attempt in range(1, _ATTEMPTS + 1):
            result = await self.runner.send(endpoint, line)
            response = result.get("response")
            if attempt == _ATTEMPTS or not (isinstance(response, dict) and response.get("status_code") == 503):
                return result
            log.info("batch %s line %d: 503, running it again (attempt %d)", self.id, line.number, attempt + 1)
            await asyncio.sleep(_RETRY_SECONDS * attempt)
        raise AssertionError("unreachable")

    async def _watch(self, stop: asyncio.Event) -> None:
        """Stop taking lines once the batch is cancelled or its window has passed."""
        while not stop.is_set():
            await asyncio.sleep(_SCAN_SECONDS)
            try:
                record = await self.store.get(self.id)
            except redis.RedisError as exc:
                log.warning("batch %s: cannot read its status (%s); checking again", self.id, exc)
                continue
            if record is None or record.status != "in_progress" or _expired(record):
                stop.set()

    async def _finish(self) -> None:
        """Write the output and error files, then the final status (redone whole after a crash:
        the files keep their ids)."""
        while True:
            record = await self._reread()
            target: Status
            if record.final:
                return
            if record.status == "in_progress" and not _expired(record):
                await self.store.move(self.id, "finalizing", from_=("in_progress",))
                continue
            if record.status == "in_progress":
                await self._expire_rest(record)
                target = "expired"
            elif record.status == "cancelling":
                target = "cancelled"
            elif record.status == "finalizing":
                target = "completed"
            else:
                raise RuntimeError(f"batch {self.id} cannot finish from status {record.status}")
            await self._write_files(await self._reread())
            if await self.store.move(self.id, target, from_=(record.status,)):
                await self.store.drop_results(self.id)
                log.info("batch %s %s", self.id, target)
                return

    async def _expire_rest(self, record: BatchRecord) -> None:
        message = "the batch's completion window ended before this request ran"
        skip = await self.store.done(self.id)
        with contextlib.suppress(NoSuchFileError, InvalidInputFile):  # nothing more to say of lines never read
            async with contextlib.aclosing(self._requests(record, skip=skip)) as pieces:
                async for piece in pieces:
                    expired = [
                        (r.index, json.dumps(error_line(r.custom_id, "batch_expired", message)), False) for r in piece
                    ]
                    await self.store.record_all(self.id, expired)

    async def _write_files(self, record: BatchRecord) -> None:
        """The output file (the lines that ran and answered 2xx) and the error file (the rest),
        each in input-file order, streamed from Redis to disk."""
        counts = record.request_counts
        expires_after = await self.store.output_expires_after(self.id)
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        files = (("output_file_id", "output", counts.completed), ("error_file_id", "error", counts.failed))
        for field, kind, count in files:
            if count:
                file_id = derived_file_id(f"{self.id}:{kind}")
                lines = self._result_lines(counts.total, ok=kind == "output")
                await self.runner.files.write(file_id, f"{self.id}_{kind}.jsonl", "batch_output", lines, expires_after)
                ids[field] = file_id
        await self.store.update(self.id, **ids)

    async def _result_lines(self, total: int, *, ok: bool) -> AsyncIterator[bytes]:
        piece: list[str] = []
        async for _, text in self.store.results(self.id, total):
            if succeeded(json.loads(text)) == ok:
                piece.append(f"{text}\n")
                if len(piece) >= _WRITE_LINES:
                    yield "".join(piece).encode()
                    piece = []
        if piece:
            yield "".join(piece).encode()


def _result(index: int, line: dict[str, Any]) -> tuple[int, str, bool]:
    """A finished request as the store keeps it: its index, its line as JSON, whether it succeeded."""
    return index, json.dumps(line, ensure_ascii=False), succeeded(line)


def _reader(path: Path, endpoint: str, max_line_bytes: int, validate: bool, skip: Done | None) -> InputReader:
    return InputReader(path, endpoint, max_line_bytes, check_duplicates=validate, skip=skip or ())


def _expired(record: BatchRecord) -> bool:
    return record.expires_at is not None and time.time() >= record.expires_at
