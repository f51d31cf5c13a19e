"""The Store: commit tables as immutable versions, resolve references, read, query, tag, diff,
export, gc, verify, record models."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from . import files
from .catalog import (TAG, Catalog, CommitResult, FileRow, TableRow, VersionInfo, identity_of,
                      segment_row)
from .errors import CorruptData, StoreError
from .integrity import Checker
from .layout import KEY, SCHEME, HashCache, Segment, file_schema, plan_table, read_frame, table_digest
from .sql import MEMORY_LIMIT, TIMEOUT_S, run_sql

# Dataset names become directory names (same rule as a spec's `name`); table names become SQL views.
_DATASET = re.compile(r"[A-Za-z0-9_-]+")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REF = re.compile(r"([^@\s]+)(?:@([^@\s]+))?")
_SUMMARY_COLUMNS = ("split", "category")


class Store:
    """A store rooted at `root`: catalog.sqlite, data/, models/, staging/, cache/."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        for sub in ("data", "models", "staging", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.root)
        self.checker = Checker(self.root / "cache" / "store")
        self.hashes = HashCache(self.root / "cache" / "store")
        self._hash_memo: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ---- commit ------------------------------------------------------------------------

    def commit(self, dataset: str, tables: dict[str, pa.Table], lineage: dict,
               parent: int | None) -> CommitResult:
        """Write `tables` as a new version of `dataset` whose expected parent is `parent`.

        Rows the latest version already holds are not written again: the new version points at
        the files that hold them (with a deletion vector for rows it lacks), and only the other
        rows go to new files: staged, fsynced, hashed and linked to data/<dataset>/<table>/<sha256>.parquet.
        Then one catalog transaction checks the parent and records the version. If the latest
        version already holds this content (same rows, spec_hash and teacher), nothing is created
        and that version is returned with created=False. Another commit landing first raises ParentMoved.
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
        frames = {name: _to_frame(t, name) for name, t in sorted(tables.items())}
        files.crash_point("start")

        base = self._base(dataset)
        plans, base_digests = {}, {}
        for name, frame in frames.items():
            segs = base.segments.get(name) if base else None
            plans[name] = plan_table(frame, segs, self._schema(segs), self._hashes_of)
        if base:
            for name, segs in base.segments.items():
                live = [h if (m := s.live_mask()) is None else h[m] for s in segs for h in [self._hashes_of(s)]]
                base_digests[name] = table_digest(self._schema(segs), np.concatenate(live))
        base_identity = identity_of(base_digests, base.spec_hash, base.teacher) if base else None

        table_rows = [TableRow(name, plan.rows, plan.digest, SCHEME, _summary(frames[name]))
                      for name, plan in plans.items()]
        written: list[tuple[Path, files.StagedFile]] = []
        with files.Staging(self.root / "staging", dataset) as staging:
            file_rows: list[FileRow] = []
            for name, plan in plans.items():
                file_rows += [segment_row(name, self.root, seg) for seg in plan.kept]
                for table, hashes in plan.chunks:
                    staged = files.write_staged(table, staging, f"{name}-{len(written)}")
                    files.crash_point("staged")
                    final = files.place(staged, self.root / "data" / dataset / name, self.checker.is_intact)
                    self.hashes.put(staged.sha256, hashes)
                    written.append((final, staged))
                    file_rows.append(FileRow(name, final.relative_to(self.root).as_posix(),
                                             staged.rows, staged.bytes, staged.sha256))
            files.crash_point("placed")

            def ensure_files():
                for final, staged in written:
                    if not final.exists():  # a concurrent gc took it before we held the lock
                        files.ensure_linked(staged.path, final)

            result = self.catalog.commit(dataset, file_rows, table_rows, lineage, lineage_json, parent,
                                         base=base.version if base else None, base_identity=base_identity,
                                         ensure_files=ensure_files)
            files.crash_point("committed")
        # Stamps after staging is gone: dropping the staged names moved the files' ctime.
        for final, staged in written:
            self.checker.record(final, staged.sha256)
        return result

    def _base(self, dataset: str) -> VersionInfo | None:
        latest = self.catalog.latest(dataset)
        if latest is None:
            return None
        base = self.catalog.versions(dataset, latest)[0]
        try:
            self._check(base)
        except CorruptData:
            return None  # never build on damaged files: write everything afresh
        return base

    def _schema(self, segs: list[Segment] | None) -> str | None:
        return file_schema(segs[0].path) if segs else None

    def _hashes_of(self, seg: Segment) -> np.ndarray:
        if seg.sha256 not in self._hash_memo:
            self._hash_memo[seg.sha256] = self.hashes.get(seg)
        return self._hash_memo[seg.sha256]

    def staging(self, prefix: str) -> files.Staging:
        """`with st.staging("train") as folder:` a private folder under staging/ for in-flight writes
        (e.g. models before their rename into place); `gc` removes it only once its process is gone."""
        return files.Staging(self.root / "staging", prefix)

    # ---- versions ----------------------------------------------------------------------

    def resolve(self, ref: str) -> VersionInfo:
        """"demo", "demo@latest", "demo@3" or "demo@TAG" -> that version."""
        m = _REF.fullmatch(ref.strip()) if isinstance(ref, str) else None
        if not m:
            raise StoreError(f"bad version reference {ref!r}: use NAME, NAME@N, NAME@latest or NAME@TAG")
        dataset, tag = m.group(1), m.group(2)
        latest = self._latest(dataset)
        if tag in (None, "latest"):
            version = latest
        elif tag.isascii() and tag.isdigit():  # str.isdigit() alone takes '²', which int() refuses
            if len(tag) > 18:  # past SQLite's 64-bit integers (and Python's int-string limit)
                raise StoreError(f"dataset '{dataset}' has no version {tag[:40]} (latest is {latest})")
            version = int(tag)
        else:
            version = self.catalog.tag_version(dataset, tag)
            if version is None:
                known = ", ".join(t for _, t, _ in self.catalog.tags(dataset)) or "none"
                raise StoreError(f"dataset '{dataset}' has no version or tag '{tag}' (tags: {known})")
        found = self.catalog.versions(dataset, version)
        if not found:
            raise StoreError(f"dataset '{dataset}' has no version {version} (latest is {latest})")
        return found[0]

    def version(self, ref: str) -> "Version":
        """A handle on one version for notebooks: .to_polars(table), .to_arrow(table), .sql(query)."""
        return Version(self, self.resolve(ref))

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

    # ---- tags --------------------------------------------------------------------------

    def tag(self, ref: str, tag: str, force: bool = False) -> tuple[VersionInfo, int | None]:
        """Name a version: `NAME@TAG` then resolves to it. A tag moves only with force=True.
        Returns the version and where the tag pointed before (None if it is new)."""
        if not TAG.fullmatch(tag or "") or tag == "latest":
            raise StoreError(f"tag {tag!r} is not allowed: start with a letter; letters, digits, '_', '.', '-'; not 'latest'")
        info = self.resolve(ref)
        before = self.catalog.set_tag(info.dataset, tag, info.version, force)
        return info, before

    def untag(self, dataset: str, tag: str) -> int:
        return self.catalog.delete_tag(dataset, tag)

    def tags(self, dataset: str | None = None) -> dict[str, int]:
        """{"demo@prod": 3, ...}"""
        return {f"{d}@{t}": v for d, t, v in self.catalog.tags(dataset)}

    # ---- data --------------------------------------------------------------------------

    def _check(self, info: VersionInfo, tables: list[str] | None = None) -> None:
        segs = [s for t, ss in info.segments.items() if tables is None or t in tables for s in ss]
        self.checker.check([(s.path, s.sha256, s.bytes) for s in segs], where=f" of {info.ref}")

    def _table(self, info: VersionInfo, table: str) -> list[Segment]:
        if table not in info.segments:
            raise StoreError(f"{info.ref} has no table '{table}' (tables: {', '.join(sorted(info.segments))})")
        self._check(info, [table])
        return info.segments[table]

    def read(self, ref: str | VersionInfo, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The version's `table` as one DataFrame, rows ordered by prompt_id where it has one;
        zero rows keep the schema."""
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        parts = [_read_segment(seg, columns) for seg in self._table(info, table)]
        result = pl.concat(parts) if len(parts) > 1 else parts[0]
        if KEY in result.columns and len(parts) > 1 and not result[KEY].is_sorted():
            # Sort the keys alone (ties keep file order), then gather: 10x faster than sorting the frame.
            order = result[KEY].to_frame("k").with_row_index("i").sort(["k", "i"], nulls_last=True)["i"]
            result = result[order.to_numpy()]
        return result

    def read_arrow(self, ref: str | VersionInfo, table: str, columns: list[str] | None = None) -> pa.Table:
        """`read`, as an Arrow table."""
        return self.read(ref, table, columns).to_arrow()

    def sql(self, query: str, at: str | None = None, *, timeout: float | None = TIMEOUT_S,
            memory_limit: str | None = MEMORY_LIMIT) -> pa.Table:
        """Run read-only SQL. With `at`, the version's tables (and `tokens`) are views; any version is
        also reachable as `<dataset>_v<N>_<table>`, `<dataset>_latest_<table>`, `<dataset>_<tag>_<table>`.
        `timeout` in seconds (None: no limit), `memory_limit` as DuckDB reads it ('4GB', '50%')."""
        views: dict[str, list[Segment]] = {}
        checked: list[VersionInfo] = []
        if at:
            info = self.resolve(at)
            views.update(info.segments)
            checked.append(info)
        for name, info in self._mentioned_versions(query):
            for table, segs in info.segments.items():
                views.setdefault(f"{name}_{table}", segs)
            checked.append(info)
        for info in checked:
            self._check(info)
        extra = {"syllabus_versions": self._versions_table()} if "syllabus_versions" in query.lower() else None
        return run_sql(query, views, extra, timeout=timeout, memory_limit=memory_limit)

    def _mentioned_versions(self, query: str) -> list[tuple[str, VersionInfo]]:
        text = query.lower()
        found = []
        datasets = [d for d in self.catalog.datasets() if d.lower() + "_" in text]
        for dataset in datasets:
            infos = self.catalog.versions(dataset)
            names: dict[str, VersionInfo] = {f"{dataset}_v{v.version}": v for v in infos}
            if infos:
                names[f"{dataset}_latest"] = infos[-1]
            by_version = {v.version: v for v in infos}
            for _, tag, version in self.catalog.tags(dataset):
                names.setdefault(f"{dataset}_{tag}", by_version[version])
            for name, info in names.items():
                if any(re.search(rf"(?<![a-z0-9_]){re.escape((name + '_' + t).lower())}(?![a-z0-9_])", text)
                       for t in list(info.segments) + ["tokens"]):
                    found.append((name, info))
        return found

    def _versions_table(self) -> pa.Table:
        rows = self.catalog.versions()
        return pa.table({
            "dataset": [v.dataset for v in rows], "version": pa.array([v.version for v in rows], pa.int64()),
            "parent": pa.array([v.parent for v in rows], pa.int64()), "created": [v.created for v in rows],
            "spec_hash": [v.spec_hash for v in rows], "teacher": [v.teacher for v in rows],
            "code_version": [v.code_version for v in rows],
            "examples": pa.array([v.row_counts.get("examples") for v in rows], pa.int64()),
            "rejections": pa.array([v.row_counts.get("rejections") for v in rows], pa.int64()),
            "tags": pa.array([v.tags for v in rows], pa.list_(pa.string())),
        })

    # ---- diff, export, gc, verify ------------------------------------------------------

    def diff(self, a: str, b: str, **kwargs):
        from .diff import diff
        return diff(self, a, b, **kwargs)

    def export(self, ref: str, fmt: str, out: str | Path, **kwargs):
        from .export import export
        return export(self, ref, fmt, Path(out), **kwargs)

    def summary(self, ref: str, **kwargs):
        from .inspect import summary
        return summary(self, ref, **kwargs)

    def gc(self, dry_run: bool = False, grace_s: float = 3600.0, checkpoints: bool = False) -> "GcReport":
        """Remove staging leftovers of dead writers and data files no version references.

        Runs under the catalog's write lock, so no commit can record a file while it is judged;
        other entries of staging/ (not made by the store) go only once untouched for `grace_s`.
        Training checkpoints (models/.checkpoints/<run>/): a finished run's always goes; an interrupted
        run's is what `syllabus train` resumes from, so it is listed as kept unless `checkpoints`;
        one whose run is training now is never touched.
        """
        report = GcReport(dry_run)
        now = time.time()
        for entry in files.stale_staging(self.root / "staging", grace_s, now):
            report.add(entry, "staging leftover")
        self._gc_checkpoints(report, checkpoints)
        with self.catalog.write_lock() as con:
            referenced = self.catalog.referenced_paths(con)
            data = self.root / "data"
            for path in sorted(data.rglob("*")):
                if path.is_dir():
                    continue
                rel = path.relative_to(self.root).as_posix()
                if rel in referenced:
                    continue
                if path.name.endswith(".tmp") and now - _mtime(path) < 60:
                    continue  # a live writer's link in flight (or renamed into place since we listed it)
                report.add(path, "unreferenced data file")
            if not dry_run:
                for item in report.items:
                    files.remove(item.path)
                self.checker.forget([str(i.path) for i in report.items])
                rows = self.root / "cache" / "store" / "rows"
                live = {Path(p).stem for p in referenced}
                for sidecar in rows.glob("*.u64"):
                    if sidecar.name.split(".")[0] not in live:
                        sidecar.unlink(missing_ok=True)
                for tmp in rows.glob(".*.tmp"):  # a row-hash write killed before its rename
                    if now - _mtime(tmp) >= 60:
                        tmp.unlink(missing_ok=True)
        return report

    def _gc_checkpoints(self, report: "GcReport", interrupted: bool) -> None:
        folder = self.root / "models" / ".checkpoints"  # engine/train/checkpoint.py writes them there
        if not folder.is_dir():
            return
        finished = {m["run_id"] for m in self.catalog.models()}
        for run in sorted(p for p in folder.iterdir() if p.is_dir()):
            with files.unless_locked(run / "lock") as free:
                if not free:
                    continue  # a run training now
                if run.name in finished or interrupted:
                    report.add(run, f"checkpoint of {'a finished' if run.name in finished else 'an interrupted'} run")
                    if not report.dry_run:
                        files.remove(run)  # under its lock: no trainer takes the folder meanwhile
                else:
                    report.keep(run, "checkpoint of an interrupted run: `syllabus train` resumes it; "
                                     "gc --checkpoints removes it")
        if not report.dry_run and not any(folder.iterdir()):
            folder.rmdir()

    def verify(self, progress=None) -> "VerifyReport":
        """Re-hash every file of every version; report missing or altered files with the versions using them."""
        report = VerifyReport(catalog=self.catalog.integrity_check())
        for rel, sha, nbytes, refs in self.catalog.all_files():
            path = self.root / rel
            if progress:
                progress(path)
            if not path.exists():
                report.problems.append(Problem(path, "missing", refs))
                continue
            report.files += 1
            report.bytes += path.stat().st_size
            if path.stat().st_size != nbytes:
                report.problems.append(Problem(path, f"size {path.stat().st_size}, expected {nbytes}", refs))
            elif files.sha256_file(path) != sha:
                report.problems.append(Problem(path, "sha256 mismatch", refs))
            else:
                self.checker.record(path, sha)
        return report

    # ---- models ------------------------------------------------------------------------

    def record_model(self, *, dataset: str, version: int, run_id: str, student: str, path: Path,
                     spec_hash: str, metrics: dict, lineage: dict | None = None) -> None:
        """Record a trained student of dataset@version (re-recording run_id+student replaces it).

        `lineage`: where the model came from, as the trainer describes it (e.g. its teacher), kept as given."""
        self.resolve(f"{dataset}@{version}")
        path = Path(path).expanduser().resolve()
        # Relative inside the store, so a moved store keeps working.
        stored = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        try:
            metrics_json = json.dumps(metrics, sort_keys=True)
            lineage_json = json.dumps(lineage or {}, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise StoreError(f"metrics or lineage of {run_id}/{student} are not JSON-serialisable: {e}") from None
        self.catalog.record_model(dataset=dataset, version=version, run_id=run_id, student=student,
                                  path=stored, spec_hash=spec_hash, metrics_json=metrics_json,
                                  lineage_json=lineage_json)

    def models(self, dataset: str | None = None, version: int | None = None) -> list[dict]:
        """Recorded students, oldest first: dataset, version, ref, run_id, student, path, spec_hash, metrics,
        created, lineage ({} where none was recorded)."""
        return self.catalog.models(dataset, version)


class Version:
    """One pinned version, for notebooks: `store.open(".syllabus").version("demo@3").to_polars("examples")`."""

    def __init__(self, store: Store, info: VersionInfo):
        self.store, self.info = store, info

    def __repr__(self) -> str:
        return f"<Version {self.ref}: " + ", ".join(f"{t} {n} rows" for t, n in self.info.row_counts.items()) + ">"

    @property
    def ref(self) -> str:
        return self.info.ref

    @property
    def tables(self) -> list[str]:
        return sorted(self.info.segments)

    @property
    def lineage(self) -> dict:
        return self.info.lineage

    def to_polars(self, table: str = "examples", columns: list[str] | None = None) -> pl.DataFrame:
        return self.store.read(self.info, table, columns)

    def to_arrow(self, table: str = "examples", columns: list[str] | None = None) -> pa.Table:
        return self.store.read_arrow(self.info, table, columns)

    def sql(self, query: str, **limits) -> pl.DataFrame:
        """SQL with this version's tables as views (examples, tokens, rejections); a polars DataFrame.
        `limits`: timeout, memory_limit, as for Store.sql."""
        return pl.from_arrow(self.store.sql(query, at=self.ref, **limits))

    def diff(self, other: str | "Version", **kwargs):
        return self.store.diff(self.ref, other.ref if isinstance(other, Version) else other, **kwargs)


@dataclass
class GcItem:
    path: Path
    bytes: int
    why: str


@dataclass
class GcReport:
    dry_run: bool
    items: list[GcItem] = field(default_factory=list)
    kept: list[GcItem] = field(default_factory=list)  # found and spared on purpose (said why)

    def add(self, path: Path, why: str) -> None:
        self.items.append(GcItem(path, _size(path), why))

    def keep(self, path: Path, why: str) -> None:
        self.kept.append(GcItem(path, _size(path), why))

    @property
    def bytes(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class Problem:
    path: Path
    what: str
    refs: list[str]


@dataclass
class VerifyReport:
    catalog: str
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.catalog == "ok"


def _mtime(path: Path) -> float:
    """A path's mtime; a path gone meanwhile (renamed or removed by its writer) counts as brand new."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_segment(seg: Segment, columns: list[str] | None) -> pl.DataFrame:
    try:
        frame = read_frame(seg.path, columns)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise _corrupt(seg, e) from None
    mask = seg.live_mask()
    return frame if mask is None else frame[np.flatnonzero(mask)]


def _corrupt(seg: Segment, e: Exception) -> CorruptData:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CorruptData(f"data file {seg.path} is corrupt ({first}); run `syllabus verify`", seg.path)


def _summary(frame: pl.DataFrame) -> dict:
    out = {}
    for column in _SUMMARY_COLUMNS:
        if column in frame.columns and frame.schema[column] in (pl.String, pl.Categorical, pl.Enum):
            counts = frame[column].cast(pl.String).value_counts()
            out[column] = {str(k): int(n) for k, n in sorted(counts.iter_rows(), key=lambda r: str(r[0]))}
    return out


def _to_frame(table, name: str) -> pl.DataFrame:
    if isinstance(table, pl.DataFrame):
        return table
    if isinstance(table, pa.Table):
        # Schema metadata (pandas', polars') is not content: it must not change file names.
        frame = pl.from_arrow(table.replace_schema_metadata(None))
        return frame if isinstance(frame, pl.DataFrame) else frame.to_frame()
    raise StoreError(f"table '{name}' must be a pyarrow.Table or polars.DataFrame, not {type(table).__name__}")
