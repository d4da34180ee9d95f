"""The lines of a batch: the input file read into requests a bounded piece at a time, and each
outcome written back as an output or error line exactly as OpenAI's Batch API writes them.

A line that cannot run (not JSON, no ``custom_id``, a repeated one, another method or URL than the
batch's, a streamed body, longer than a request body may be) is rejected on its own; only a file
with no request at all, or more than OpenAI's 50,000, fails the whole batch.

The file is never held whole: ``InputReader`` reads it line by line, applies the caps as it goes
(the 50,000th request is the last one read; a line over the length cap is skipped unread) and hands
out a piece of at most about ``PIECE_BYTES`` of input at a time.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAX_LINES = 50_000
# How much of the input one read hands out: what a batch being read holds beyond its running lines.
PIECE_BYTES = 256 * 1024
_SKIP_BYTES = 1 << 20


@dataclass(frozen=True)
class BatchLine:
    """One request of the batch: its place among the file's requests (1-based, the key of its
    result), its line number in the input file (for messages), its id and body."""

    index: int
    number: int
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    index: int
    number: int
    custom_id: str | None
    code: str
    message: str


class InvalidInputFile(Exception):  # noqa: N818  (a verdict on the file, as OpenAI words it)
    """The file as a whole cannot be a batch; the batch fails with this code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InputReader:
    """A batch's input file, read one piece at a time (blocking: call it from a thread).

    ``check_duplicates`` is for the first read, which records every rejected line: it keeps a
    16-byte digest of each ``custom_id`` (at most 50,000 of them), never the lines. Later reads
    of the same file give the same requests with the same indexes; those in ``skip`` (the ones
    with a result already) are counted but neither parsed nor handed out."""

    def __init__(
        self,
        path: Path,
        endpoint: str,
        max_line_bytes: int,
        *,
        check_duplicates: bool = False,
        skip: Container[int] = (),
    ) -> None:
        self.endpoint = endpoint
        self.max_line_bytes = max_line_bytes
        self.skip = skip
        self.requests = 0
        self._number = 0
        self._seen: set[bytes] | None = set() if check_duplicates else None
        self._file: BinaryIO = path.open("rb")

    def close(self) -> None:
        self._file.close()

    def read(self) -> list[BatchLine | Rejected]:
        """The next requests, about ``PIECE_BYTES`` of input (at least one line); [] at the end of
        the file. Raises ``InvalidInputFile`` on the request past ``MAX_LINES``, or at the end of a
        file that had none."""
        piece: list[BatchLine | Rejected] = []
        size = 0
        while not piece or size < PIECE_BYTES:  # [] only at the end, however many lines were skipped
            raw = self._file.readline(self.max_line_bytes + 1)
            if not raw:
                if self.requests == 0:
                    message = "the input file has no requests: write one JSON request per line"
                    raise InvalidInputFile("empty_file", message)
                break
            self._number += 1
            size += len(raw)
            too_long = len(raw) > self.max_line_bytes and not raw.endswith(b"\n")
            if too_long:
                self._skip_rest_of_line()
            elif not raw.strip():
                continue  # blank lines (a trailing newline, CRLF files) carry no request
            self.requests += 1
            if self.requests > MAX_LINES:
                message = f"the input file has more than {MAX_LINES} requests; a batch takes at most {MAX_LINES}"
                raise InvalidInputFile("too_many_requests", message)
            if self.requests in self.skip:
                continue
            if too_long:
                message = f"line {self._number} is longer than {self.max_line_bytes} bytes (server.max_request_bytes)"
                piece.append(Rejected(self.requests, self._number, None, "line_too_large", message))
            else:
                piece.append(self._parse(raw))
        return piece

    def _skip_rest_of_line(self) -> None:
        while (chunk := self._file.readline(_SKIP_BYTES)) and not chunk.endswith(b"\n"):
            pass

    def _parse(self, raw: bytes) -> BatchLine | Rejected:
        outcome = _parse_line(self.requests, self._number, raw, self.endpoint)
        if self._seen is not None and isinstance(outcome, BatchLine):
            digest = hashlib.blake2b(outcome.custom_id.encode(), digest_size=16).digest()
            if digest in self._seen:
                message = f"custom_id {outcome.custom_id!r} is used by an earlier line"
                return Rejected(outcome.index, outcome.number, outcome.custom_id, "duplicate_custom_id", message)
            self._seen.add(digest)
        return outcome


def _parse_line(index: int, number: int, raw: bytes, endpoint: str) -> BatchLine | Rejected:
    try:
        item = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejected(index, number, None, "invalid_json", f"line {number} is not valid JSON: {exc}")
    if not isinstance(item, dict):
        return Rejected(index, number, None, "invalid_json", f"line {number} is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        message = f"line {number} has no custom_id (a non-empty string)"
        return Rejected(index, number, None, "missing_custom_id", message)
    if item.get("method") != "POST":
        return Rejected(index, number, custom_id, "invalid_method", f'line {number}: method must be "POST"')
    if item.get("url") != endpoint:
        message = f"line {number}: url {item.get('url')!r} is not the batch's endpoint {endpoint}"
        return Rejected(index, number, custom_id, "invalid_url", message)
    body = item.get("body")
    if not isinstance(body, dict):
        return Rejected(index, number, custom_id, "invalid_body", f"line {number}: body must be a JSON object")
    if body.get("stream"):
        message = f'line {number}: a batch line cannot stream; drop "stream"'
        return Rejected(index, number, custom_id, "invalid_body", message)
    return BatchLine(index, number, custom_id, body)


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def response_line(custom_id: str, status_code: int, request_id: str, body: Any) -> dict[str, Any]:
    """A request that ran: its HTTP status and body as the route answered them."""
    response = {"status_code": status_code, "request_id": request_id, "body": body}
    return {"id": _line_id(), "custom_id": custom_id, "response": response, "error": None}


def error_line(custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """A request that never ran (rejected, or the batch expired first)."""
    return {"id": _line_id(), "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def rejected_line(rejected: Rejected) -> dict[str, Any]:
    return error_line(rejected.custom_id, rejected.code, rejected.message)


def succeeded(line: dict[str, Any]) -> bool:
    """Whether a line belongs in the output file (else the error file): the route answered 2xx."""
    response = line.get("response")
    return isinstance(response, dict) and 200 <= int(response.get("status_code", 0)) < 300
