"""Model references: what a user may pass as ``--model`` and how it is classified.

Three forms are accepted: a built-in alias (case-insensitive), a Hugging Face repo ID
(``org/name``) and a local model directory. Anything naming a hosted provider is rejected,
because ollm only ever runs models locally and must not look like a proxy to a remote API.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ollm.errors import InvalidReferenceError, ModelNotFoundError

ReferenceKind = Literal["alias", "repo_id", "local_path"]

# Namespaces of hosted inference providers. A reference like ``ollama/llama3`` is shaped like a
# repo ID but almost always means "ask that provider", so it is refused rather than looked up.
PROVIDER_NAMESPACES = frozenset(
    {
        "openai",
        "ollama",
        "anthropic",
        "azure",
        "azure-openai",
        "bedrock",
        "aws",
        "vertex",
        "vertex_ai",
        "vertexai",
        "gemini",
        "groq",
        "together",
        "together_ai",
        "togetherai",
        "mistral-api",
        "cohere",
        "fireworks",
        "fireworks_ai",
        "deepinfra",
        "perplexity",
        "openrouter",
        "replicate",
        "huggingface",
        "hf",
        "hf-inference",
        "xai",
        "deepseek-api",
        "lmstudio",
        "vllm",
        "litellm",
    }
)
# Open-weight repos that live under a provider's Hugging Face organisation and are legitimate
# local models (openai/gpt-oss-20b is one of the built-in aliases).
OPEN_WEIGHT_PREFIXES = ("openai/gpt-oss-", "openai/whisper-", "openai/clip-")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.][A-Za-z0-9_.-]{0,95}$")
_PATH_PREFIXES = ("/", "./", "../", "~")
_WHAT_TO_PASS = (
    "pass a built-in alias (see `ollm models list`), a Hugging Face repo ID such as "
    "Qwen/Qwen2.5-7B-Instruct, or a local model directory"
)


class ModelReference(BaseModel):
    """A classified reference. ``name`` is canonical: the alias as catalogued, the repo ID, or
    the absolute directory for local paths."""

    raw: str
    kind: ReferenceKind
    name: str

    @property
    def path(self) -> Path | None:
        return Path(self.name) if self.kind == "local_path" else None


def parse_reference(ref: str) -> ModelReference:
    """Classify ``ref``; raises InvalidReferenceError for provider/malformed references and
    ModelNotFoundError for a bare name that is neither an alias nor a local directory."""
    from ollm.catalogue import find_alias  # the catalogue itself parses references

    raw = ref
    ref = ref.strip()
    if not ref:
        raise InvalidReferenceError(f"empty model reference; {_WHAT_TO_PASS}", param="model")
    if "://" in ref:
        raise InvalidReferenceError(_provider_message(raw, ref.split("://", 1)[0]), param="model")
    if ref.startswith(_PATH_PREFIXES):
        return ModelReference(raw=raw, kind="local_path", name=str(Path(ref).expanduser().resolve()))
    entry = find_alias(ref)
    if entry is not None:
        return ModelReference(raw=raw, kind="alias", name=entry.alias)
    if ":" in ref:
        raise InvalidReferenceError(_provider_message(raw, ref.split(":", 1)[0]), param="model")
    if "/" in ref:
        namespace = ref.split("/", 1)[0].lower()
        if namespace in PROVIDER_NAMESPACES and not ref.lower().startswith(OPEN_WEIGHT_PREFIXES):
            raise InvalidReferenceError(_provider_message(raw, namespace), param="model")
        if not _REPO_ID.match(ref) or "--" in ref or ".." in ref:
            raise InvalidReferenceError(
                f"model reference {raw!r} is not a valid Hugging Face repo ID (expected org/name) "
                f"nor a local path (local paths start with /, ./ or ~); {_WHAT_TO_PASS}",
                param="model",
            )
        return ModelReference(raw=raw, kind="repo_id", name=ref)
    path = Path(ref)
    if (path / "config.json").is_file():
        return ModelReference(raw=raw, kind="local_path", name=str(path.resolve()))
    raise ModelNotFoundError(
        f"unknown model {raw!r}: not a built-in alias, and no directory with a config.json of that name; "
        f"{_WHAT_TO_PASS}",
        param="model",
    )


def _provider_message(raw: str, provider: str) -> str:
    return (
        f"model reference {raw!r} names a provider or URL scheme ({provider!r}); ollm runs models "
        f"locally and never forwards requests to hosted providers or hubs by URL. Instead, {_WHAT_TO_PASS}"
        + (" (for hf://org/name pass org/name)." if provider.lower() in {"hf", "huggingface"} else ".")
    )
