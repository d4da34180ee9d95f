"""`ollm doctor`: what this machine offers and how ollm is configured on it."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.main import app
from cli.options import (
    BackendOption,
    DeviceOption,
    DTypeOption,
    KVOffloadOption,
    LayerStreamingOption,
    MemoryBudgetOption,
    ModelOption,
    ModelsDirOption,
    NoSpecializationOption,
    PlanJsonOption,
    QuantizationOption,
    fail,
    runtime_overrides,
    settings_or_exit,
)
from ollm.catalogue import is_materialized
from ollm.devices import cpu_has_native_bf16, resolve_device, resolve_dtype
from ollm.errors import OllmError
from ollm.memory import human
from ollm.plan import plan_model
from ollm.settings import Settings, redacted_url, settings_with_origins


@app.command("doctor")
def doctor_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the diagnostics as JSON.")] = False,
    model: ModelOption = None,
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
    """Environment and runtime diagnostics: devices, memory, disk, models, Redis, settings."""
    overrides = {
        "runtime": runtime_overrides(
            model=model,
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
    }
    settings = settings_or_exit(overrides)
    if plan_json:
        try:
            typer.echo(
                plan_model(settings.runtime.model_reference, settings.runtime).model_dump_json(indent=2)
            )
        except OllmError as exc:
            fail(str(exc))
        return
    report = diagnostics(settings, overrides)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)


def diagnostics(settings: Settings, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything `ollm doctor` reports; problems are listed with what to do about them."""
    import torch  # only the doctor needs it; other commands start without torch

    runtime = settings.runtime
    problems: list[str] = []
    devices: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_count": psutil.cpu_count(),
    }
    try:
        devices["resolved_device"] = resolve_device(runtime.device)
        devices["resolved_dtype"] = resolve_dtype(runtime.dtype, devices["resolved_device"])
    except OllmError as exc:
        problems.append(str(exc))

    models_dir = runtime.resolved_models_dir()
    disk = shutil.disk_usage(_existing_ancestor(models_dir))
    memory = psutil.virtual_memory()

    models = {}
    for role, reference in (
        ("chat", runtime.model_reference),
        ("embedding", runtime.embedding_model_reference),
    ):
        try:
            available = is_materialized(reference, runtime)
        except OllmError as exc:
            problems.append(f"runtime model {reference!r}: {exc}")
            models[role] = {"reference": reference, "availability": "invalid"}
            continue
        models[role] = {
            "reference": reference,
            "availability": "materialized" if available else "not-materialized",
        }
        if not available:
            problems.append(
                f"{role} model {reference!r} is not materialized: run `ollm models pull {reference}`"
            )

    plan: dict[str, Any] | None = None
    try:
        plan = plan_model(runtime.model_reference, runtime).model_dump(mode="json")
    except OllmError as exc:
        problems.append(f"cannot plan {runtime.model_reference!r}: {exc}")

    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": {"version": torch.__version__},
        "devices": devices,
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available},
        "disk": {"models_dir": str(models_dir), "free_bytes": disk.free, "total_bytes": disk.total},
        "models": models,
        "plan": plan,
        "redis": _redis_status(settings),
        # Unset flags are None; only flags actually given count as a command-line origin.
        "settings": settings_with_origins(settings, _given(overrides)),
        "problems": problems,
    }


def _given(overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        section: {k: v for k, v in values.items() if v is not None} for section, values in overrides.items()
    }


def _redis_status(settings: Settings) -> dict[str, Any]:
    url = settings.redis.url
    if url is None:
        return {"url": None, "reachable": None, "detail": "embedded mode: ollm serve starts a private Redis"}
    import redis

    from ollm.redis_tls import explain

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        return {"url": redacted_url(url), "reachable": False, "detail": f"{type(exc).__name__}: {explain(exc)}"}
    return {"url": redacted_url(url), "reachable": True, "detail": "ping ok"}


def _existing_ancestor(path: Path) -> Path:
    # Before the first pull the models directory does not exist; report the disk it would go on.
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _print_report(report: dict[str, Any]) -> None:
    console = Console()
    summary = Table(show_header=False, title="ollm doctor")
    summary.add_column(style="bold")
    summary.add_column()
    devices = report["devices"]
    summary.add_row("python", f"{report['python']['version']} ({report['python']['executable']})")
    summary.add_row("torch", report["torch"]["version"])
    summary.add_row(
        "cuda", ", ".join(devices["cuda_devices"]) if devices["cuda_available"] else "not available"
    )
    summary.add_row("mps", "available" if devices["mps_available"] else "not available")
    summary.add_row("cpu", f"{devices['cpu_count']} cores, native bf16: {devices['cpu_native_bf16']}")
    summary.add_row(
        "device / dtype", f"{devices.get('resolved_device', '?')} / {devices.get('resolved_dtype', '?')}"
    )
    memory = report["memory"]
    summary.add_row("memory", f"{_gb(memory['available_bytes'])} available of {_gb(memory['total_bytes'])}")
    disk = report["disk"]
    summary.add_row("disk", f"{_gb(disk['free_bytes'])} free under {disk['models_dir']}")
    for role, model in report["models"].items():
        summary.add_row(f"{role} model", f"{model['reference']} ({model['availability']})")
    plan = report["plan"]
    if plan is not None:
        summary.add_row(
            "plan", f"{plan['support_level']}, backend {plan['backend']}, {plan['specialization_state']}"
        )
        estimate = plan["memory"]
        if estimate["expected_peak_bytes"] is not None:
            summary.add_row(
                "memory plan",
                f"peak {human(estimate['expected_peak_bytes'])} of a {human(estimate['budget_bytes'])} budget "
                f"({estimate['budget_source']}): {estimate['strategy']}",
            )
        if plan["fallback_reason"]:
            summary.add_row("fallback", plan["fallback_reason"])
    redis_status = report["redis"]
    summary.add_row(
        "redis", redis_status["detail"] if redis_status["url"] is None else _redis_line(redis_status)
    )
    console.print(summary)

    settings = Table(title="effective settings")
    for column in ("setting", "value", "origin"):
        settings.add_column(column)
    for row in report["settings"]:
        # Origins quote TOML sections like "[runtime]", which rich would read as markup.
        settings.add_row(row["setting"], escape(str(row["value"])), escape(row["origin"]))
    console.print(settings)
    for problem in report["problems"]:
        console.print(f"[yellow]problem:[/] {escape(problem)}")


def _redis_line(status: dict[str, Any]) -> str:
    return f"{status['url']}: {'reachable' if status['reachable'] else 'UNREACHABLE'} ({status['detail']})"


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"
