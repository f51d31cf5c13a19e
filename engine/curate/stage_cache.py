"""Stage outputs cached by content.

A stage's key chains: key = sha256(stage name, its slice of the spec and the files that
slice names, the upstream stage's key, the stage's code). Stages are pure, so an equal
key means an equal output, and the key is known before anything runs: `plan` can say
what is cached without running a stage. Only stages that are expensive to repeat are
stored (their outputs are written once, atomically, under <store>/cache/stages/).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import polars as pl

import engine

# The packages whose source is "our code": a stage's key covers every module of theirs it imports.
PROJECT_PACKAGES = ("engine", "store")
PROJECT_ROOT = Path(engine.__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def code_version(stage_class: type) -> str:
    """The code a stage runs: its module and every project module it imports, transitively.

    Editing a helper (answer parsing, a teacher backend, the embedder) invalidates the
    outputs of every stage that uses it. Modules are hashed by their syntax tree, so a
    comment or a blank line changes nothing.
    """
    h = hashlib.sha256(engine.__version__.encode())
    for name in sorted(project_imports(stage_class.__module__)):
        h.update(f"\n{name}\n{_syntax(name)}".encode())
    return h.hexdigest()[:16]


def project_imports(module: str) -> set[str]:
    """`module` and the project modules it reaches through imports (lazy ones inside functions too)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen and module_path(name) is not None:
            seen.add(name)
            todo.extend(_imports(name))
    return seen


def module_path(name: str) -> Path | None:
    """The file of a project module (`a.b` -> a/b.py or a/b/__init__.py); None for anything else."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _imports(name: str) -> tuple[str, ...]:
    found = set()
    parts = name.split(".")
    found.update(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b.c runs a and a.b
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return tuple(sorted(found))


@lru_cache(maxsize=None)
def _syntax(name: str) -> str:
    return ast.dump(ast.parse(module_path(name).read_text()))


def stage_key(stage, config, upstream: str) -> str:
    payload = json.dumps([stage.name, config, upstream, code_version(type(stage))], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class StageCache:
    def __init__(self, cache_dir: Path):
        self.dir = cache_dir / "stages"

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        base = self.dir / key[:2] / key
        return base.with_suffix(".kept.parquet"), base.with_suffix(".rejected.parquet"), base.with_suffix(".json")

    def has_output(self, key: str) -> bool:
        return all(p.is_file() for p in self._paths(key))

    def has_record(self, key: str) -> bool:
        """Rejections and stats are kept for every stage, outputs only for stages marked `cached`."""
        _, rejected, stats = self._paths(key)
        return rejected.is_file() and stats.is_file()

    def load_output(self, key: str) -> pl.DataFrame:
        return pl.read_parquet(self._paths(key)[0])

    def load_record(self, key: str) -> tuple[pl.DataFrame, dict]:
        _, rejected, stats = self._paths(key)
        return pl.read_parquet(rejected), json.loads(stats.read_text())

    def save(self, key: str, kept: pl.DataFrame | None, rejected: pl.DataFrame, stats: dict) -> None:
        paths = self._paths(key)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        # The stats file goes last: a record counts only once every part is in place.
        if kept is not None:
            _atomic(paths[0], lambda f: kept.write_parquet(f, compression="zstd"))
        _atomic(paths[1], lambda f: rejected.write_parquet(f, compression="zstd"))
        _atomic(paths[2], lambda f: Path(f).write_text(json.dumps(stats, default=str)))


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
