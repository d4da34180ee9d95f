"""`ollm models list|info|pull|rm`: the model catalogue from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from cli.main import app
from cli.options import (
    MODEL_HELP,
    BackendOption,
    DeviceOption,
    DTypeOption,
    KVOffloadOption,
    LayerStreamingOption,
    MemoryBudgetOption,
    ModelsDirOption,
    NoSpecializationOption,
    PlanJsonOption,
    QuantizationOption,
    fail,
    runtime_overrides,
    settings_or_exit,
)
from ollm.catalogue import is_echo, list_models, materialized_path, model_info, remove_model, resolve
from ollm.errors import OllmError
from ollm.plan import plan_model
from ollm.pull import PullProgress, pull_model
from ollm.sampling_defaults import effective_defaults

models_app = typer.Typer(help="List, inspect, pull and remove models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ReferenceArgument = Annotated[str, typer.Argument(help=MODEL_HELP)]


@models_app.command("list")
def list_command(
    installed: Annotated[bool, typer.Option("--installed", help="Only materialized models.")] = False,
    as_json: JsonOption = False,
    models_dir: ModelsDirOption = None,
) -> None:
    """Built-in models and models discovered under the models directory."""
    settings = settings_or_exit({"runtime": runtime_overrides(models_dir=models_dir)})
    listings = list_models(settings.runtime)
    if installed:
        listings = [listing for listing in listings if listing.availability == "materialized"]
    if as_json:
        typer.echo(json.dumps([listing.model_dump(mode="json") for listing in listings], indent=2))
        return
    table = Table(title=f"Models ({settings.runtime.resolved_models_dir()})")
    for column in ("reference", "origin", "kind", "availability", "size", "capabilities"):
        table.add_column(column)
    for listing in listings:
        table.add_row(
            listing.reference,
            listing.origin,
            listing.kind or "?",
            "[green]materialized[/]" if listing.availability == "materialized" else "not-materialized",
            _human_bytes(listing.size) if listing.size is not None else "",
            ", ".join(listing.capabilities),
        )
    console = Console()
    console.print(table)
    for listing in listings:
        if listing.problem is not None:
            console.print(f"[yellow]{listing.reference}: {listing.problem}[/]", soft_wrap=True)


@models_app.command("info")
def info_command(
    reference: ReferenceArgument,
    as_json: JsonOption = False,
    backend: BackendOption = None,
    no_specialization: NoSpecializationOption = False,
    plan_json: PlanJsonOption = False,
    device: DeviceOption = None,
    dtype: DTypeOption = None,
    models_dir: ModelsDirOption = None,
    memory_budget: MemoryBudgetOption = None,
    layer_streaming: LayerStreamingOption = None,
    kv_offload: KVOffloadOption = None,
    quantization: QuantizationOption = None,
) -> None:
    """What a model is and how it would run, read from its config files without loading weights."""
    overrides = runtime_overrides(
        backend=backend,
        no_specialization=no_specialization,
        device=device,
        dtype=dtype,
        models_dir=models_dir,
        memory_budget=memory_budget,
        layer_streaming=layer_streaming,
        kv_offload=kv_offload,
        quantization=quantization,
    )
    settings = settings_or_exit({"runtime": overrides})
    try:
        if plan_json:
            worker = settings.worker
            plan = plan_model(reference, settings.runtime, None, worker.max_tokens_per_step, worker.max_batch)
            typer.echo(plan.model_dump_json(indent=2))
            return
        info = model_info(reference, settings.runtime)
    except OllmError as exc:
        fail(str(exc))
    # What a request that sets no sampling field gets (ollm.sampling_defaults has the order).
    path = Path(info["path"]) if info.get("path") else None
    info["sampling_defaults"] = effective_defaults(settings.generation, path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    _print_info(info)


def _print_info(info: dict[str, Any]) -> None:
    console = Console()
    table = Table(show_header=False, title=info["reference"])
    table.add_column(style="bold")
    table.add_column()
    skipped = {"plan", "plan_error", "reference", "parameters_source"}
    for key, value in info.items():
        if key in skipped or value is None:
            continue
        if key == "parameters":
            value = f"{value:,} ({info.get('parameters_source')})"
        elif key == "size":
            value = _human_bytes(value)
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key.replace("_", " "), str(value))
    plan = info.get("plan")
    if plan is not None:
        for key in (
            "support_level",
            "backend",
            "specialization_state",
            "specialization_provider",
            "device",
            "dtype",
        ):
            if plan.get(key) is not None:
                table.add_row(f"plan: {key.replace('_', ' ')}", str(plan[key]))
        if plan["planned_passes"]:
            table.add_row("plan: planned passes", ", ".join(plan["planned_passes"]))
        memory = plan.get("memory") or {}
        if memory.get("expected_peak_bytes") is not None:
            table.add_row(
                "plan: memory",
                f"peak {_human_bytes(memory['expected_peak_bytes'])} of a {_human_bytes(memory['budget_bytes'])} "
                f"budget (weights {_human_bytes(memory['weights_bytes'])}{_quantized(plan)}{_streamed(memory)}, "
                f"KV cache "
                f"{_human_bytes(memory['kv_cache_bytes'])} for {memory['kv_cache_tokens']} tokens{_kv_kinds(memory)}, "
                "activations "
                f"{_human_bytes(memory['activations_bytes'])}): {memory['strategy']}",
            )
        if plan.get("max_batch_reason"):
            table.add_row("plan: max batch", f"{plan['max_batch']} ({plan['max_batch_reason']})")
        if plan["applied_passes"]:
            table.add_row("plan: applied passes", ", ".join(plan["applied_passes"]))
        if plan["fallback_reason"]:
            table.add_row("plan: fallback reason", plan["fallback_reason"])
    else:
        table.add_row("plan", f"[yellow]{info['plan_error']}[/]")
    console.print(table)


@models_app.command("pull")
def pull_command(reference: ReferenceArgument, models_dir: ModelsDirOption = None) -> None:
    """Download and convert a model into the models directory (no-op when already there)."""
    settings = settings_or_exit({"runtime": runtime_overrides(models_dir=models_dir)})
    try:
        ref = resolve(reference, settings.runtime)
        existing = None if is_echo(ref) else materialized_path(ref, settings.runtime)
    except OllmError as exc:
        fail(str(exc))
    if is_echo(ref):
        typer.echo("echo is built in; there is nothing to pull")
        return
    if existing is not None:
        typer.echo(f"{reference} is materialized at {existing}")
        return
    _quiet_transformers()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
    ) as progress:
        display = _PullDisplay(progress)
        try:
            path = pull_model(ref, settings.runtime, display.update)
        except OllmError as exc:
            progress.stop()
            fail(str(exc))
        except KeyboardInterrupt:
            progress.stop()
            fail("pull interrupted; nothing was left behind", code=130)
        display.finish()
    typer.echo(f"{reference} is materialized at {path}")


class _PullDisplay:
    """One progress line per phase ("pulling", "converting", "verifying sha256 digest", ...)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.phase: str | None = None

    def update(self, event: PullProgress) -> None:
        if event.status == "success":
            return
        phase = event.status.split(":", 1)[0]
        if phase != self.phase:
            self.finish()
            self.phase = phase
            self.task = self.progress.add_task(event.status, total=None, detail="")
        assert self.task is not None
        detail = ""
        if event.total is not None and event.completed is not None:
            detail = f"{_human_bytes(event.completed)}/{_human_bytes(event.total)}"
        self.progress.update(
            self.task,
            description=event.status,
            total=event.total,
            completed=event.completed or 0,
            detail=detail,
        )

    def finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[self.task]
            self.progress.update(self.task, total=task.total or 1, completed=task.total or 1)
            self.task = None


def _quiet_transformers() -> None:
    # Conversion goes through Transformers, whose own tqdm bars would tear through the rich display.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


@models_app.command("rm")
def rm_command(reference: ReferenceArgument, models_dir: ModelsDirOption = None) -> None:
    """Delete a pulled model from the models directory."""
    settings = settings_or_exit({"runtime": runtime_overrides(models_dir=models_dir)})
    try:
        path = remove_model(reference, settings.runtime)
    except OllmError as exc:
        fail(str(exc))
    typer.echo(f"removed {reference} ({path})")


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _quantized(plan: dict[str, Any]) -> str:
    """The quantization and what it saves, for the memory line."""
    saved = plan["memory"].get("quantization_saved_bytes")
    return f" {plan['quantization']}, {_human_bytes(saved)} saved" if saved else ""


def _kv_kinds(memory: dict[str, Any]) -> str:
    """The KV cache by layer kind, for models with more than one kind."""
    kinds = memory.get("kv_cache_bytes_by_layer_kind") or {}
    if len(kinds) < 2:
        return ""
    return " (" + ", ".join(f"{kind} {_human_bytes(size)}" for kind, size in kinds.items()) + ")"


def _streamed(memory: dict[str, Any]) -> str:
    """What layer streaming holds of the weights at once, for the memory line."""
    if not memory.get("layer_streaming"):
        return ""
    experts = (
        f" + chosen experts at most {_human_bytes(memory['expert_buffer_bytes'])} of "
        f"{_human_bytes(memory['experts_bytes'])}, {_human_bytes(memory['expert_bytes_per_token'])} read a token"
        if memory.get("expert_offload")
        else ""
    )
    return (
        f" streamed: {_human_bytes(memory['weights_in_memory_bytes'])} held, resident "
        f"{_human_bytes(memory['resident_weights_bytes'])} + {memory['stream_slots']} layer slots of "
        f"{_human_bytes(memory['layer_bytes'])} + staging {_human_bytes(memory['staging_bytes'])}{experts}"
    )
