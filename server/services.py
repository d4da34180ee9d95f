"""Everything a route needs, built once per app: settings, Redis clients, dispatcher, stores."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
import redis.asyncio
from fastapi import Request

from ollm.contract import Keys
from ollm.errors import SettingsError
from ollm.settings import Settings
from server.dispatch import Dispatcher
from server.stores.batches import BatchStore
from server.stores.files import FileStore
from server.stores.responses import ResponseStore, response_store
from server.stores.sessions import SessionStore, session_store

# Short socket timeouts: with Redis down a request must fail fast with 503, not hang.
_CONNECT_TIMEOUT = 2.0
_SOCKET_TIMEOUT = 10.0
# Every running request holds one connection for its event subscription (and idle subscriptions
# are kept for reuse), besides the commands in flight: redis-py's default of 100 refused new
# requests with "Too many connections" at 64 concurrent streams. Redis itself allows 10000 clients.
_MAX_CONNECTIONS = 4096


@dataclass
class Services:
    settings: Settings
    keys: Keys
    sync: redis.Redis
    connection: redis.asyncio.Redis
    dispatcher: Dispatcher
    responses: ResponseStore
    sessions: SessionStore
    # The Batch API's files and batches: always Redis (they must outlive the server process).
    files: FileStore = field(init=False)
    batches: BatchStore = field(init=False)

    def __post_init__(self) -> None:
        server = self.settings.server
        self.files = FileStore(self.connection, self.keys, server.resolved_files_dir(), server.max_file_bytes)
        self.batches = BatchStore(self.connection, self.keys, server.batch_retention_seconds)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        url = settings.redis.url
        if not url:
            raise SettingsError("the server needs redis.url (`ollm serve` starts a private Redis when it is unset)")
        keys = Keys(settings.redis.namespace)
        sync = redis.Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT)
        connection = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_SOCKET_TIMEOUT,
            max_connections=_MAX_CONNECTIONS,
        )
        return cls(
            settings=settings,
            keys=keys,
            sync=sync,
            connection=connection,
            dispatcher=Dispatcher(settings, sync, connection),
            responses=response_store(settings.server, connection, keys),
            sessions=session_store(settings.server, connection, keys),
        )

    async def close(self) -> None:
        await self.connection.aclose()
        self.sync.close()


async def services(request: Request) -> Services:
    """FastAPI dependency: ``services: Services = Depends(services)``.

    Async although it never awaits: FastAPI runs a plain function in a thread pool, and that hop
    cost a quarter of a millisecond on every request."""
    found: Services = request.app.state.services
    return found
