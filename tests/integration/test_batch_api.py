"""The OpenAI Batch API as a user drives it with the official `openai` client: upload a JSONL file,
create a batch, poll it, read its output and error files, cancel one, and see a batch survive a
restart of the server that was running it. Real Redis, real echo workers, real `ollm serve`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from openai.types import Batch

from bench.rss import ProcessTree
from tests.integration.conftest import ServerFactory, WorkerFactory
from tests.integration.harness import Server, wait_until

pytestmark = pytest.mark.slow

MiB = 1 << 20


def chat_line(custom_id: str, text: str, model: str = "echo", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(items: list[Any]) -> bytes:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items).encode()


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def finished(client: openai.OpenAI, batch_id: str, timeout: float = 120) -> Batch:
    final = ("completed", "failed", "cancelled", "expired")
    return wait_until(
        lambda: (b := client.batches.retrieve(batch_id)).status in final and b, timeout, f"batch {batch_id}", 0.2
    )


@pytest.fixture
def batch_server(start_worker: WorkerFactory, start_server: ServerFactory, tmp_path: Path) -> Callable[..., Server]:
    """Servers of a namespace of their own, with one echo worker (20 ms a word) and one files dir:
    every server that may resume a batch must see its files."""
    start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.02")

    def start(**env: str) -> Server:
        return start_server(OLLM_SERVER__FILES_DIR=str(tmp_path / "files"), **env)

    return start


def test_a_batch_runs_every_line_and_the_output_matches_the_custom_ids(batch_server: Callable[..., Server]) -> None:
    client = batch_server().openai_client()
    prompts = {f"req-{i}": f"batch line number {i}" for i in range(12)}
    upload = client.files.create(
        file=("requests.jsonl", jsonl([chat_line(cid, text) for cid, text in prompts.items()])), purpose="batch"
    )
    assert upload.purpose == "batch" and upload.bytes > 0
    assert client.files.retrieve(upload.id).filename == "requests.jsonl"

    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "nightly"}
    )
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    done = finished(client, batch.id)

    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (12, 12, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    output = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(prompts)
    for line in output:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        # The echo model answers with the prompt itself: each answer belongs to its own line.
        assert body["choices"][0]["message"]["content"] == prompts[line["custom_id"]]
    assert done.id in [b.id for b in client.batches.list()]
    assert client.files.retrieve(done.output_file_id or "").purpose == "batch_output"


def test_bad_lines_go_to_the_error_file_and_never_fail_the_batch(batch_server: Callable[..., Server]) -> None:
    client = batch_server().openai_client()
    wrong_url = {**chat_line("wrong-url", "x"), "url": "/v1/embeddings"}
    wrong_method = {**chat_line("wrong-method", "x"), "method": "GET"}
    no_id = {k: v for k, v in chat_line("", "x").items() if k != "custom_id"}
    streamed = chat_line("streamed", "x", stream=True)
    no_messages = {**chat_line("no-messages", "x"), "body": {"model": "echo"}}
    content = jsonl([
        chat_line("good", "fine words"), "{not json", no_id, chat_line("good", "again"), wrong_url, wrong_method,
        streamed, no_messages, chat_line("unknown-model", "x", model="no-such-model"),
    ])  # fmt: skip
    upload = client.files.create(file=("mixed.jsonl", content), purpose="batch")
    done = finished(client, client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id)  # fmt: skip

    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (9, 1, 8)
    assert [line["custom_id"] for line in lines_of(client, done.output_file_id)] == ["good"]
    errors = lines_of(client, done.error_file_id)
    by_id = {line["custom_id"]: line for line in errors}
    # In input order, one line per bad request; the two without a usable custom_id have none.
    assert [line["custom_id"] for line in errors] == [
        None, None, "good", "wrong-url", "wrong-method", "streamed", "no-messages", "unknown-model"
    ]  # fmt: skip
    assert [line["error"]["code"] for line in errors[:6]] == [
        "invalid_json", "missing_custom_id", "duplicate_custom_id", "invalid_url", "invalid_method", "invalid_body"
    ]  # fmt: skip
    # What the route itself refuses ran as a request: its own status and OpenAI error body.
    assert by_id["no-messages"]["error"] is None and by_id["no-messages"]["response"]["status_code"] == 422
    assert by_id["unknown-model"]["response"]["status_code"] == 404
    assert "no-such-model" in by_id["unknown-model"]["response"]["body"]["error"]["message"]


def test_a_cancelled_batch_stops_taking_lines(batch_server: Callable[..., Server]) -> None:
    # One line at a time, each ~1 s of echoed words (20 ms a word on the shared echo worker).
    client = batch_server(OLLM_SERVER__BATCH_CONCURRENCY="1").openai_client()
    words = " ".join(f"w{i}" for i in range(50))
    upload = client.files.create(
        file=("slow.jsonl", jsonl([chat_line(f"slow-{i}", words) for i in range(30)])), purpose="batch"
    )
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(
        lambda: (c := client.batches.retrieve(batch.id).request_counts) is not None and c.completed >= 1,
        60, "the first line", 0.1,
    )  # fmt: skip
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = finished(client, batch.id)

    assert done.status == "cancelled" and done.cancelled_at
    assert done.request_counts is not None
    assert 1 <= done.request_counts.completed <= cancelling.request_counts.completed + 1  # type: ignore[union-attr]
    assert done.request_counts.completed < done.request_counts.total == 30
    # The lines that ran are in its output file, nothing else.
    assert len(lines_of(client, done.output_file_id)) == done.request_counts.completed
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(
            finished(client, client.batches.create(
                input_file_id=client.files.create(file=("one.jsonl", jsonl([chat_line("a", "b")])), purpose="batch").id,
                endpoint="/v1/chat/completions", completion_window="24h",
            ).id).id
        )  # fmt: skip
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: no change, no error


def test_a_batch_resumes_when_its_server_is_killed(batch_server: Callable[..., Server]) -> None:
    env = {"OLLM_SERVER__BATCH_CONCURRENCY": "1", "OLLM_SERVER__BATCH_LEASE_SECONDS": "2"}
    first = batch_server(**env)
    client = first.openai_client()
    words = " ".join(f"w{i}" for i in range(15))
    ids = [f"line-{i}" for i in range(12)]
    upload = client.files.create(file=("r.jsonl", jsonl([chat_line(i, words) for i in ids])), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(
        lambda: (c := client.batches.retrieve(batch.id).request_counts) is not None and c.completed >= 2,
        60, "two lines", 0.05,
    )  # fmt: skip
    first.kill9()  # no goodbye: its lease has to run out

    second = batch_server(**env)
    client = second.openai_client()
    midway = client.batches.retrieve(batch.id)
    assert midway.status == "in_progress" and midway.request_counts is not None
    assert midway.request_counts.completed < 12
    done = finished(client, batch.id)

    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == 12
    output = lines_of(client, done.output_file_id)
    # Each line exactly once, although the killed server's last line may have run twice.
    assert sorted(line["custom_id"] for line in output) == sorted(ids)


def test_files_are_listed_bounded_and_deleted(batch_server: Callable[..., Server]) -> None:
    server = batch_server(OLLM_SERVER__MAX_FILE_BYTES="4096")
    client = server.openai_client()
    small = client.files.create(file=("a.jsonl", jsonl([chat_line("a", "b")])), purpose="batch")
    other = client.files.create(
        file=("b.jsonl", jsonl([chat_line("c", "d")])), purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )  # fmt: skip
    # OpenAI's expiry: a batch file is kept 30 days unless the upload says otherwise.
    assert small.expires_at == small.created_at + 30 * 24 * 3600 and other.expires_at == other.created_at + 3600
    with pytest.raises(openai.BadRequestError, match="expires_after"):
        client.files.create(
            file=("c.jsonl", b"{}\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 60}
        )
    listed = [f.id for f in client.files.list()]
    assert listed[:2] == [other.id, small.id]  # newest first
    assert [f.id for f in client.files.list(order="asc", after=small.id)][0] == other.id
    assert [f.id for f in client.files.list(limit=1, after=other.id)] == [small.id]
    assert client.files.content(small.id).content == jsonl([chat_line("a", "b")])

    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", b"x" * 8192), purpose="batch")
    assert too_large.value.status_code == 413 and "server.max_file_bytes" in too_large.value.message

    assert client.files.delete(small.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(small.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-../../etc/passwd")
    # A batch needs an existing batch file.
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h")
    bad = httpx.post(f"{server.url}/v1/batches", json={"input_file_id": other.id, "endpoint": "/v1/images"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] in ("endpoint", "completion_window")


def test_an_input_file_with_no_request_fails_the_batch(batch_server: Callable[..., Server]) -> None:
    client = batch_server().openai_client()
    upload = client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    done = finished(client, client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id)  # fmt: skip
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and done.errors.data and done.errors.data[0].code == "empty_file"


def _run_batch(client: openai.OpenAI, endpoint: str, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    upload = client.files.create(file=("lines.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    done = finished(client, batch.id)
    assert done.status == "completed" and done.request_counts, done
    assert (done.request_counts.completed, done.request_counts.failed) == (len(lines), 0)
    output = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    return output


def test_completion_responses_and_embedding_batches(
    batch_server: Callable[..., Server], start_worker: WorkerFactory
) -> None:
    start_worker("all-minilm-l6-v2")
    client = batch_server().openai_client()

    def line(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}

    completions = [line(f"c{i}", "/v1/completions", {"model": "echo", "prompt": f"raw prompt {i}", "max_tokens": 8})
                   for i in range(3)]  # fmt: skip
    for out in _run_batch(client, "/v1/completions", completions):
        assert out["response"]["body"]["object"] == "text_completion"
        assert out["response"]["body"]["choices"][0]["text"] == f"raw prompt {out['custom_id'][1:]}"

    responses = [line(f"r{i}", "/v1/responses", {"model": "echo", "input": f"a response {i}"}) for i in range(3)]
    for out in _run_batch(client, "/v1/responses", responses):
        body = out["response"]["body"]
        assert body["object"] == "response" and body["status"] == "completed"
        assert body["output"][0]["content"][0]["text"] == f"a response {out['custom_id'][1:]}"

    texts = {f"e{i}": f"sentence number {i}" for i in range(3)}
    embeddings = [
        line(cid, "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": text}) for cid, text in texts.items()
    ]
    direct = client.embeddings.create(model="all-minilm-l6-v2", input=list(texts.values()))
    for out in _run_batch(client, "/v1/embeddings", embeddings):
        body = out["response"]["body"]
        assert body["object"] == "list" and len(body["data"][0]["embedding"]) == 384
        expected = direct.data[int(out["custom_id"][1:])].embedding
        assert max(abs(a - b) for a, b in zip(body["data"][0]["embedding"], expected, strict=True)) < 1e-4


def test_interactive_requests_go_before_waiting_batch_lines(
    start_worker: WorkerFactory, start_server: ServerFactory, tmp_path: Path
) -> None:
    # A worker of its own (one batch slot of two) in a namespace of its own, slow enough to queue.
    start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.05", OLLM_WORKER__MAX_BATCH="2", OLLM_WORKER__BATCH_SLOTS="1")
    server = start_server(OLLM_SERVER__FILES_DIR=str(tmp_path / "files"), OLLM_SERVER__BATCH_CONCURRENCY="8")
    client = server.openai_client()
    words = " ".join(f"w{i}" for i in range(20))  # ~1 s a line
    content = jsonl([chat_line(f"b{i}", words) for i in range(6)])
    upload = client.files.create(file=("q.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status == "in_progress", 30, "the batch to start", 0.05)

    # Five lines wait (in the batch queue or the runner), one runs; an interactive request overtakes them all.
    answer = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "me first"}])
    counts = client.batches.retrieve(batch.id).request_counts
    assert answer.choices[0].message.content == "me first"
    assert counts is not None and counts.completed <= 2
    assert finished(client, batch.id).status == "completed"


def test_a_batch_survives_the_loss_of_a_worker(
    start_worker: WorkerFactory, start_server: ServerFactory, tmp_path: Path
) -> None:
    # The first worker takes 5 s a line (20 words), the replacement 0.4 s: the first is killed
    # while its lines are mid-answer, and the replacement runs them again with the rest.
    first = start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.25")
    server = start_server(
        OLLM_SERVER__FILES_DIR=str(tmp_path / "files"), OLLM_SERVER__WORKER_LOST_SECONDS="2",
        OLLM_SERVER__BATCH_CONCURRENCY="2",
    )  # fmt: skip
    client = server.openai_client()
    words = " ".join(f"w{i}" for i in range(20))
    ids = [f"l{i}" for i in range(12)]
    upload = client.files.create(file=("w.jsonl", jsonl([chat_line(i, words) for i in ids])), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    connection = redis.Redis.from_url(first.redis_url)
    executions = f"rq:worker:{first.registered_name()}:executions"
    wait_until(lambda: connection.scard(executions) >= 1, 60, "the first worker to start a line", 0.05)
    connection.close()
    start_worker("echo", OLLM_ECHO_TOKEN_DELAY="0.02")  # the replacement, then the loss mid-answer
    assert client.batches.retrieve(batch.id).status == "in_progress"
    first.kill9()
    done = finished(client, batch.id)

    assert done.status == "completed", done
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (12, 0)
    assert sorted(line["custom_id"] for line in lines_of(client, done.output_file_id)) == sorted(ids)


@contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, int]]:
    """Sample the RSS of a process tree from outside (psutil) until the block ends: its peak."""
    tree, seen, stop = ProcessTree(pid), {"peak": 0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen["peak"] = max(seen["peak"], tree.rss())
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()


def test_a_200_mib_input_file_keeps_the_server_memory_bounded(
    batch_server: Callable[..., Server], tmp_path: Path
) -> None:
    """The largest file the server takes (server.max_file_bytes, 200 MiB) is uploaded, validated,
    run and its results downloaded while the server's RSS stays within 64 MiB of what it was
    before. The bound is a third of the file: a server that held the file (or its parsed lines,
    several times its size) would pass it many times over; what the server does hold is a 256 KiB
    piece of the file, the few lines running, a 500-result slice of the results and the upload's
    1 MiB chunks, with room for allocator slack. 50,000 requests, OpenAI's cap, of ~4 KiB each:
    20 run on the echo model, the rest are for another endpoint and are rejected line by line."""
    server = batch_server()
    client = server.openai_client(timeout=600)
    pad = "x" * 4000
    good = {f"run-{i}": f"line {i} runs" for i in range(20)}
    path = tmp_path / "large.jsonl"
    with path.open("w") as out:
        for i in range(50_000):
            run_it = i % 2500 == 0
            line = chat_line(f"run-{i // 2500}" if run_it else f"other-{i}", good.get(f"run-{i // 2500}", "x"))
            out.write(json.dumps({**line, "url": "/v1/chat/completions" if run_it else "/v1/embeddings", "pad": pad}))
            out.write("\n")
    size = path.stat().st_size
    assert 190 * MiB < size <= 200 * MiB
    client.files.list()  # the routes' first use (imports, pools) is not the file's doing
    before = ProcessTree(server.pid).rss()

    started = time.monotonic()
    with peak_rss(server.pid) as rss:
        with path.open("rb") as content:
            upload = client.files.create(file=("large.jsonl", content), purpose="batch")
        uploaded = rss["peak"]
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        done = finished(client, batch.id, timeout=900)
        assert done.status == "completed" and done.request_counts is not None, done
        errors = client.files.content(done.error_file_id or "")
        error_lines = errors.text.splitlines()
    elapsed = time.monotonic() - started
    print(
        f"200 MiB batch file ({size} bytes): RSS before {before / MiB:.0f} MiB, peak during upload "
        f"{uploaded / MiB:.0f} MiB, peak through the batch {rss['peak'] / MiB:.0f} MiB; {elapsed:.0f}s"
    )

    assert upload.bytes == size
    assert (done.request_counts.total, done.request_counts.completed) == (50_000, 20)
    assert len(error_lines) == done.request_counts.failed == 49_980
    assert json.loads(error_lines[0])["error"]["code"] == "invalid_url"
    output = lines_of(client, done.output_file_id)
    assert {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in output} == good
    assert rss["peak"] - before < 64 * MiB, f"the server grew by {(rss['peak'] - before) / MiB:.0f} MiB"


def test_twenty_batches_run_at_once_and_one_more_waits_for_a_place(
    start_worker: WorkerFactory, start_server: ServerFactory, tmp_path: Path
) -> None:
    """Twenty batches at once complete, each with its own lines; a 21st past
    server.max_active_batches is a 429 (what the official clients retry by themselves) until one ends."""
    # All 60 lines run side by side, a word a second: no batch can end (6 s) before the 21st is
    # asked for, and all of them end together soon after.
    start_worker("echo", OLLM_ECHO_TOKEN_DELAY="1", OLLM_WORKER__MAX_BATCH="64", OLLM_WORKER__BATCH_SLOTS="64")
    server = start_server(OLLM_SERVER__FILES_DIR=str(tmp_path / "files"), OLLM_SERVER__MAX_ACTIVE_BATCHES="20")
    client = server.openai_client()
    batches = {}
    for b in range(20):
        lines = [chat_line(f"b{b}-l{i}", f"batch {b} line {i} of three") for i in range(3)]
        upload = client.files.create(file=(f"b{b}.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        batches[batch.id] = b
    once = client.with_options(max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        once.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "too_many_active_batches" and "server.max_active_batches" in refused.value.message

    for batch_id, b in batches.items():
        done = finished(client, batch_id)
        assert done.status == "completed" and done.request_counts is not None, done
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
        output = lines_of(client, done.output_file_id)
        assert {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in output} == {
            f"b{b}-l{i}": f"batch {b} line {i} of three" for i in range(3)
        }
    # Newest first, a page at a time.
    listed = client.batches.list(limit=5)
    assert [b.id for b in listed.data] == list(batches)[::-1][:5] and listed.has_more
    assert once.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
