"""The server and the workers share one contract module and nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def offenders(package: str, forbidden: str) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO)} imports {module}"
        for path in (REPO / package).rglob("*.py")
        for module in imported_modules(path)
        if module == forbidden or module.startswith(f"{forbidden}.")
    )


def test_the_server_imports_nothing_from_the_workers() -> None:
    assert offenders("server", "workers") == []


def test_the_workers_import_nothing_from_the_server() -> None:
    assert offenders("workers", "server") == []


def test_the_job_names_the_server_enqueues_are_the_worker_functions() -> None:
    from ollm import contract
    from workers import job

    for name in (contract.GENERATE_JOB, contract.EMBED_JOB, contract.LOAD_JOB):
        module, function = name.rsplit(".", 1)
        assert module == job.__name__ and callable(getattr(job, function)), name
