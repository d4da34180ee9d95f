"""The Batch API's pure parts: reading the input file's lines, writing the output and error lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.openai.batches.lines import (
    MAX_LINES,
    InvalidInputFile,
    error_line,
    parse_input,
    rejected_line,
    response_line,
    split_results,
)
from server.openai.pagination import page

URL = "/v1/chat/completions"


def line(custom_id: str, url: str = URL, method: str = "POST", body: Any = None) -> bytes:
    body = {"model": "m", "messages": []} if body is None else body
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body}).encode()


def test_every_well_formed_line_is_a_request_with_its_line_number() -> None:
    parsed = parse_input(b"\n".join([line("a"), b"", line("b"), b""]) + b"\r\n", URL)
    assert [(x.number, x.custom_id) for x in parsed.lines] == [(1, "a"), (3, "b")]
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
def test_a_bad_line_is_rejected_alone(raw: bytes, code: str, custom_id: str | None) -> None:
    parsed = parse_input(b"\n".join([line("ok"), raw]), URL)
    assert [x.custom_id for x in parsed.lines] == ["ok"]
    [rejected] = parsed.rejected
    assert (rejected.number, rejected.code, rejected.custom_id) == (2, code, custom_id)
    assert "line 2" in rejected.message or code == "duplicate_custom_id"


def test_a_repeated_custom_id_keeps_the_first_line() -> None:
    parsed = parse_input(b"\n".join([line("a"), line("a"), line("b")]), URL)
    assert [x.number for x in parsed.lines] == [1, 3]
    assert [(r.number, r.code, r.custom_id) for r in parsed.rejected] == [(2, "duplicate_custom_id", "a")]


def test_only_an_empty_or_oversized_file_fails_as_a_whole() -> None:
    with pytest.raises(InvalidInputFile) as empty:
        parse_input(b"\n \n", URL)
    assert empty.value.code == "empty_file"
    with pytest.raises(InvalidInputFile) as large:
        parse_input(b"\n".join([b"x"] * (MAX_LINES + 1)), URL)
    assert large.value.code == "too_many_requests"
    # Every line bad is still a batch: each gets its error line.
    assert parse_input(b"x\ny", URL).total == 2


def test_output_and_error_lines_have_openais_shape() -> None:
    ran = response_line("a", 200, "req_1", {"object": "chat.completion"})
    assert ran["id"].startswith("batch_req_") and ran["custom_id"] == "a" and ran["error"] is None
    assert ran["response"] == {"status_code": 200, "request_id": "req_1", "body": {"object": "chat.completion"}}
    never = error_line("b", "batch_expired", "too late")
    assert never["response"] is None and never["error"] == {"code": "batch_expired", "message": "too late"}
    rejected = rejected_line(parse_input(b"{", URL).rejected[0])
    assert rejected["custom_id"] is None and rejected["error"]["code"] == "invalid_json"


def test_results_split_into_output_and_error_files_in_input_order() -> None:
    results = {
        3: json.dumps(response_line("c", 200, "r3", {})),
        1: json.dumps(response_line("a", 200, "r1", {})),
        2: json.dumps(response_line("b", 404, "r2", {"error": {}})),
        4: json.dumps(error_line("d", "invalid_json", "bad")),
    }
    output, errors = split_results(results)
    assert [json.loads(x)["custom_id"] for x in output.decode().splitlines()] == ["a", "c"]
    assert [json.loads(x)["custom_id"] for x in errors.decode().splitlines()] == ["b", "d"]
    assert output.endswith(b"\n") and split_results({}) == (b"", b"")


def test_cursor_pagination() -> None:
    items = ["a", "b", "c", "d"]
    assert page(items, str, None, 2) == (["a", "b"], True)
    assert page(items, str, "b", 2) == (["c", "d"], False)
    assert page(items, str, "d", 2) == ([], False)
    with pytest.raises(Exception, match="after"):
        page(items, str, "zz", 2)
