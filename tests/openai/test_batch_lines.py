"""The Batch API's lines: reading the input file a piece at a time with its caps, writing the
output and error lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.openai.batches.lines import (
    MAX_LINES,
    PIECE_BYTES,
    BatchLine,
    InputReader,
    InvalidInputFile,
    Rejected,
    error_line,
    rejected_line,
    response_line,
)

URL = "/v1/chat/completions"


class Parsed:
    """Every request of a file as a first (validating) read gives them."""

    def __init__(self, path: Path, content: bytes, max_line_bytes: int = 1 << 20) -> None:
        path.write_bytes(content)
        reader = InputReader(path, URL, max_line_bytes, check_duplicates=True)
        self.requests: list[BatchLine | Rejected] = []
        try:
            while piece := reader.read():
                self.requests += piece
        finally:
            reader.close()
        self.lines = [r for r in self.requests if isinstance(r, BatchLine)]
        self.rejected = [r for r in self.requests if isinstance(r, Rejected)]
        self.total = len(self.requests)


@pytest.fixture
def parse_input(tmp_path: Path) -> Any:
    return lambda content, _url=URL, **kw: Parsed(tmp_path / "input.jsonl", content, **kw)


def line(custom_id: str, url: str = URL, method: str = "POST", body: Any = None) -> bytes:
    body = {"model": "m", "messages": []} if body is None else body
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body}).encode()


def test_every_well_formed_line_is_a_request_with_its_line_number(parse_input: Any) -> None:
    parsed = parse_input(b"\n".join([line("a"), b"", line("b"), b""]) + b"\r\n", URL)
    assert [(x.index, x.number, x.custom_id) for x in parsed.lines] == [(1, 1, "a"), (2, 3, "b")]
    assert parsed.lines[0].body == {"model": "m", "messages": []}
    assert parsed.rejected == [] and parsed.total == 2


@pytest.mark.parametrize(
    ("raw", "code", "custom_id"),
    [
        (b"{not json", "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (json.dumps({"method": "POST", "url": URL, "body": {}}).encode(), "missing_custom_id", None),
        (line(""), "missing_custom_id", None),
        (line("x", url="/v1/embeddings"), "invalid_url", "x"),
        (line("x", method="GET"), "invalid_method", "x"),
        (line("x", body=[1]), "invalid_body", "x"),
        (line("x", body={"model": "m", "stream": True}), "invalid_body", "x"),
    ],
)
def test_a_bad_line_is_rejected_alone(parse_input: Any, raw: bytes, code: str, custom_id: str | None) -> None:
    parsed = parse_input(b"\n".join([line("ok"), raw]), URL)
    assert [x.custom_id for x in parsed.lines] == ["ok"]
    [rejected] = parsed.rejected
    assert (rejected.number, rejected.code, rejected.custom_id) == (2, code, custom_id)
    assert "line 2" in rejected.message or code == "duplicate_custom_id"


def test_a_repeated_custom_id_keeps_the_first_line(parse_input: Any) -> None:
    parsed = parse_input(b"\n".join([line("a"), line("a"), line("b")]), URL)
    assert [x.number for x in parsed.lines] == [1, 3]
    assert [(r.number, r.code, r.custom_id) for r in parsed.rejected] == [(2, "duplicate_custom_id", "a")]


def test_only_an_empty_or_oversized_file_fails_as_a_whole(parse_input: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputFile) as empty:
        parse_input(b"\n \n", URL)
    assert empty.value.code == "empty_file"
    assert parse_input(b"\n".join([b"x"] * MAX_LINES), URL).total == MAX_LINES
    # The cap is applied as the file is read: the request past it stops the read there.
    path = tmp_path / "large.jsonl"
    path.write_bytes(b"\n".join([b"x"] * (MAX_LINES + 1) + [b"y" * PIECE_BYTES] * 8))
    reader = InputReader(path, URL, 1 << 20)
    read = 0
    with pytest.raises(InvalidInputFile) as large:
        while piece := reader.read():
            read += len(piece)
    assert large.value.code == "too_many_requests" and read < MAX_LINES + 1
    assert reader._file.tell() < MAX_LINES * 2 + PIECE_BYTES * 2
    reader.close()
    # Every line bad is still a batch: each gets its error line.
    assert parse_input(b"x\ny", URL).total == 2


def test_pieces_are_bounded_and_a_line_over_the_cap_is_skipped_unread(parse_input: Any, tmp_path: Path) -> None:
    huge = line("huge", body={"model": "m", "messages": [{"role": "user", "content": "w" * 5000}]})
    parsed = parse_input(b"\n".join([line("a"), huge, line("b")]), max_line_bytes=1000)
    assert [(r.index, r.custom_id) for r in parsed.lines] == [(1, "a"), (3, "b")]
    [rejected] = parsed.rejected
    assert (rejected.index, rejected.number, rejected.code) == (2, 2, "line_too_large")
    assert "server.max_request_bytes" in rejected.message
    # A piece stops once it holds about PIECE_BYTES of input (the line that crosses it included).
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"\n".join([line(f"id{i}", body={"model": "m", "x": "y" * 1000}) for i in range(1000)]))
    reader = InputReader(path, URL, 1 << 20)
    sizes = []
    while piece := reader.read():
        sizes.append(len(piece))
    reader.close()
    assert sum(sizes) == 1000 and len(sizes) > 1 and max(sizes) * 1000 < PIECE_BYTES + 2000
    # A later read skips the requests that have a result, unparsed, however many in a row.
    reader = InputReader(path, URL, 1 << 20, skip=set(range(1, 1000)))
    assert [r.custom_id for r in reader.read()] == ["id999"] and reader.read() == []
    reader.close()


def test_output_and_error_lines_have_openais_shape(parse_input: Any) -> None:
    ran = response_line("a", 200, "req_1", {"object": "chat.completion"})
    assert ran["id"].startswith("batch_req_") and ran["custom_id"] == "a" and ran["error"] is None
    assert ran["response"] == {"status_code": 200, "request_id": "req_1", "body": {"object": "chat.completion"}}
    never = error_line("b", "batch_expired", "too late")
    assert never["response"] is None and never["error"] == {"code": "batch_expired", "message": "too late"}
    rejected = rejected_line(parse_input(b"{", URL).rejected[0])
    assert rejected["custom_id"] is None and rejected["error"]["code"] == "invalid_json"
