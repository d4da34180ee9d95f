"""The lines of a batch, pure: the input file's JSONL read into requests, and each outcome written
back as an output or error line exactly as OpenAI's Batch API writes them.

A line that cannot run (not JSON, no ``custom_id``, a repeated one, another method or URL than the
batch's, a streamed body) is rejected on its own; only a file with no request at all, or more than
OpenAI's 50,000, fails the whole batch.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_LINES = 50_000


@dataclass(frozen=True)
class BatchLine:
    """One request of the batch: its 1-based line number in the input file, its id and body."""

    number: int
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    number: int
    custom_id: str | None
    code: str
    message: str


@dataclass(frozen=True)
class ParsedInput:
    lines: list[BatchLine]
    rejected: list[Rejected]

    @property
    def total(self) -> int:
        return len(self.lines) + len(self.rejected)


class InvalidInputFile(Exception):  # noqa: N818  (a verdict on the file, as OpenAI words it)
    """The file as a whole cannot be a batch; the batch fails with this code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_input(content: bytes, endpoint: str) -> ParsedInput:
    lines: list[BatchLine] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, CRLF files) carry no request
        outcome = _parse_line(number, raw, endpoint, seen)
        if isinstance(outcome, BatchLine):
            seen.add(outcome.custom_id)
            lines.append(outcome)
        else:
            rejected.append(outcome)
    parsed = ParsedInput(lines, rejected)
    if parsed.total == 0:
        raise InvalidInputFile("empty_file", "the input file has no requests: write one JSON request per line")
    if parsed.total > MAX_LINES:
        raise InvalidInputFile(
            "too_many_requests", f"the input file has {parsed.total} requests; a batch takes at most {MAX_LINES}"
        )
    return parsed


def _parse_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> BatchLine | Rejected:
    try:
        item = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Rejected(number, None, "invalid_json", f"line {number} is not valid JSON: {exc}")
    if not isinstance(item, dict):
        return Rejected(number, None, "invalid_json", f"line {number} is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Rejected(number, None, "missing_custom_id", f"line {number} has no custom_id (a non-empty string)")
    if custom_id in seen:
        return Rejected(number, custom_id, "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line")
    if item.get("method") != "POST":
        return Rejected(number, custom_id, "invalid_method", f'line {number}: method must be "POST"')
    if item.get("url") != endpoint:
        message = f"line {number}: url {item.get('url')!r} is not the batch's endpoint {endpoint}"
        return Rejected(number, custom_id, "invalid_url", message)
    body = item.get("body")
    if not isinstance(body, dict):
        return Rejected(number, custom_id, "invalid_body", f"line {number}: body must be a JSON object")
    if body.get("stream"):
        message = f'line {number}: a batch line cannot stream; drop "stream"'
        return Rejected(number, custom_id, "invalid_body", message)
    return BatchLine(number, custom_id, body)


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


def split_results(results: dict[int, str]) -> tuple[bytes, bytes]:
    """The output and error files' contents, each line in input-file order."""
    output: list[str] = []
    errors: list[str] = []
    for _, text in sorted(results.items()):
        (output if succeeded(json.loads(text)) else errors).append(text)
    return _jsonl(output), _jsonl(errors)


def _jsonl(lines: Iterable[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()
