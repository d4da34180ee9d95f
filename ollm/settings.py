"""Layered settings: CLI flags > ``OLLM_*`` env vars > TOML file > built-in defaults.

Every tunable is a field here, with its default and its doc string; CLI flags, env vars
(``OLLM_<SECTION>__<FIELD>``) and TOML keys (``[section] field = ...``) all derive from it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ollm.errors import SettingsError
from ollm.memory import parse_size

ENV_PREFIX = "OLLM_"
ENV_DELIMITER = "__"
CONFIG_FILE_ENV = "OLLM_CONFIG_FILE"
DEFAULT_CONFIG_FILE = Path("ollm.toml")

Backend = Literal["auto", "optimized-native", "transformers-generic"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
StoreBackend = Literal["redis", "memory", "none"]
SessionBackend = Literal["memory", "redis"]
# auto: the plan decides from the memory budget; on / off force it.
PassSwitch = Literal["auto", "on", "off"]
# Weight-only quantization of the decoder layers' projections (ollm/engine/quantize.py).
Quantization = Literal["none", "int8", "int4"]


def _size(value: Any, setting: str) -> int | str:
    """A memory size setting: ``auto``, a byte count or a size such as 8GiB (one parser for all)."""
    if not isinstance(value, (int, str)):
        raise ValueError("expected auto, a byte count or a size such as 8GiB")
    try:
        return parse_size(value, setting)
    except SettingsError as exc:
        raise ValueError(str(exc).removeprefix(f"{setting}: ")) from None


class Section(BaseModel):
    # Unknown keys are mistakes (a typo in ollm.toml must not be silently ignored).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeSettings(Section):
    model_reference: str = Field("smollm2-135m-instruct", description="Model alias, repo ID or local directory.")
    embedding_model_reference: str = Field("all-minilm-l6-v2", description="Default embedding model.")
    models_dir: Path = Field(
        Path("~/.ollm/models"), description="Where pulled models are materialized as Transformers directories."
    )
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps.")
    dtype: DType = Field("auto", description="auto picks bfloat16 where it is fast, else float32.")
    backend: Backend = Field("auto", description="Execution backend; auto lets the planner choose.")
    batch_invariant: bool = Field(
        False,
        description="A greedy or seeded request gives the same tokens alone or inside any batch "
        "(fixed-shape matrix multiplications, attention per sequence); see docs/engine.md.",
    )
    use_specialization: bool = Field(True, description="Prefer the optimized backend when one applies.")
    dense_projection_chunk_rows: int = Field(
        0,
        ge=0,
        description="Rows per chunk of the MLP projections (the llama.chunked-mlp pass), so a long prefill "
        "never holds a [tokens x intermediate] tensor at once (0 = no chunking); see docs/memory.md.",
    )
    memory_budget: int | Literal["auto"] = Field(
        "auto",
        description="Memory the model may use on the compute device: bytes or a size such as 512MiB or 8GiB; "
        "auto = what the device has free less a margin. The plan holds its estimate against it (docs/memory.md).",
    )
    layer_streaming: PassSwitch = Field(
        "auto",
        description="Stream decoder layers from the safetensors files at each forward (llama.layer-offload): "
        "auto = when the weights do not fit runtime.memory_budget beside one forward; on = always (an error "
        "for a model that cannot stream); off = never. See docs/memory.md.",
    )
    kv_offload: PassSwitch = Field(
        "auto",
        description="Keep each layer's KV cache on disk (host memory on an accelerator), only the running layer's "
        "in memory (the llama.kv-offload pass): on, off, or auto = when the plan says the context's KV cache does "
        "not fit the memory budget beside the weights; see docs/memory.md.",
    )
    kv_offload_dir: Path | None = Field(
        None,
        description="Where offloaded KV cache files go, one directory per engine, removed on close "
        "(unset: kv-offload/ beside models_dir, e.g. ~/.ollm/kv-offload). Put it on a fast local SSD.",
    )
    quantization: Quantization = Field(
        "none",
        description="Weight-only quantization of the decoder layers' linear weights: none (the run dtype), int8 "
        "(one scale per row) or int4 (scale and zero per 32 weights; a Q4_1 GGUF's own bits when the model "
        "was pulled from one). Faster decoding, less memory; see docs/configuration.md.",
    )
    offline: bool = Field(False, description="Never contact a model hub.")

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_memory_budget(cls, value: Any) -> int | str:
        return _size(value, "runtime.memory_budget")

    def resolved_models_dir(self) -> Path:
        return self.models_dir.expanduser()

    def resolved_kv_offload_dir(self) -> Path:
        if self.kv_offload_dir is not None:
            return self.kv_offload_dir.expanduser()
        return self.resolved_models_dir().parent / "kv-offload"


class GenerationSettings(Section):
    """Sampling defaults. A request's unset fields come from a derived model's parameters, then
    these when set explicitly, then the model's generation_config.json, then these defaults
    (Ollama's documented ones: temperature 0.8, top_k 40, top_p 0.9, repeat penalty 1.1 over the
    last 64 tokens)."""

    max_new_tokens: int = Field(256, ge=1, le=131072)
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, description="0 disables top-k.")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, description="Fixed seed for reproducible sampling.")
    repetition_penalty: float = Field(1.1, gt=0.0)
    repeat_last_n: int = Field(
        64, ge=-1, description="Tokens the repetition penalty looks back over; -1 = all, 0 = no penalty."
    )
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = Field(True, description="Stream tokens as they are produced.")


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    reload: bool = False
    api_key: str | None = Field(None, description="Bearer token; required when binding a non-loopback host.")
    response_store_backend: StoreBackend = "redis"
    response_ttl_seconds: int = Field(30 * 24 * 3600, ge=1, description="How long stored responses live.")
    session_backend: SessionBackend = Field(
        "redis", description="Where sessions live; with redis they survive restarts and are shared by replicas."
    )
    session_ttl_seconds: int = Field(24 * 3600, ge=1)
    request_timeout_seconds: float = Field(600.0, gt=0, description="Longest a generation may take end to end.")
    worker_lost_seconds: float = Field(
        5.0, gt=0, description="How long a job's worker may miss heartbeats before the job is failed."
    )
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    workers: int = Field(1, ge=0, description="Worker processes `ollm serve` starts in embedded mode.")
    drain_seconds: float = Field(
        60.0,
        ge=0,
        description="On SIGTERM/Ctrl-C, how long `ollm serve` stops accepting connections while the streams "
        "in flight finish, before cutting them.",
    )
    replica_queue_depth: int = Field(
        8,
        ge=0,
        description="When this many requests wait in one model's queue, another worker with room loads a "
        "replica of it (0: never).",
    )
    files_dir: Path = Field(
        Path("~/.ollm/files"), description="Where files uploaded to /v1/files (and batch outputs) are kept."
    )
    max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest file /v1/files accepts (413 above it)."
    )
    batch_concurrency: int = Field(
        8, ge=1, description="Lines of one batch (/v1/batches) a server has queued or running at once."
    )
    max_active_batches: int = Field(
        32,
        ge=1,
        description="Batches (/v1/batches) not yet final that the servers sharing this Redis namespace hold; "
        "creating one more answers 429 until one ends. Each one being run holds up to batch_concurrency lines "
        "and a piece of its input file in the server's memory, and its results in Redis.",
    )
    batch_retention_seconds: float = Field(
        30 * 24 * 3600.0,
        ge=60,
        description="How long a finished batch's record is kept (retrieve, list) after it ends; its output "
        "files expire as its output_expires_after says.",
    )
    batch_lease_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a server's claim on driving a batch lasts unrenewed: after a crash, another "
        "server (or the restarted one) resumes the batch within this time.",
    )

    def resolved_files_dir(self) -> Path:
        return self.files_dir.expanduser()


class RedisSettings(Section):
    url: str | None = Field(None, description="redis://host:port/db; unset means `ollm serve` runs its own.")
    namespace: str = Field("ollm", description="Key prefix for everything ollm stores in Redis.")
    data_dir: Path = Field(
        Path("~/.ollm/redis"),
        description="Where embedded mode's private Redis keeps its data (append-only file, fsynced every second).",
    )
    ephemeral: bool = Field(
        False, description="Embedded mode keeps nothing on disk: its Redis starts empty and is thrown away."
    )

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser()


class WorkerSettings(Section):
    models: list[str] = Field(
        default_factory=list,
        description="Models loaded at start and pinned (never evicted); unset: none, models load on demand.",
    )
    on_demand: bool = Field(True, description="Also load the models requests ask for, within the memory budget.")
    memory_budget: int | None = Field(
        None,
        description="Bytes of models this worker may hold, e.g. \"8GiB\"; unset or auto: 80% of the memory "
        "available when it starts (the device's memory on a GPU), shared by `ollm serve`'s embedded workers.",
    )
    max_loaded_models: int = Field(3, ge=0, description="Models one worker holds at once at most (0: no limit).")
    max_batch: int | Literal["auto"] = Field(
        "auto",
        description="Concurrent sequences in one decode batch (1 to 1024); auto = sized by the model's plan from "
        "what the memory budget leaves for the KV cache, at most 128 on a CPU and 256 on an accelerator "
        "(docs/configuration.md).",
    )
    max_tokens_per_step: int = Field(
        256, ge=16, description="Prompt tokens prefilled per engine step, so prefill never stalls decoding."
    )
    kv_cache_max_tokens: int = Field(
        262144, ge=256, description="KV cache budget (tokens across sequences) before requests wait."
    )
    batch_slots: int = Field(
        2,
        ge=1,
        description="Batch API lines one worker runs at once at most, when no interactive request runs there; "
        "alongside interactive requests only one (so a batch always progresses). They are dequeued only after "
        "every interactive request waiting.",
    )
    heartbeat_seconds: float = Field(1.0, gt=0)
    drain_seconds: float = Field(
        60.0,
        ge=0,
        description="On SIGTERM/Ctrl-C, how long a worker that takes no new jobs lets its running generations "
        "finish before cancelling them (they end with finish reason `cancelled`).",
    )

    @field_validator("max_batch", mode="before")
    @classmethod
    def _parse_max_batch(cls, value: Any) -> int | str:
        # One message for the whole field (the union's own errors would come once per member).
        if value == "auto":
            return value
        rows = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= 1024:
            raise ValueError(f"expected auto or a whole number from 1 to 1024, got {value!r}")
        return rows

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_memory_budget(cls, value: Any) -> int | None:
        size = "auto" if value is None else _size(value, "worker.memory_budget")
        return None if size == "auto" else int(size)


class AudioSettings(Section):
    """Audio in requests (chat ``input_audio``, ``/v1/audio/transcriptions``); read wherever audio is decoded."""

    max_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest audio file one request may carry (encoded bytes); 400 above."
    )
    max_seconds: float = Field(
        1800.0, gt=0, description="Longest audio one request may carry once decoded; 400 above."
    )
    window_seconds: float = Field(
        30.0,
        gt=0,
        description="Transcriptions cut longer audio into windows of this length, one generation each, and join "
        "their text (Voxtral's audio encoder reads 30-second windows).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        validate_assignment=True,
    )

    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    audio: AudioSettings = Field(default_factory=AudioSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _toml_data()
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=toml))


def config_file_path() -> Path:
    return Path(os.environ.get(CONFIG_FILE_ENV, str(DEFAULT_CONFIG_FILE))).expanduser()


def _toml_data() -> dict[str, Any]:
    path = config_file_path()
    explicit = CONFIG_FILE_ENV in os.environ
    if not path.exists():
        if explicit:
            raise SettingsError(f"config file {path} (from {CONFIG_FILE_ENV}) does not exist")
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc


def _nested_get(data: dict[str, Any], keys: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = data
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def env_var_name(section: str, field: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}{ENV_DELIMITER}{field.upper()}"


# Fields whose command-line flag is not simply --field-name.
_FLAG_NAMES = {"model_reference": "--model", "use_specialization": "--no-specialization"}


def describe_origin(keys: tuple[str, ...], overrides: dict[str, Any], toml: dict[str, Any]) -> str:
    """Where the value of ``section.field`` came from, in the words a user can act on.

    ``toml`` is the config file's content (``_toml_data()``), read once by the caller."""
    found, value = _nested_get(overrides, keys)
    if found and value is not None:
        flag = _FLAG_NAMES.get(keys[-1], "--" + keys[-1].replace("_", "-"))
        return f"command-line flag {flag}={value!r}"
    if len(keys) >= 2:
        name = env_var_name(keys[0], keys[1])
        if name in os.environ:
            return f"{name}={os.environ[name]!r}"
    elif f"{ENV_PREFIX}{keys[0].upper()}" in os.environ:
        name = f"{ENV_PREFIX}{keys[0].upper()}"
        return f"{name}={os.environ[name]!r}"
    found, value = _nested_get(toml, keys)
    if found:
        return f"{config_file_path()}: [{keys[0]}] {'.'.join(keys[1:])} = {value!r}"
    return "built-in default"


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build the effective settings; ``overrides`` are CLI flags as ``{section: {field: value}}``.

    Raises SettingsError naming the bad setting and where its value came from.
    """
    overrides = {
        section: {k: v for k, v in values.items() if v is not None} for section, values in (overrides or {}).items()
    }
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        toml = _toml_data()
        for error in exc.errors():
            keys = tuple(str(part) for part in error["loc"])
            setting = ".".join(keys)
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown setting '{setting}' (from {describe_origin(keys, overrides, toml)})")
            else:
                problems.append(f"{setting}: {error['msg']} (from {describe_origin(keys, overrides, toml)})")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def redacted_url(url: str) -> str:
    """``url`` with its password shown as ``***`` (for `ollm doctor` and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def settings_with_origins(settings: Settings, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every effective setting with its value and origin, for `ollm doctor`."""
    overrides = overrides or {}
    toml = _toml_data()
    rows = []
    for section_name in Settings.model_fields:
        section = getattr(settings, section_name)
        for field_name in type(section).model_fields:
            value = getattr(section, field_name)
            if section_name == "server" and field_name == "api_key" and value:
                value = "***"
            if section_name == "redis" and field_name == "url" and value:
                value = redacted_url(value)
            rows.append(
                {
                    "setting": f"{section_name}.{field_name}",
                    "value": str(value) if isinstance(value, Path) else value,
                    "origin": describe_origin((section_name, field_name), overrides, toml),
                }
            )
    return rows
