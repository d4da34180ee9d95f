"""Worker registration: live workers by heartbeat age, measured on Redis' clock."""

from __future__ import annotations

import asyncio

import fakeredis

from ollm.contract import Keys, live_workers, worker_age
from workers.heartbeat import Heartbeat

KEYS = Keys("hb")


def registered(server: fakeredis.FakeServer, name: str, models: list[str]) -> Heartbeat:
    beat = Heartbeat(fakeredis.FakeRedis(server=server), KEYS, name, models, 8, interval=1.0, in_flight=lambda: 3)
    beat.beat()
    return beat


def test_live_workers_report_models_hosts_and_load() -> None:
    server = fakeredis.FakeServer()
    registered(server, "a", ["echo"])
    registered(server, "b", ["echo", "smol"])
    live = asyncio.run(live_workers(fakeredis.FakeAsyncRedis(server=server), KEYS, lost_after=5))
    assert [(w.name, w.models, w.in_flight, w.max_batch) for w in live] == [
        ("a", ["echo"], 3, 8), ("b", ["echo", "smol"], 3, 8),
    ]  # fmt: skip
    assert all(w.age_seconds < 1 for w in live)


def test_a_worker_that_missed_its_beats_is_not_live() -> None:
    server = fakeredis.FakeServer()
    beat = registered(server, "slow", ["echo"])
    sync = fakeredis.FakeRedis(server=server)
    # As if the last beat were 3 s ago: the TTL has run down by 3 s.
    sync.pexpire(KEYS.worker("slow"), beat.ttl_ms - 3000)
    connection = fakeredis.FakeAsyncRedis(server=server)
    assert asyncio.run(live_workers(connection, KEYS, lost_after=2)) == []
    age = asyncio.run(worker_age(connection, KEYS, "slow"))
    assert age is not None and 2.9 < age < 3.5


def test_expired_and_stopped_workers_disappear() -> None:
    server = fakeredis.FakeServer()
    registered(server, "gone", ["echo"])
    stopped = registered(server, "stopped", ["echo"])
    sync = fakeredis.FakeRedis(server=server)
    sync.delete(KEYS.worker("gone"))  # what expiry does to a killed worker's key
    stopped.stop()
    connection = fakeredis.FakeAsyncRedis(server=server)
    assert asyncio.run(live_workers(connection, KEYS, lost_after=5)) == []
    assert sync.smembers(KEYS.workers) == set()  # pruned by the reader
    assert asyncio.run(worker_age(connection, KEYS, "gone")) is None
