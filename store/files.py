"""Content-addressed Parquet files: staged, fsynced, hashed, then renamed into place."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Fixed writer settings: identical input must give identical bytes (hence an identical name).
_WRITE_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    # Rows carry per-token top-k lists (kilobytes each): modest row groups keep readers'
    # memory bounded and give DuckDB several groups to scan in parallel.
    row_group_size=16_384,
    write_statistics=True,
)


@dataclass(frozen=True)
class StagedFile:
    path: Path
    sha256: str
    rows: int
    bytes: int


def write_staged(table: pa.Table, staging_dir: Path, name: str) -> StagedFile:
    """Write `table` as Parquet under `staging_dir`, fsync it, and hash its bytes."""
    path = staging_dir / f"{name}.parquet"
    # Chunk boundaries can shift page boundaries; one chunk per column makes bytes depend on content only.
    table = table.combine_chunks()
    with path.open("wb") as f:
        pq.write_table(table, f, **_WRITE_OPTIONS)
        f.flush()
        os.fsync(f.fileno())
    return StagedFile(path, _sha256(path), table.num_rows, path.stat().st_size)


def place(staged: StagedFile, dest_dir: Path) -> Path:
    """Move a staged file to `dest_dir/<sha256>.parquet`; an existing file of that name is reused."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / f"{staged.sha256}.parquet"
    if final.exists():
        # Same name = same bytes: never touch an immutable file another version may reference.
        staged.path.unlink()
    else:
        os.chmod(staged.path, 0o444)
        # A concurrent writer racing us here writes identical bytes, so replacing is harmless.
        os.replace(staged.path, final)
    fsync_dir(dest_dir)
    return final


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry must reach disk before the catalog points at it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
