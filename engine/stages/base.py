"""The stage contract: run(frame, ctx) -> (kept, rejected, stats).

A stage is pure given its inputs. Rows it drops go to `rejected` with the columns of
REJECTION_SCHEMA, so the store's `rejections` table says why every row is out.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import polars as pl

from engine.errors import StageError

REJECTION_SCHEMA = {
    "prompt_id": pl.String,
    "parent_id": pl.String,
    "source": pl.String,
    "category": pl.String,
    "prompt": pl.String,
    "label": pl.String,
    "stage": pl.String,
    "reason": pl.String,
    "neighbor_id": pl.String,  # dedup: the kept row this one duplicates
    "similarity": pl.Float64,  # dedup: cosine similarity to that neighbour
}



@dataclass
class RunContext:
    spec: Any
    cache_dir: Path
    progress: bool = True
    store: Any = None  # the store.Store a run commits to: `from:` sources and dedup.against read it
    teacher: Any = None  # loaded lazily on the first teacher call, then reused
    counters: dict = field(default_factory=dict)
    rejected: list = field(default_factory=list)  # rejection frames of the stages run so far


class Stage(Protocol):
    name: str

    def run(self, frame: pl.DataFrame, ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame, dict]: ...


def normalise_prompt(text: str) -> str:
    """The form whose hash is a prompt's identity: NFKC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def prompt_id(text: str) -> str:
    return hashlib.sha256(normalise_prompt(text).encode()).hexdigest()


def seeded_unit(purpose: str, seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (purpose, seed, key): stable across runs and machines.

    `purpose` keeps the draws of different decisions independent: with one stream, the rows a
    selection keeps (the smallest draws) would all land in the train split.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def rejections(frame: pl.DataFrame, stage: str, reasons: pl.Series | str) -> pl.DataFrame:
    """Rows of `frame` as rejection records of `stage`."""
    reason = reasons if isinstance(reasons, pl.Series) else pl.Series([reasons] * frame.height, dtype=pl.String)
    out = frame.with_columns(stage=pl.lit(stage), reason=reason.alias("reason"))
    return out.select([pl.col(c).cast(t) if c in out.columns else pl.lit(None, t).alias(c) for c, t in REJECTION_SCHEMA.items()])


def no_rejections() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTION_SCHEMA)
