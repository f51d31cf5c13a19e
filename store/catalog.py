"""The catalog: one SQLite file recording versions, their files and lineage, and trained models.

Every write is one `BEGIN IMMEDIATE` transaction, so a version and all its file rows appear
together or not at all. WAL mode plus a busy timeout lets several processes commit and read
at once: writers queue on the lock instead of failing or corrupting the file.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import ParentMoved, StoreError

SCHEMA_VERSION = 1  # PRAGMA user_version; bump with a migration when tables change

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS versions (
        id INTEGER PRIMARY KEY,
        dataset TEXT NOT NULL,
        version INTEGER NOT NULL,
        parent INTEGER,
        created TEXT NOT NULL,
        spec_text TEXT,
        spec_hash TEXT,
        teacher TEXT,
        code_version TEXT,
        stats TEXT NOT NULL,
        lineage TEXT NOT NULL,  -- the whole lineage dict as given, extra keys included
        UNIQUE (dataset, version))""",
    """CREATE TABLE IF NOT EXISTS files (
        version_id INTEGER NOT NULL REFERENCES versions(id),
        table_name TEXT NOT NULL,
        seq INTEGER NOT NULL,  -- a table may span several files (shared with a parent)
        path TEXT NOT NULL,    -- relative to the store root
        rows INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (version_id, table_name, seq))""",
    "CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256)",
    """CREATE TABLE IF NOT EXISTS models (
        id INTEGER PRIMARY KEY,
        dataset TEXT NOT NULL,
        version INTEGER NOT NULL,
        run_id TEXT NOT NULL,
        student TEXT NOT NULL,
        path TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        metrics TEXT NOT NULL,
        created TEXT NOT NULL,
        UNIQUE (run_id, student))""",
]


@dataclass(frozen=True)
class FileRow:
    table: str
    path: str  # relative to the store root, POSIX separators
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class CommitResult:
    version: int
    created: bool


@dataclass(frozen=True)
class VersionInfo:
    dataset: str
    version: int
    parent: int | None
    created: str
    spec_text: str | None
    spec_hash: str | None
    teacher: str | None
    code_version: str | None
    stats: dict
    row_counts: dict[str, int]
    files: dict[str, list[Path]]
    lineage: dict = field(default_factory=dict, repr=False)

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Catalog:
    def __init__(self, root: Path):
        self.root = root
        self.path = root / "catalog.sqlite"
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")  # persistent in the file; must run outside a transaction
            with _transaction(con):
                found = con.execute("PRAGMA user_version").fetchone()[0]
                if found > SCHEMA_VERSION:
                    raise StoreError(f"catalog {self.path} has schema {found}, newer than this syllabus understands ({SCHEMA_VERSION}); upgrade syllabus")
                for stmt in _SCHEMA:
                    con.execute(stmt)
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; timeout is the busy timeout.
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")  # a returned commit survives power loss
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    # ---- reads -------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT dataset FROM versions ORDER BY dataset")]

    def latest(self, dataset: str) -> int | None:
        with self._connect() as con:
            return _latest(con, dataset)

    def versions(self, dataset: str | None = None, version: int | None = None) -> list[VersionInfo]:
        """Versions oldest first, optionally narrowed to one dataset or one version of it."""
        where, params = _where(dataset=dataset, version=version)
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, dataset, version, parent, created, spec_text, spec_hash, teacher, code_version, stats, lineage"
                f" FROM versions{where} ORDER BY id", params).fetchall()
            files = con.execute(
                "SELECT version_id, table_name, path, rows FROM files WHERE version_id IN"
                f" (SELECT id FROM versions{where}) ORDER BY version_id, table_name, seq", params).fetchall()
        by_version: dict[int, list[tuple]] = {}
        for vid, table, path, nrows in files:
            by_version.setdefault(vid, []).append((table, path, nrows))
        return [self._info(row, by_version.get(row[0], [])) for row in rows]

    def _info(self, row: tuple, files: list[tuple]) -> VersionInfo:
        _, dataset, version, parent, created, spec_text, spec_hash, teacher, code_version, stats, lineage = row
        paths: dict[str, list[Path]] = {}
        counts: dict[str, int] = {}
        for table, path, nrows in files:
            paths.setdefault(table, []).append(self.root / path)
            counts[table] = counts.get(table, 0) + nrows
        return VersionInfo(dataset, version, parent, created, spec_text, spec_hash, teacher, code_version,
                           json.loads(stats), counts, paths, json.loads(lineage))

    # ---- writes ------------------------------------------------------------------------

    def commit(self, dataset: str, files: list[FileRow], lineage: dict, lineage_json: str,
               parent: int | None) -> CommitResult:
        """Record a version in one transaction, unless the latest version already has this content."""
        identity = _identity(((f.table, f.sha256) for f in files), lineage.get("spec_hash"), lineage.get("teacher"))
        with self._connect() as con, _transaction(con):
            latest = _latest(con, dataset)
            # Identity before parent: re-committing what is already latest is a no-op, not a conflict.
            if latest is not None and _stored_identity(con, dataset, latest) == identity:
                return CommitResult(latest, created=False)
            if parent != latest:
                raise ParentMoved(_moved_message(dataset, parent, latest))
            version = (latest or 0) + 1
            vid = insert_version(con, dataset, version, parent, lineage, lineage_json)
            insert_files(con, vid, files)
        return CommitResult(version, created=True)

    def record_model(self, *, dataset: str, version: int, run_id: str, student: str, path: str,
                     spec_hash: str, metrics_json: str) -> None:
        with self._connect() as con, _transaction(con):
            # Re-recording a run's student (e.g. after re-evaluation) replaces its row.
            con.execute(
                "INSERT INTO models (dataset, version, run_id, student, path, spec_hash, metrics, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, student) DO UPDATE SET"
                " dataset=excluded.dataset, version=excluded.version, path=excluded.path,"
                " spec_hash=excluded.spec_hash, metrics=excluded.metrics, created=excluded.created",
                (dataset, version, run_id, student, path, spec_hash, metrics_json, now()))

    def models(self, dataset: str | None = None, version: int | None = None) -> list[dict]:
        where, params = _where(dataset=dataset, version=version)
        with self._connect() as con:
            rows = con.execute(
                "SELECT dataset, version, run_id, student, path, spec_hash, metrics, created"
                f" FROM models{where} ORDER BY id", params).fetchall()
        return [dict(dataset=d, version=v, ref=f"{d}@{v}", run_id=r, student=s, path=self.root / p,
                     spec_hash=h, metrics=json.loads(m), created=c) for d, v, r, s, p, h, m, c in rows]


# Module-level so a test can make one of them fail mid-transaction.
def insert_version(con: sqlite3.Connection, dataset: str, version: int, parent: int | None,
                   lineage: dict, lineage_json: str) -> int:
    cur = con.execute(
        "INSERT INTO versions (dataset, version, parent, created, spec_text, spec_hash, teacher,"
        " code_version, stats, lineage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (dataset, version, parent, now(), lineage.get("spec_text"), lineage.get("spec_hash"),
         lineage.get("teacher"), lineage.get("code_version"),
         json.dumps(lineage.get("stats") or {}, sort_keys=True), lineage_json))
    return cur.lastrowid


def insert_files(con: sqlite3.Connection, version_id: int, files: list[FileRow]) -> None:
    seq: dict[str, int] = {}
    for f in files:
        seq[f.table] = seq.get(f.table, -1) + 1
        con.execute("INSERT INTO files (version_id, table_name, seq, path, rows, bytes, sha256)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (version_id, f.table, seq[f.table], f.path, f.rows, f.bytes, f.sha256))


@contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so the parent check and the insert see one state.
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:  # KeyboardInterrupt too: nothing half-written may become visible
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _latest(con: sqlite3.Connection, dataset: str) -> int | None:
    return con.execute("SELECT MAX(version) FROM versions WHERE dataset = ?", (dataset,)).fetchone()[0]


def _identity(table_shas, spec_hash, teacher) -> tuple:
    return (tuple(sorted(table_shas)), spec_hash, teacher)


def _stored_identity(con: sqlite3.Connection, dataset: str, version: int) -> tuple:
    spec_hash, teacher = con.execute(
        "SELECT spec_hash, teacher FROM versions WHERE dataset = ? AND version = ?", (dataset, version)).fetchone()
    shas = con.execute(
        "SELECT f.table_name, f.sha256 FROM files f JOIN versions v ON v.id = f.version_id"
        " WHERE v.dataset = ? AND v.version = ?", (dataset, version)).fetchall()
    return _identity(shas, spec_hash, teacher)


def _where(**filters) -> tuple[str, list]:
    given = {k: v for k, v in filters.items() if v is not None}
    clause = " AND ".join(f"{k} = ?" for k in given)
    return (f" WHERE {clause}" if clause else ""), list(given.values())


def _moved_message(dataset: str, parent: int | None, latest: int | None) -> str:
    if latest is None:
        return f"dataset '{dataset}' has no versions, but this commit expected parent {dataset}@{parent}"
    expected = f"parent {dataset}@{parent}" if parent is not None else "to be the first version"
    return (f"dataset '{dataset}' moved: this commit expected {expected} but the latest is {dataset}@{latest}"
            " (another commit landed first); re-run to build on the latest")
