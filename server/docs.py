"""/docs and /redoc without a CDN: HTML pages rendered on the server from the app's OpenAPI schema.

FastAPI's own pages load Swagger UI and ReDoc from jsdelivr, which fails offline; these pages are
self-contained (inline CSS, no scripts): /docs lists every operation with its parameters and body
schema, /redoc adds every component schema. /openapi.json is FastAPI's own.
"""

from __future__ import annotations

import html
import json
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}
details{border:1px solid #ddd;border-radius:6px;margin:.4rem 0;padding:.4rem .8rem}
summary{cursor:pointer;font-family:ui-monospace,monospace}
.m{display:inline-block;min-width:4.5rem;font-weight:bold}
.get{color:#0a7}.post{color:#06c}.delete{color:#c33}.put,.patch{color:#a60}
pre{background:#f6f6f6;padding:.6rem;overflow:auto;font-size:.85rem}
"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _json(value: Any) -> str:
    return f"<pre>{html.escape(json.dumps(value, indent=2))}</pre>"


def _operations(schema: dict[str, Any]) -> str:
    parts = []
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            summary = html.escape(operation.get("summary", ""))
            inner = [f"<p>{html.escape(operation.get('description', ''))}</p>"]
            if operation.get("parameters"):
                inner.append("<h4>Parameters</h4>" + _json(operation["parameters"]))
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                inner.append("<h4>Request body</h4>" + _json(body))
            inner.append("<h4>Responses</h4>" + _json(operation.get("responses", {})))
            parts.append(
                f"<details><summary><span class='m {method}'>{method.upper()}</span>{html.escape(path)}"
                f" &mdash; {summary}</summary>{''.join(inner)}</details>"
            )
    return "".join(parts)


def install_docs(app: FastAPI) -> None:
    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        schema = app.openapi()
        title = schema["info"]["title"]
        return _page(
            f"{title} - API",
            f"<h1>{html.escape(title)}</h1><p>Schema: <a href='/openapi.json'>/openapi.json</a>"
            f" &middot; <a href='/redoc'>reference with schemas</a></p>{_operations(schema)}",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        schema = app.openapi()
        title = schema["info"]["title"]
        components = schema.get("components", {}).get("schemas", {})
        schemas = "".join(
            f"<details><summary>{html.escape(name)}</summary>{_json(body)}</details>"
            for name, body in sorted(components.items())
        )
        return _page(
            f"{title} - reference",
            f"<h1>{html.escape(title)} reference</h1><h2>Operations</h2>{_operations(schema)}"
            f"<h2>Schemas</h2>{schemas}",
        )
