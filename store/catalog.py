"""The catalog: one SQLite file recording versions, their files and lineage, tags, and trained models.

Every write is one `BEGIN IMMEDIATE` transaction, so a version and all its file rows appear
together or not at all (a process killed mid-transaction leaves only uncommitted WAL frames,
which SQLite discards). WAL mode plus a busy timeout lets several processes commit and read at
once: writers queue on the lock instead of failing or corrupting the file. `gc` deletes
unreferenced data files while holding the same lock, and a commit re-checks, under the lock, that
every file it records exists: a file cannot vanish between that check and the commit.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from .errors import ParentMoved, StoreError
from .files import crash_point
from .layout import Segment, pack_deleted, unpack_deleted

SCHEMA_VERSION = 3  # PRAGMA user_version; bump with a migration when tables change

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
        seq INTEGER NOT NULL,  -- a table spans several files, often shared with its parent
        path TEXT NOT NULL,    -- relative to the store root
        rows INTEGER NOT NULL, -- rows in the file
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
    # v2: per-table content identity and summary; tags.
    """CREATE TABLE IF NOT EXISTS tables (
        version_id INTEGER NOT NULL REFERENCES versions(id),
        table_name TEXT NOT NULL,
        rows INTEGER NOT NULL,
        digest TEXT NOT NULL,   -- sha256 over the schema and the multiset of row hashes
        scheme TEXT NOT NULL,   -- which row hash made the digest
        summary TEXT NOT NULL,  -- JSON: rows per split / category where the table has them
        PRIMARY KEY (version_id, table_name))""",
    """CREATE TABLE IF NOT EXISTS refs (
        dataset TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (dataset, name))""",
]
# v1 -> v2: files gain a deletion vector (row positions of the file not in this version).
_FILE_COLUMNS = {"deleted": "ALTER TABLE files ADD COLUMN deleted BLOB",
                 "live_rows": "ALTER TABLE files ADD COLUMN live_rows INTEGER"}
# v2 -> v3: a trained model records where it came from (JSON: its teacher, a chain of teachers).
_MODEL_COLUMNS = {"lineage": "ALTER TABLE models ADD COLUMN lineage TEXT"}

TAG = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class FileRow:
    table: str
    path: str  # relative to the store root, POSIX separators
    rows: int
    bytes: int
    sha256: str
    deleted: bytes | None = None
    live_rows: int | None = None


@dataclass(frozen=True)
class TableRow:
    table: str
    rows: int
    digest: str
    scheme: str
    summary: dict


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
    segments: dict[str, list[Segment]] = field(default_factory=dict, repr=False)
    summaries: dict[str, dict] = field(default_factory=dict, repr=False)
    tags: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.dataset}@{self.version}"

    def split_counts(self, table: str = "examples") -> dict[str, int]:
        """Rows per split: recorded at commit, else the engine's split stats of older versions."""
        found = self.summaries.get(table, {}).get("split")
        if found is not None:
            return found
        return {k: v for k, v in (self.stats.get("split") or {}).items() if isinstance(v, int)}


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
                if found < SCHEMA_VERSION:
                    for stmt in _SCHEMA:
                        con.execute(stmt)
                    have = {r[1] for r in con.execute("PRAGMA table_info(files)")}
                    for column, stmt in _FILE_COLUMNS.items():
                        if column not in have:
                            con.execute(stmt)
                    have = {r[1] for r in con.execute("PRAGMA table_info(models)")}
                    for column, stmt in _MODEL_COLUMNS.items():
                        if column not in have:
                            con.execute(stmt)
                    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; timeout is the busy timeout.
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")  # a returned commit survives power loss
            con.execute("PRAGMA foreign_keys=ON")
            yield con
        finally:
            con.close()

    @contextmanager
    def write_lock(self) -> Iterator[sqlite3.Connection]:
        """Hold the catalog's write lock (no commit can land meanwhile); gc runs under it."""
        with self._connect() as con, _transaction(con):
            yield con

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
        sub = f"(SELECT id FROM versions{where})"
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, dataset, version, parent, created, spec_text, spec_hash, teacher, code_version, stats, lineage"
                f" FROM versions{where} ORDER BY id", params).fetchall()
            files = con.execute(
                "SELECT version_id, table_name, path, rows, bytes, sha256, deleted FROM files"
                f" WHERE version_id IN {sub} ORDER BY version_id, table_name, seq", params).fetchall()
            tables = con.execute(f"SELECT version_id, table_name, rows, summary FROM tables WHERE version_id IN {sub}",
                                 params).fetchall()
            tags = con.execute("SELECT dataset, version, name FROM refs ORDER BY created, name").fetchall()
        by_version: dict[int, list[tuple]] = {}
        for vid, *rest in files:
            by_version.setdefault(vid, []).append(tuple(rest))
        summaries: dict[int, dict] = {}
        for vid, table, nrows, summary in tables:
            summaries.setdefault(vid, {})[table] = {"rows": nrows, **json.loads(summary)}
        tag_map: dict[tuple, list[str]] = {}
        for d, v, name in tags:
            tag_map.setdefault((d, v), []).append(name)
        return [self._info(row, by_version.get(row[0], []), summaries.get(row[0], {}), tag_map)
                for row in rows]

    def _info(self, row: tuple, files: list[tuple], summaries: dict, tag_map: dict) -> VersionInfo:
        _, dataset, version, parent, created, spec_text, spec_hash, teacher, code_version, stats, lineage = row
        paths: dict[str, list[Path]] = {}
        segments: dict[str, list[Segment]] = {}
        counts: dict[str, int] = {}
        for table, path, nrows, nbytes, sha, deleted in files:
            seg = Segment(self.root / path, sha, nrows, nbytes, unpack_deleted(deleted))
            paths.setdefault(table, []).append(seg.path)
            segments.setdefault(table, []).append(seg)
            counts[table] = counts.get(table, 0) + seg.live_rows
        return VersionInfo(dataset, version, parent, created, spec_text, spec_hash, teacher, code_version,
                           json.loads(stats), counts, paths, json.loads(lineage), segments, summaries,
                           tag_map.get((dataset, version), []))

    def tag_version(self, dataset: str, tag: str) -> int | None:
        with self._connect() as con:
            row = con.execute("SELECT version FROM refs WHERE dataset = ? AND name = ?", (dataset, tag)).fetchone()
        return row[0] if row else None

    def tags(self, dataset: str | None = None) -> list[tuple[str, str, int]]:
        where, params = _where(dataset=dataset)
        with self._connect() as con:
            return con.execute(f"SELECT dataset, name, version FROM refs{where} ORDER BY dataset, name", params).fetchall()

    def referenced_paths(self, con: sqlite3.Connection) -> set[str]:
        return {r[0] for r in con.execute("SELECT DISTINCT path FROM files")}

    def all_files(self) -> list[tuple[str, str, int, list[str]]]:
        """(path, sha256, bytes, [refs using it]) for every distinct file of every version."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT f.path, f.sha256, f.bytes, v.dataset || '@' || v.version FROM files f"
                " JOIN versions v ON v.id = f.version_id ORDER BY f.path, v.id").fetchall()
        out: dict[str, tuple] = {}
        for path, sha, nbytes, ref in rows:
            out.setdefault(path, (path, sha, nbytes, []))[3].append(ref)
        return list(out.values())

    def integrity_check(self) -> str:
        with self._connect() as con:
            return con.execute("PRAGMA integrity_check").fetchone()[0]

    # ---- writes ------------------------------------------------------------------------

    def commit(self, dataset: str, files: list[FileRow], tables: list[TableRow], lineage: dict,
               lineage_json: str, parent: int | None, *, base: int | None, base_identity: tuple | None,
               ensure_files: Callable[[], None] = lambda: None) -> CommitResult:
        """Record a version in one transaction, unless the latest version already has this content.

        `base` is the version the files were planned against and `base_identity` its content identity
        (computed fresh by the caller); a version landed since is compared through its stored digests.
        """
        identity = _identity(((t.table, t.digest) for t in tables), lineage.get("spec_hash"), lineage.get("teacher"))
        with self._connect() as con, _transaction(con):
            latest = _latest(con, dataset)
            # Identity before parent: re-committing what is already latest is a no-op, not a conflict.
            if latest is not None:
                same = (base_identity == identity) if latest == base else (
                    _stored_identity(con, dataset, latest, tables[0].scheme if tables else None) == identity)
                if same:
                    return CommitResult(latest, created=False)
            if parent != latest:
                raise ParentMoved(_moved_message(dataset, parent, latest))
            ensure_files()  # under the lock: gc cannot remove them from here on
            version = (latest or 0) + 1
            vid = insert_version(con, dataset, version, parent, lineage, lineage_json)
            insert_files(con, vid, files)
            for t in tables:
                con.execute("INSERT INTO tables VALUES (?, ?, ?, ?, ?, ?)",
                            (vid, t.table, t.rows, t.digest, t.scheme, json.dumps(t.summary, sort_keys=True)))
            crash_point("in-transaction")
        return CommitResult(version, created=True)

    def set_tag(self, dataset: str, tag: str, version: int, force: bool) -> int | None:
        """Point `tag` at dataset@version; returns the version it pointed at before (None if new)."""
        with self._connect() as con, _transaction(con):
            row = con.execute("SELECT version FROM refs WHERE dataset = ? AND name = ?", (dataset, tag)).fetchone()
            if row and row[0] != version and not force:
                raise StoreError(f"tag {dataset}@{tag} already points at {dataset}@{row[0]}; use --force to move it")
            con.execute("INSERT INTO refs VALUES (?, ?, ?, ?) ON CONFLICT (dataset, name) DO UPDATE SET"
                        " version = excluded.version, created = excluded.created", (dataset, tag, version, now()))
        return row[0] if row else None

    def delete_tag(self, dataset: str, tag: str) -> int:
        with self._connect() as con, _transaction(con):
            row = con.execute("SELECT version FROM refs WHERE dataset = ? AND name = ?", (dataset, tag)).fetchone()
            if not row:
                raise StoreError(f"dataset '{dataset}' has no tag '{tag}'")
            con.execute("DELETE FROM refs WHERE dataset = ? AND name = ?", (dataset, tag))
        return row[0]

    def record_model(self, *, dataset: str, version: int, run_id: str, student: str, path: str,
                     spec_hash: str, metrics_json: str, lineage_json: str = "{}") -> None:
        with self._connect() as con, _transaction(con):
            # Re-recording a run's student (e.g. after re-evaluation) replaces its row.
            con.execute(
                "INSERT INTO models (dataset, version, run_id, student, path, spec_hash, metrics, created, lineage)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, student) DO UPDATE SET"
                " dataset=excluded.dataset, version=excluded.version, path=excluded.path,"
                " spec_hash=excluded.spec_hash, metrics=excluded.metrics, created=excluded.created,"
                " lineage=excluded.lineage",
                (dataset, version, run_id, student, path, spec_hash, metrics_json, now(), lineage_json))

    def models(self, dataset: str | None = None, version: int | None = None) -> list[dict]:
        where, params = _where(dataset=dataset, version=version)
        with self._connect() as con:
            rows = con.execute(
                "SELECT dataset, version, run_id, student, path, spec_hash, metrics, created, lineage"
                f" FROM models{where} ORDER BY id", params).fetchall()
        return [dict(dataset=d, version=v, ref=f"{d}@{v}", run_id=r, student=s, path=self.root / p,
                     spec_hash=h, metrics=json.loads(m), created=c, lineage=json.loads(lin or "{}"))
                for d, v, r, s, p, h, m, c, lin in rows]


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
        con.execute("INSERT INTO files (version_id, table_name, seq, path, rows, bytes, sha256, deleted, live_rows)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (version_id, f.table, seq[f.table], f.path, f.rows, f.bytes, f.sha256, f.deleted,
                     f.rows if f.live_rows is None else f.live_rows))


def segment_row(table: str, root: Path, seg: Segment) -> FileRow:
    return FileRow(table, seg.path.relative_to(root).as_posix(), seg.rows, seg.bytes, seg.sha256,
                   pack_deleted(seg.deleted), seg.live_rows)


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


def _identity(table_digests, spec_hash, teacher) -> tuple:
    return (tuple(sorted(table_digests)), spec_hash, teacher)


def identity_of(digests: dict[str, str], spec_hash, teacher) -> tuple:
    return _identity(digests.items(), spec_hash, teacher)


def _stored_identity(con: sqlite3.Connection, dataset: str, version: int, scheme: str | None) -> tuple | None:
    vid, spec_hash, teacher = con.execute(
        "SELECT id, spec_hash, teacher FROM versions WHERE dataset = ? AND version = ?", (dataset, version)).fetchone()
    rows = con.execute("SELECT table_name, digest, scheme FROM tables WHERE version_id = ?", (vid,)).fetchall()
    if not rows or any(s != scheme for _, _, s in rows):
        return None  # digests of another hash scheme (or none, before v2): cannot tell, so not equal
    return _identity(((t, d) for t, d, _ in rows), spec_hash, teacher)


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
