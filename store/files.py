"""Content-addressed Parquet files: staged, fsynced, hashed, then linked into place.

Crash safety rests on three rules:
- a data file is only ever created whole: written under staging/, fsynced, then hard-linked
  (atomically) to data/<dataset>/<table>/<sha256>.parquet, and the directory fsynced;
- the catalog row that makes a file part of a version is written after that, in one transaction;
- each in-flight commit holds an exclusive lock on its staging entry, so `gc` can tell a dead
  writer's leftovers (lock free) from a live one's (lock held) without guessing from ages.

`SYLLABUS_STORE_CRASH_AT=<point>` makes the process SIGKILL itself at that point (see `crash_point`):
the crash tests use it to kill real processes at exact moments.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import polars as pl

# Fixed writer settings: identical input must give identical bytes (hence an identical name).
# Polars' writer: about 4x faster than pyarrow's on the nested top-k list columns (and its reader 4x too).
_WRITE_OPTIONS = dict(compression="zstd", compression_level=3, statistics=True)
# Row groups of about this many uncompressed bytes: rows carry per-token top-k lists (kilobytes
# each), so a fixed row count would make groups of hundreds of megabytes; DuckDB scans groups in parallel.
_ROW_GROUP_BYTES = 64 << 20
_ROW_GROUP_ROWS = (1_024, 65_536)

CRASH_ENV = "SYLLABUS_STORE_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: die here, as hard as a power cut allows a process to die, if asked to."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class StagedFile:
    path: Path
    sha256: str
    rows: int
    bytes: int


def row_group_rows(frame: pl.DataFrame) -> int:
    per_row = frame.estimated_size() / max(frame.height, 1)
    lo, hi = _ROW_GROUP_ROWS
    return int(min(hi, max(lo, _ROW_GROUP_BYTES // max(per_row, 1))))


def write_staged(frame: pl.DataFrame, staging_dir: Path, name: str) -> StagedFile:
    """Write `frame` as Parquet under `staging_dir`, fsync it, and hash its bytes."""
    path = staging_dir / f"{name}.parquet"
    frame = frame.rechunk()  # chunk boundaries must not shape the bytes
    frame.write_parquet(path, row_group_size=row_group_rows(frame), **_WRITE_OPTIONS)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, 0o444)
    return StagedFile(path, sha256_file(path), frame.height, path.stat().st_size)


def place(staged: StagedFile, dest_dir: Path, is_intact=None) -> Path:
    """Link a staged file to `dest_dir/<sha256>.parquet`; an intact existing file of that name is reused.

    The staged copy stays (it is a second name for the same inode) until the commit ends, so a
    file removed meanwhile by a concurrent `gc` can be linked again under the catalog lock.
    `is_intact(path, sha, size)` says whether an existing file still holds its bytes; one that does
    not is replaced (re-committing the same data heals a corrupted file).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f"{staged.sha256}.parquet"
    if final.exists() and (is_intact is None or is_intact(final, staged.sha256, staged.bytes)):
        return final  # same name = same bytes: never touch an immutable file another version may reference
    ensure_linked(staged.path, final)
    return final


def ensure_linked(staged: Path, final: Path) -> None:
    """Make `final` name the staged inode, atomically, and make that durable."""
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    os.link(staged, tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach disk before the catalog points at it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---- staging: one locked entry per in-flight writer -----------------------------------------

class Staging:
    """`with Staging(root/"staging", "demo") as d:` a private folder under staging/ that gc leaves
    alone while this process lives (it holds an flock on `<name>.lock` beside the folder)."""

    def __init__(self, staging_root: Path, prefix: str):
        self.root = staging_root
        self.prefix = prefix
        self.dir: Path | None = None
        self._fd: int | None = None
        self._lock: Path | None = None

    def __enter__(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            name = f"{self.prefix}-{os.getpid()}-{secrets.token_hex(4)}"
            lock = self.root / f"{name}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else a gc removed the lock file between our open and our flock: try again
                break
            os.close(fd)
        self._fd, self._lock = fd, lock
        self.dir = self.root / name
        self.dir.mkdir()
        return self.dir

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self._lock.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)


def stale_staging(staging_root: Path, grace_s: float, now: float) -> list[Path]:
    """Entries of staging/ that no live writer holds: locked-protocol entries whose lock is free,
    and other entries (e.g. another tool's temporary folders) untouched for `grace_s` seconds."""
    if not staging_root.is_dir():
        return []
    entries = sorted(staging_root.iterdir())
    held: set[str] = set()
    stale: list[Path] = []
    for lock in (e for e in entries if e.name.endswith(".lock") and e.is_file()):
        name = lock.name[: -len(".lock")]
        if _lock_is_held(lock):
            held.add(name)
        else:
            stale.append(lock)
            held.add(name)  # its folder is judged with it
            if (staging_root / name).exists():
                stale.append(staging_root / name)
    for e in entries:
        if e.name.endswith(".lock") or e.name in held:
            continue
        if now - _newest_mtime(e) >= grace_s:
            stale.append(e)
    return stale


def _lock_is_held(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our lock if we got it
    return False


@contextlib.contextmanager
def unless_locked(lock: Path):
    """Yields True holding `lock`'s flock (none there: True, nothing held), False if another process holds it."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # drops our lock


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for p in path.rglob("*"):
                try:
                    newest = max(newest, p.lstat().st_mtime)
                except FileNotFoundError:
                    pass
        return newest
    except FileNotFoundError:
        return float("inf")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
