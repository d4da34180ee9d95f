"""Turn the ``runtime.device`` and ``runtime.dtype`` settings into concrete torch choices."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import ModuleType

from ollm.errors import SettingsError

_EXPLICIT_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _torch() -> ModuleType:
    # Imported on first use: `ollm serve` and the CLI's help must not pay torch's start-up time.
    import torch

    return torch


def resolve_device(setting: str) -> str:
    """``auto`` picks CUDA, then MPS, then CPU; explicit values must exist on this machine.
    ``cpu`` needs no probe: it resolves without importing torch (an echo worker never does)."""
    value = setting.strip().lower()
    if value == "auto":
        if _torch().cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if not _EXPLICIT_DEVICE.match(value):
        raise SettingsError(
            f"runtime.device: {setting!r} is not a device; use auto, cpu, cuda, cuda:N or mps", param="device"
        )
    if value.startswith("cuda"):
        torch = _torch()
        if not torch.cuda.is_available():
            raise SettingsError(
                f"runtime.device: {setting!r} requested but CUDA is not available", param="device"
            )
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise SettingsError(
                f"runtime.device: {setting!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist",
                param="device",
            )
    if value == "mps" and not _mps_available():
        raise SettingsError(f"runtime.device: {setting!r} requested but MPS is not available", param="device")
    return value


def resolve_dtype(setting: str, device: str) -> str:
    """``auto``: bfloat16 where the hardware computes it natively, else float32 (float16 is never
    chosen automatically: its range overflows in some models' activations)."""
    if setting != "auto":
        return setting
    if device.startswith("cuda"):
        return "bfloat16" if _torch().cuda.is_bf16_supported() else "float32"
    if device == "mps":
        return "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX make bfloat16 matmuls fast; without them bf16 is emulated and slow."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return bool(_torch().ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _mps_available() -> bool:
    backend = getattr(_torch().backends, "mps", None)
    return bool(backend is not None and backend.is_available())
