"""The route class every API family's router uses: what any route may assume of its client's input.

* The JSON body is Unicode text. JSON may spell lone UTF-16 surrogates (``"\\ud800"``), which
  Python decodes into strings that cannot be encoded, tokenized or stored; such a body is
  refused as invalid JSON, so each family answers with its own 400.
* Model references are read as a client's: a local model directory must lie in
  ``runtime.models_dir`` (``ollm.references.confined_to``), so no request reads files elsewhere.

A router opts in with ``APIRouter(route_class=ClientInputRoute)`` (or a subclass, as Ollama's
``OllamaRoute``); tests/test_input_validation.py checks that every route of the app does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from ollm.references import confined_to

# A \uXXXX escape (or any other escape, so that an escaped backslash is skipped as one token).
_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def lone_surrogate_at(body: bytes) -> int | None:
    """Offset of the first ``\\uXXXX`` escape in a JSON text that is an unpaired surrogate."""
    if b"\\ud" not in body and b"\\uD" not in body:
        return None  # the usual case, at the cost of two substring scans
    pending: int | None = None  # offset of a high surrogate waiting for its low half
    pending_end = -1
    for match in _ESCAPE.finditer(body):
        unit = int(match.group(1), 16) if match.group(1) else None
        is_high = unit is not None and 0xD800 <= unit <= 0xDBFF
        is_low = unit is not None and 0xDC00 <= unit <= 0xDFFF
        if pending is not None:
            if is_low and match.start() == pending_end:
                pending = None
                continue
            return pending
        if is_low:
            return match.start()
        if is_high:
            pending, pending_end = match.start(), match.end()
    return pending


class ClientInputRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            at = lone_surrogate_at(body)
            if at is not None:
                # FastAPI turns this into its json_invalid validation error: each family's 400.
                raise json.JSONDecodeError(
                    "lone UTF-16 surrogate escape: strings must be valid Unicode", body.decode(errors="replace"), at
                )
            self._json = json.loads(body)
        return self._json


class ClientInputRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def client_input_handler(request: Request) -> Response:
            runtime = request.app.state.services.settings.runtime
            with confined_to([runtime.resolved_models_dir()]):
                return await handler(ClientInputRequest(request.scope, request.receive, request._send))

        return client_input_handler
