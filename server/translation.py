"""Meanings every API family shares, whatever its wire shape: inline images and JSON output.

Pure functions over ``ollm.generation``: OpenAI chat, Responses and Anthropic Messages spell an
image or a JSON schema differently, but "only inline images" and "this schema, enforced by the
grammar" mean the same everywhere, so they are decided here once.
"""

from __future__ import annotations

from typing import Any

from ollm.errors import InvalidRequestError
from ollm.generation import Constraint, ContentPart


def image_part(url: str, param: str) -> ContentPart:
    """An image given by URL: only inline ``data:`` URIs, since the server never fetches URLs."""
    if not url.startswith("data:"):
        raise InvalidRequestError(
            "images must be inline data: URIs (data:image/png;base64,...); ollm does not fetch URLs", param=param
        )
    return ContentPart(type="image", image=url)


def json_constraint(kind: str, schema: dict[str, Any] | None, param: str) -> Constraint | None:
    """``response_format`` / ``text.format`` / ``output_config.format``: text (none), json_object, or json_schema."""
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(type="json_object")
    if schema is None:
        raise InvalidRequestError("a json_schema format needs its schema", param=param)
    return Constraint(type="json_schema", json_schema=schema)
