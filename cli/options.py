"""Flags shared by several commands, mapped onto settings overrides ({section: {field: value}})."""

from __future__ import annotations

from typing import Annotated, Any, NoReturn

import typer

from ollm.errors import OllmError
from ollm.settings import Settings, load_settings

MODEL_HELP = "Model alias, name of a model directory in the models directory, Hugging Face repo ID or local path."
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)]
BackendOption = Annotated[
    str | None,
    typer.Option("--backend", help="Force a backend: auto, optimized-native or transformers-generic."),
]
NoSpecializationOption = Annotated[
    bool, typer.Option("--no-specialization", help="Prefer the generic Transformers path.")
]
PlanJsonOption = Annotated[bool, typer.Option("--plan-json", help="Print the runtime plan as JSON and exit.")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DTypeOption = Annotated[str | None, typer.Option("--dtype", help="auto, bfloat16, float16 or float32.")]
ModelsDirOption = Annotated[str | None, typer.Option("--models-dir", help="Where models are materialized.")]
MemoryBudgetOption = Annotated[
    str | None,
    typer.Option(
        "--memory-budget", help="Memory the model may use: bytes, 512MiB, 8GiB... or auto (free memory less a margin)."
    ),
]
LayerStreamingOption = Annotated[
    str | None,
    typer.Option(
        "--layer-streaming",
        help="Stream decoder layers from disk: auto (when the weights exceed the memory budget), on or off.",
    ),
]

KVOffloadOption = Annotated[
    str | None,
    typer.Option(
        "--kv-offload",
        help="Keep the KV cache on disk, one layer in memory at a time: auto (when it does not fit the memory "
        "budget), on or off.",
    ),
]
QuantizationOption = Annotated[
    str | None,
    typer.Option(
        "--quantization",
        help="Weight-only quantization of the decoder layers: none, int8 or int4 (faster, smaller; see "
        "docs/configuration.md).",
    ),
]


def runtime_overrides(
    model: str | None = None,
    backend: str | None = None,
    no_specialization: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    models_dir: str | None = None,
    memory_budget: str | None = None,
    layer_streaming: str | None = None,
    kv_offload: str | None = None,
    quantization: str | None = None,
) -> dict[str, Any]:
    return {
        "model_reference": model,
        "backend": backend,
        "use_specialization": False if no_specialization else None,
        "device": device,
        "dtype": dtype,
        "models_dir": models_dir,
        "memory_budget": memory_budget,
        "layer_streaming": layer_streaming,
        "kv_offload": kv_offload,
        "quantization": quantization,
    }


def settings_or_exit(overrides: dict[str, dict[str, Any]]) -> Settings:
    """Load settings; a bad value ends the command with the message and exit code 2."""
    try:
        return load_settings(overrides)
    except OllmError as exc:
        fail(str(exc), code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
