"""Sampling parameters for a request: what the caller gave, over the defaults, in one order.

A request's unset fields come from, in order: a derived model's parameters (ollm.derived.apply),
the `[generation]` values the user configured, the model's own generation_config.json, then the
`[generation]` defaults (Ollama's documented ones). Shared by every API family and the CLI, so a
default is applied the same way everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
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


# generation_config.json keys that are sampling recommendations (gpt-oss and Qwen3 ship them).
_RECOMMENDED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_recommended(model_dir: Path | None) -> dict[str, Any]:
    """The sampling values the model's generation_config.json recommends; none when it samples not
    at all (``do_sample: false`` means its values are not meant for sampling)."""
    if model_dir is None:
        return {}
    try:
        config = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or config.get("do_sample") is False:
        return {}
    return {name: config[name] for name in _RECOMMENDED if isinstance(config.get(name), int | float)}


def with_model_defaults(params: SamplingParams, recommended: dict[str, Any], configured: set[str]) -> SamplingParams:
    """``params`` with the model's recommendations in the fields nobody chose: not the client, not a
    derived model (``params.model_fields_set``), not the [generation] settings (``configured``)."""
    taken = params.model_fields_set | configured
    update = {name: value for name, value in recommended.items() if name not in taken}
    if not update:
        return params
    try:
        out = SamplingParams.model_validate({**params.model_dump(), **update})
    except ValidationError:
        return params  # a recommendation out of range is no recommendation
    out.__pydantic_fields_set__ = set(params.model_fields_set)
    return out


def effective_defaults(
    defaults: GenerationSettings, model_dir: Path | None, derived: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The sampling a request that sets nothing gets: what /api/show and `ollm models info` show."""
    params = sampling_params(defaults)
    if derived:
        params = SamplingParams.model_validate({**params.model_dump(), **derived})
        params.__pydantic_fields_set__ = set(derived)
    params = with_model_defaults(params, model_recommended(model_dir), configured_fields(defaults))
    return params.model_dump(include={*_FROM_DEFAULTS} - {"seed"})


def configured_fields(defaults: GenerationSettings) -> set[str]:
    """The [generation] values the user set (ollm.toml, OLLM_* env): they win over the model's."""
    return set(defaults.model_fields_set) & set(_FROM_DEFAULTS)
