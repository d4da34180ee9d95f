"""Sampling parameters for a request: what the caller gave over the configured `[generation]` defaults.

Shared by every API family and the CLI, so a default is applied the same way everywhere.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ollm.errors import InvalidRequestError
from ollm.generation import SamplingParams
from ollm.settings import GenerationSettings

# The [generation] settings that are also per-request sampling parameters.
_FROM_DEFAULTS = tuple(name for name in GenerationSettings.model_fields if name in SamplingParams.model_fields)


def sampling_params(defaults: GenerationSettings, **given: Any) -> SamplingParams:
    """``given`` holds what the client sent (None = not sent); the rest comes from ``defaults``."""
    values: dict[str, Any] = {name: getattr(defaults, name) for name in _FROM_DEFAULTS}
    chosen = {name: value for name, value in given.items() if value is not None}
    values.update(chosen)
    try:
        params = SamplingParams.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequestError(f"{param}: {first['msg']}", param=param) from None
    # What the client chose, apart from the configured defaults: a derived model's parameters
    # (ollm.derived.apply) replace only the others.
    params.__pydantic_fields_set__ = set(chosen)
    return params
