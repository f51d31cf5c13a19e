"""Stage outputs cached by content.

A stage's key chains: key = sha256(stage name, its slice of the spec and the files that
slice names, the upstream stage's key, the stage's code). Stages are pure, so an equal
key means an equal output, and the key is known before anything runs: `plan` can say
what is cached without running a stage. Only stages that are expensive to repeat are
stored (their outputs are written once, atomically, under <store>/cache/stages/).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import polars as pl

import engine

# Worth storing: they call models or search neighbours. The rest re-run in seconds.
CACHED_STAGES = {"augment", "embed", "dedup", "teach", "confidence", "diversity"}


@lru_cache(maxsize=None)
def code_version(stage_class: type) -> str:
    """The stage's module source: editing a stage invalidates its cached outputs."""
    source = inspect.getsource(inspect.getmodule(stage_class))
    return hashlib.sha256(f"{engine.__version__}\n{source}".encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    from engine.models import _file_digest

    return _file_digest(path) if path.is_file() else "missing"


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
        """Rejections and stats are kept for every stage, outputs only for CACHED_STAGES."""
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
