"""The Store: commit tables as immutable versions, resolve references, read, query, record models."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import files
from .catalog import Catalog, CommitResult, FileRow, VersionInfo
from .errors import StoreError
from .sql import run_sql

# Dataset names become directory names (same rule as a spec's `name`); table names become SQL views.
_DATASET = re.compile(r"[A-Za-z0-9_-]+")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF = re.compile(r"([^@\s]+)(?:@([^@\s]*))?")


class Store:
    """A store rooted at `root`: catalog.sqlite, data/, models/, staging/."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for sub in ("data", "models", "staging"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.root)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- commit ------------------------------------------------------------------------

    def commit(self, dataset: str, tables: dict[str, pa.Table], lineage: dict,
               parent: int | None) -> CommitResult:
        """Write `tables` as a new version of `dataset` whose expected parent is `parent`.

        Files go to staging, are fsynced, hashed and renamed to data/<dataset>/<table>/<sha256>.parquet;
        then one catalog transaction checks the parent and records the version. If the latest
        version already holds this content (same files, spec_hash and teacher), nothing is
        created and that version is returned with created=False.
        """
        if not _DATASET.fullmatch(dataset or ""):
            raise StoreError(f"dataset name {dataset!r} is not allowed: use letters, digits, '_' and '-'")
        if not tables:
            raise StoreError(f"commit to '{dataset}' has no tables")
        for name in tables:
            if not _TABLE.fullmatch(name):
                raise StoreError(f"table name {name!r} is not allowed: use letters, digits and '_', not starting with a digit")
        try:
            lineage_json = json.dumps(lineage, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StoreError(f"lineage of '{dataset}' is not JSON-serialisable: {e}") from None

        staging = Path(tempfile.mkdtemp(prefix=f"{dataset}-", dir=self.root / "staging"))
        try:
            rows = []
            for name, table in sorted(tables.items()):
                staged = files.write_staged(_to_arrow(table, name), staging, name)
                final = files.place(staged, self.root / "data" / dataset / name)
                rows.append(FileRow(name, final.relative_to(self.root).as_posix(),
                                    staged.rows, staged.bytes, staged.sha256))
            return self.catalog.commit(dataset, rows, lineage, lineage_json, parent)
        finally:
            # An interrupted commit may leave staging or unreferenced data files; gc sweeps those.
            shutil.rmtree(staging, ignore_errors=True)

    # ---- versions ----------------------------------------------------------------------

    def resolve(self, ref: str) -> VersionInfo:
        """"demo", "demo@latest" or "demo@3" -> that version."""
        m = _REF.fullmatch(ref.strip()) if isinstance(ref, str) else None
        tag = m.group(2) if m else None
        if not m or (tag is not None and tag != "latest" and not tag.isdigit()):
            raise StoreError(f"bad version reference {ref!r}: use NAME, NAME@N or NAME@latest")
        dataset = m.group(1)
        latest = self._latest(dataset)
        version = latest if tag in (None, "latest") else int(tag)
        found = self.catalog.versions(dataset, version)
        if not found:
            raise StoreError(f"dataset '{dataset}' has no version {version} (latest is {latest})")
        return found[0]

    def versions(self, dataset: str | None = None) -> list[VersionInfo]:
        """All versions (of one dataset, if given), oldest first."""
        if dataset is not None:
            self._latest(dataset)  # raises for an unknown dataset
        return self.catalog.versions(dataset)

    def datasets(self) -> list[str]:
        return self.catalog.datasets()

    def latest_version(self, dataset: str) -> int | None:
        """The dataset's latest version number, None before its first commit: the `parent` to pass."""
        return self.catalog.latest(dataset)

    def _latest(self, dataset: str) -> int:
        latest = self.catalog.latest(dataset)
        if latest is None:
            known = ", ".join(self.catalog.datasets()) or "none yet"
            raise StoreError(f"no dataset '{dataset}' in store {self.root} (datasets: {known})")
        return latest

    # ---- data --------------------------------------------------------------------------

    def read(self, ref: str, table: str) -> pl.DataFrame:
        """The version's `table` (all its files) as one DataFrame; zero rows keep the schema."""
        info = self.resolve(ref)
        if table not in info.files:
            raise StoreError(f"{info.ref} has no table '{table}' (tables: {', '.join(sorted(info.files))})")
        return pl.from_arrow(pa.concat_tables([pq.read_table(p) for p in info.files[table]]))

    def sql(self, query: str, at: str | None = None) -> pa.Table:
        """Run read-only SQL; with `at`, the version's tables (and `tokens`) are views."""
        return run_sql(query, self.resolve(at).files if at else None)

    # ---- models ------------------------------------------------------------------------

    def record_model(self, *, dataset: str, version: int, run_id: str, student: str, path: Path,
                     spec_hash: str, metrics: dict) -> None:
        """Record a trained student of dataset@version (re-recording run_id+student replaces it)."""
        self.resolve(f"{dataset}@{version}")
        path = Path(path).expanduser().resolve()
        # Relative inside the store, so a moved store keeps working.
        stored = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        try:
            metrics_json = json.dumps(metrics, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StoreError(f"metrics of {run_id}/{student} are not JSON-serialisable: {e}") from None
        self.catalog.record_model(dataset=dataset, version=version, run_id=run_id, student=student,
                                  path=stored, spec_hash=spec_hash, metrics_json=metrics_json)

    def models(self, dataset: str | None = None, version: int | None = None) -> list[dict]:
        """Recorded students, oldest first: dataset, version, ref, run_id, student, path, spec_hash, metrics, created."""
        return self.catalog.models(dataset, version)


def _to_arrow(table, name: str) -> pa.Table:
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, pl.DataFrame):
        return table.to_arrow()
    raise StoreError(f"table '{name}' must be a pyarrow.Table or polars.DataFrame, not {type(table).__name__}")
