"""How a table becomes files, and how a child version shares its parent's files.

A version's table is a list of *segments*: an immutable content-addressed Parquet file plus an
optional deletion vector (sorted row positions of that file that are not part of this version).

Every row has a 64-bit content hash (polars `hash_rows` over all columns). Committing a table on
top of a base version (the latest one) matches new rows to the base's live rows by (prompt_id,
hash): matched rows stay where they are, the base rows that found no match are marked deleted,
and only the unmatched new rows are written, as new files. So a child that changes 1% of the rows,
wherever they are, adds about 1% of the bytes, where chunking alone (a file per hash bucket) would
rewrite nearly every bucket: 1000 scattered changes touch all 64 of 64 buckets.

Compaction keeps reads cheap: a segment with less than half of its rows alive, and small
segments once there are more than a few, are rewritten into the new files of the commit.
New files hold rows sorted by (prompt_id, hash), cut into chunks of about CHUNK_BYTES (uncompressed),
so equal content always gives equal files (equal names).

Row hashes of each file are cached beside the store (cache/store/rows/<sha>.<scheme>), keyed by the
polars version because polars only promises stable hashes within one version; a missing or stale
cache entry is recomputed from the file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

KEY = "prompt_id"
SEED = 0x5EED5  # fixed: the hash of a row must not change between processes
SCHEME = f"pl{pl.__version__}"
CHUNK_BYTES = 256 << 20
CHUNK_ROWS = (1_024, 1 << 20)
LIVE_MIN = 0.5      # a kept segment with fewer live rows than this fraction is rewritten
MAX_SMALL = 8       # more small segments than this and they are merged


@dataclass
class Segment:
    """One file of a version's table, as the catalog records it."""
    path: Path            # absolute
    sha256: str
    rows: int             # rows in the file
    bytes: int
    deleted: np.ndarray | None = None  # sorted uint32 positions not in this version

    @property
    def live_rows(self) -> int:
        return self.rows - (0 if self.deleted is None else len(self.deleted))

    def live_mask(self) -> np.ndarray | None:
        if self.deleted is None or not len(self.deleted):
            return None
        mask = np.ones(self.rows, dtype=bool)
        mask[self.deleted] = False
        return mask


def pack_deleted(deleted: np.ndarray | None) -> bytes | None:
    if deleted is None or not len(deleted):
        return None
    return zlib.compress(np.diff(deleted.astype(np.int64), prepend=0).astype("<u4").tobytes(), 6)


def unpack_deleted(blob: bytes | None) -> np.ndarray | None:
    if not blob:
        return None
    return np.cumsum(np.frombuffer(zlib.decompress(blob), dtype="<u4").astype(np.int64)).astype(np.uint32)


# ---- hashing ---------------------------------------------------------------------------

def row_hashes(frame: pl.DataFrame) -> np.ndarray:
    if frame.height == 0:
        return np.zeros(0, dtype=np.uint64)
    return frame.hash_rows(seed=SEED).to_numpy().astype(np.uint64, copy=False)


def read_frame(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    return pl.read_parquet(path, columns=columns)


def schema_text(schema) -> str:
    """A table's schema as text, as polars sees it (files are written and read through polars)."""
    return ";".join(f"{name}:{dtype}" for name, dtype in dict(schema).items())


def file_schema(path: Path) -> str:
    return schema_text(pl.read_parquet_schema(path))


def table_digest(schema: str, hashes: np.ndarray) -> str:
    """Order-independent identity of a table's content (its schema and the multiset of row hashes)."""
    h = hashlib.sha256(SCHEME.encode() + b"\0" + schema.encode() + b"\0")
    h.update(np.sort(hashes).astype("<u8").tobytes())
    return h.hexdigest()


class HashCache:
    """Row hashes per data file, in file order, under cache/store/rows/."""

    def __init__(self, cache_dir: Path):
        self.dir = cache_dir / "rows"

    def _path(self, sha: str) -> Path:
        return self.dir / f"{sha}.{SCHEME}.u64"

    def put(self, sha: str, hashes: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        body = hashes.astype("<u8").tobytes()
        tmp = self.dir / f".{sha}.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(body + hashlib.blake2b(body, digest_size=32).digest())
        os.replace(tmp, self._path(sha))

    def get(self, seg: Segment) -> np.ndarray:
        path = self._path(seg.sha256)
        try:
            raw = path.read_bytes()
            body, check = raw[:-32], raw[-32:]
            if hashlib.blake2b(body, digest_size=32).digest() == check and len(body) == 8 * seg.rows:
                return np.frombuffer(body, dtype="<u8").astype(np.uint64)
        except (FileNotFoundError, ValueError):
            pass
        hashes = row_hashes(read_frame(seg.path))
        try:
            self.put(seg.sha256, hashes)
        except OSError:
            pass
        return hashes


# ---- planning a commit -------------------------------------------------------------------

@dataclass
class TablePlan:
    """What to record for one table: kept base segments (with new deletion vectors) then chunks to write."""
    schema: str
    digest: str
    rows: int
    kept: list[Segment] = field(default_factory=list)
    chunks: list[tuple[pl.DataFrame, np.ndarray]] = field(default_factory=list)  # (rows, their hashes)


def chunk_rows(frame: pl.DataFrame) -> int:
    per_row = frame.estimated_size() / max(frame.height, 1)
    lo, hi = CHUNK_ROWS
    return int(min(hi, max(lo, CHUNK_BYTES // max(per_row, 1))))


def plan_table(new: pl.DataFrame, base: list[Segment] | None, base_schema: str | None, hashes_of) -> TablePlan:
    """Plan one table's segments. `hashes_of(segment)` gives a base file's row hashes in file order."""
    new_h = row_hashes(new)
    schema = schema_text(new.schema)
    plan = TablePlan(schema, table_digest(schema, new_h), new.height)
    if base and base_schema == schema:
        write_idx, rewrite = _match(plan, new, new_h, base, hashes_of)
    else:
        write_idx, rewrite = np.arange(new.height), []
    pool = [(new[write_idx] if len(write_idx) < new.height else new, new_h[write_idx])]
    for seg, positions in rewrite:  # live rows of segments being compacted away
        pool.append((read_frame(seg.path)[positions].cast(new.schema), hashes_of(seg)[positions]))
    frame = pl.concat([f for f, _ in pool]) if len(pool) > 1 else pool[0][0]
    hashes = np.concatenate([h for _, h in pool])
    if frame.height == 0 and plan.kept:
        return plan
    plan.chunks = _chunks(frame, hashes)
    return plan


def _match(plan: TablePlan, new: pl.DataFrame, new_h: np.ndarray, base: list[Segment], hashes_of):
    keyed = KEY in new.columns
    frames = []
    for s, seg in enumerate(base):
        cols = {"h": hashes_of(seg), "seg": np.full(seg.rows, s, dtype=np.int32),
                "pos": np.arange(seg.rows, dtype=np.int64)}
        f = pl.DataFrame(cols)
        if keyed:
            f = f.with_columns(k=read_frame(seg.path, [KEY]).to_series())
        mask = seg.live_mask()
        frames.append(f.filter(pl.Series(mask)) if mask is not None else f)
    by = ["h", "k"] if keyed else ["h"]
    old = pl.concat(frames).with_columns(occ=pl.int_range(pl.len()).over(by))
    cur = pl.DataFrame({"h": new_h, "i": np.arange(len(new_h), dtype=np.int64)})
    if keyed:
        cur = cur.with_columns(k=new[KEY])
    # Identical rows may repeat: the n-th copy in the new table matches the n-th in the base.
    cur = cur.with_columns(occ=pl.int_range(pl.len()).over(by))
    on = by + ["occ"]
    matched = cur.join(old, on=on, how="inner").select("seg", "pos")
    write_idx = np.sort(cur.join(old, on=on, how="anti")["i"].to_numpy())

    kept_pos = {s: np.sort(np.asarray(p, dtype=np.int64))
                for s, p in matched.group_by("seg").agg(pl.col("pos")).iter_rows()}
    survivors = [(seg, kept_pos[s]) for s, seg in enumerate(base) if len(kept_pos.get(s, ()))]
    target = chunk_rows(new) if new.height else CHUNK_ROWS[1]
    rewrite = [(seg, pos) for seg, pos in survivors if len(pos) / seg.rows < LIVE_MIN]
    ids = {id(seg) for seg, _ in rewrite}
    small = [(seg, pos) for seg, pos in survivors if id(seg) not in ids and seg.rows < target // 4]
    if len(small) > MAX_SMALL:
        rewrite += small
        ids |= {id(seg) for seg, _ in small}
    for seg, pos in survivors:
        if id(seg) in ids:
            continue
        deleted = np.setdiff1d(np.arange(seg.rows, dtype=np.int64), pos, assume_unique=True).astype(np.uint32)
        plan.kept.append(Segment(seg.path, seg.sha256, seg.rows, seg.bytes, deleted if len(deleted) else None))
    return write_idx, rewrite


def _chunks(frame: pl.DataFrame, hashes: np.ndarray) -> list[tuple[pl.DataFrame, np.ndarray]]:
    """Rows sorted by (prompt_id, hash), cut into equal chunks: a function of the rows' content only."""
    if frame.height == 0:
        return [(frame, hashes)]
    order = pl.DataFrame({"h": hashes}).with_row_index("i")
    if KEY in frame.columns:
        order = order.with_columns(k=frame[KEY])
    order = order.sort(["k", "h"] if KEY in frame.columns else ["h"])["i"].to_numpy()
    if not np.array_equal(order, np.arange(len(order))):
        frame, hashes = frame[order], hashes[order]
    n = frame.height
    count = -(-n // chunk_rows(frame))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [(frame.slice(a, b - a), hashes[a:b]) for a, b in zip(bounds, bounds[1:])]
