"""Model references: what a user may pass as ``--model`` and how it is classified.

Four forms are accepted: a built-in alias (case-insensitive), the name of a model directory in
``runtime.models_dir`` (``synthetic-1g`` for ``models_dir/synthetic-1g``), a Hugging Face repo ID
(``org/name``) and a local model directory by path. Anything naming a hosted provider is rejected,
because ollm only ever runs models locally and must not look like a proxy to a remote API.

Classifying needs no settings; what a name means under a models directory (and whether it clashes
with an alias) is ``ollm.catalogue.resolve``'s to say, the one place every caller goes through.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ollm.errors import InvalidReferenceError, ModelNotFoundError

ReferenceKind = Literal["alias", "repo_id", "local_name", "local_path"]

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

# Longer than any real path or repo ID; a bound keeps a hostile name from reaching the filesystem.
MAX_REFERENCE_LENGTH = 1024
# Inside an HTTP request (see ``confined_to``): the directories a client may name local models in.
_LOCAL_ROOTS: ContextVar[tuple[Path, ...] | None] = ContextVar("ollm_local_roots", default=None)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.][A-Za-z0-9_.-]{0,95}$")
# The name of a directory in models_dir: one path component, not hidden (dot-entries are ollm's own).
_LOCAL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}$")
_PATH_PREFIXES = ("/", "./", "../", "~")
_WHAT_TO_PASS = (
    "pass a built-in alias or the name of a model directory in the models directory (see `ollm models "
    "list`), a Hugging Face repo ID such as Qwen/Qwen2.5-7B-Instruct, or a local model directory by path"
)


class ModelReference(BaseModel):
    """A classified reference. ``name`` is canonical: the alias as catalogued, the repo ID, the
    directory's name (``local_name``: a directory in models_dir), or the absolute directory for
    local paths."""

    raw: str
    kind: ReferenceKind
    name: str

    @property
    def path(self) -> Path | None:
        """The directory a local path names; a local name's lies in a models directory (the catalogue's)."""
        return Path(self.name) if self.kind == "local_path" else None

    @property
    def is_local(self) -> bool:
        """A directory used in place (by path, or by its name in models_dir): never pulled."""
        return self.kind in ("local_name", "local_path")


def parse_reference(ref: str) -> ModelReference:
    """Classify ``ref``; raises InvalidReferenceError for provider/malformed references. A bare
    name that is no alias is a ``local_name``: whether models_dir has it is the catalogue's to say.
    Callers with settings use ``ollm.catalogue.resolve``, which also refuses a name that clashes."""
    from ollm.catalogue import find_alias  # the catalogue itself parses references

    raw = ref
    ref = ref.strip()
    if not ref:
        raise InvalidReferenceError(f"empty model reference; {_WHAT_TO_PASS}", param="model")
    if len(ref) > MAX_REFERENCE_LENGTH or not ref.isprintable():
        raise InvalidReferenceError(
            f"model reference {raw[:64]!r}{'...' if len(raw) > 64 else ''} is too long or contains control "
            f"characters; {_WHAT_TO_PASS}",
            param="model",
        )
    if "://" in ref:
        raise InvalidReferenceError(_provider_message(raw, ref.split("://", 1)[0]), param="model")
    if ref.startswith(_PATH_PREFIXES):
        return _local(raw, _expand(raw, ref))
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
    if not _LOCAL_NAME.match(ref):
        raise InvalidReferenceError(
            f"model reference {raw!r} is not a built-in alias, nor the name of a model directory (letters, digits "
            f"and . _ + -, not starting with a dot); {_WHAT_TO_PASS}",
            param="model",
        )
    return ModelReference(raw=raw, kind="local_name", name=ref)


def unknown_name(ref: ModelReference, models_dir: Path) -> ModelNotFoundError:
    """The 404 for a bare name models_dir has no model directory of. Outside a server, a model
    directory of that name in the working directory is pointed at: bare names no longer mean it."""
    hint = ""
    if _LOCAL_ROOTS.get() is None and (Path(ref.name) / "config.json").is_file():
        hint = f" (for the directory {ref.name} in the working directory, pass ./{ref.name})"
    return ModelNotFoundError(
        f"unknown model {ref.raw!r}: not a built-in alias, and {models_dir} has no model directory of that name "
        f"(a directory with a config.json){hint}; {_WHAT_TO_PASS}",
        param="model",
    )


@contextmanager
def confined_to(roots: Sequence[Path]) -> Iterator[None]:
    """While active (in this context and threads it starts), local model directories must lie
    under ``roots`` and bare names are not looked up relative to the working directory.

    The server runs each request inside it: a client may name models by path only within
    ``models_dir``, so no request reads files elsewhere on the server's host.
    """
    token = _LOCAL_ROOTS.set(tuple(root.expanduser().resolve() for root in roots))
    try:
        yield
    finally:
        _LOCAL_ROOTS.reset(token)


def _expand(raw: str, ref: str) -> Path:
    # ``~user/...`` names another account's home (and raises when there is no such user); only
    # the running user's own ``~`` is a path a person means.
    if ref.startswith("~") and not (ref == "~" or ref.startswith("~/")):
        raise InvalidReferenceError(
            f"model reference {raw!r}: only ~/ (your own home) may start a path; {_WHAT_TO_PASS}", param="model"
        )
    try:
        return Path(ref).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as exc:
        raise InvalidReferenceError(f"model reference {raw!r} is not a usable path ({exc})", param="model") from None


def _local(raw: str, path: Path) -> ModelReference:
    roots = _LOCAL_ROOTS.get()
    if roots is not None and not any(path == root or path.is_relative_to(root) for root in roots):
        raise InvalidReferenceError(
            f"model reference {raw!r} is a directory outside {', '.join(map(str, roots))}; over HTTP, local "
            "models are named by their alias or repo ID, or must live in runtime.models_dir",
            param="model",
        )
    return ModelReference(raw=raw, kind="local_path", name=str(path))


def _provider_message(raw: str, provider: str) -> str:
    return (
        f"model reference {raw!r} names a provider or URL scheme ({provider!r}); ollm runs models "
        f"locally and never forwards requests to hosted providers or hubs by URL. Instead, {_WHAT_TO_PASS}"
        + (" (for hf://org/name pass org/name)." if provider.lower() in {"hf", "huggingface"} else ".")
    )
