"""Is a data file still the bytes its name promises? Cheap on every read, thorough on `verify`.

Hashing every file on every read would cost seconds per query on a large version, so reads use a
quick check, as git's index and rsync do: a file whose (size, mtime, ctime, inode) still equal the
stamp recorded the last time its sha256 was confirmed is trusted; any other file is re-hashed once,
and its stamp recorded when it matches. Writing a file through the filesystem always moves its
ctime (which no user call can set back), so a changed file is re-hashed and caught on the next read.
What the quick check cannot see is a change below the filesystem (bit rot on the disk): `verify`
re-hashes everything, and pyarrow readers check Parquet page CRCs as they read.

Stamps live in cache/store/checked.sqlite: a cache, safe to delete, machine-local by nature
(a copied store has new inodes, so its files are simply re-hashed once).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .errors import CorruptData
from .files import sha256_file


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


class Checker:
    def __init__(self, cache_dir: Path):
        self.path = cache_dir / "checked.sqlite"
        self._con: sqlite3.Connection | None = None
        self._seen: dict[str, str] = {}  # this process: path -> stamp already confirmed

    def _db(self) -> sqlite3.Connection | None:
        if self._con is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                con = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("CREATE TABLE IF NOT EXISTS checked (path TEXT PRIMARY KEY, sha256 TEXT, stamp TEXT)")
                self._con = con
            except (sqlite3.Error, OSError):
                return None  # a read-only store still reads; it just re-hashes
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def _known(self, paths: list[str]) -> dict[str, tuple[str, str]]:
        con = self._db()
        if con is None or not paths:
            return {}
        found = {}
        try:
            for i in range(0, len(paths), 500):
                chunk = paths[i:i + 500]
                q = f"SELECT path, sha256, stamp FROM checked WHERE path IN ({','.join('?' * len(chunk))})"
                found.update({p: (s, st) for p, s, st in con.execute(q, chunk)})
        except sqlite3.Error:
            return {}
        return found

    def record(self, path: Path, sha256: str) -> None:
        """Remember that `path` holds `sha256` as of now (the writer just hashed it)."""
        try:
            stamp = _stamp(path.stat())
        except FileNotFoundError:
            return
        self._seen[str(path)] = stamp
        con = self._db()
        if con is not None:
            try:
                con.execute("INSERT OR REPLACE INTO checked VALUES (?, ?, ?)", (str(path), sha256, stamp))
            except sqlite3.Error:
                pass

    def check(self, files: list[tuple[Path, str, int]], where: str = "") -> None:
        """Raise CorruptData naming the first file (path, sha256, bytes) that is missing or altered."""
        todo = []
        for path, sha, size in files:
            try:
                st = path.stat()
            except FileNotFoundError:
                raise CorruptData(f"data file {path}{where} is missing; run `syllabus verify`", path) from None
            if st.st_size != size:
                raise CorruptData(f"data file {path}{where} is corrupt: {st.st_size} bytes, the catalog says {size};"
                                  " run `syllabus verify`", path)
            if self._seen.get(str(path)) != _stamp(st):
                todo.append((path, sha, st))
        if not todo:
            return
        known = self._known([str(p) for p, _, _ in todo])
        for path, sha, st in todo:
            if known.get(str(path)) == (sha, _stamp(st)):
                self._seen[str(path)] = _stamp(st)
                continue
            if sha256_file(path) != sha:
                raise CorruptData(f"data file {path}{where} is corrupt: its sha256 no longer matches its name;"
                                  " run `syllabus verify`", path)
            self.record(path, sha)

    def forget(self, paths: list[str]) -> None:
        con = self._db()
        for p in paths:
            self._seen.pop(p, None)
        if con is not None and paths:
            try:
                con.executemany("DELETE FROM checked WHERE path = ?", [(p,) for p in paths])
            except sqlite3.Error:
                pass

    def is_intact(self, path: Path, sha: str, size: int) -> bool:
        try:
            self.check([(path, sha, size)])
            return True
        except CorruptData:
            return False
