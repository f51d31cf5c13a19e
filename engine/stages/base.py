"""The stage contract: run(frame, ctx) -> (kept, rejected, stats).

A stage is pure given its inputs. Rows it drops go to `rejected` with the columns of
REJECTION_SCHEMA, so the store's `rejections` table says why every row is out.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

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


class Stage:
    """A pipeline step. Subclasses declare what the pipeline needs to know of them.

    Adding a stage is one module in engine/stages/ with one subclass: the pipeline finds
    it (engine.stages.all_stages), orders it by `order`, asks `wanted(spec)` whether the
    spec uses it, and keys its cache by `cache_slice` plus the code it runs.
    """

    name: ClassVar[str]
    order: ClassVar[int]  # position in the pipeline: stages run in ascending order
    cached: ClassVar[bool] = False  # store the output: it calls models or searches neighbours
    calls_teacher: ClassVar[bool] = False  # the stage whose calls `plan` counts
    adds_rows: ClassVar[bool] = False  # for plan: skipping it undercounts (otherwise it overcounts)
    drops_rows: ClassVar[bool] = True  # for plan: False when it only adds columns (skipping it changes no count)
    # coverage.augment_until_quota: "new_rows" stages process each round's new variations
    # (against what is kept so far); "pool" stages re-run over the whole pool after each round.
    top_up: ClassVar[str | None] = None
    # Its expensive work is one model call per row (teacher answers, embeddings): an executor may run it
    # elsewhere, batch by batch, through process_rows (engine/curate/executors.py).
    per_row: ClassVar[bool] = False

    _registry: ClassVar[dict[str, type["Stage"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Stage._registry[cls.name] = cls

    @classmethod
    def wanted(cls, spec) -> bool:
        """Whether the spec asks for this stage."""
        return True

    @classmethod
    def position(cls, spec) -> float:
        """Where it runs for this spec: `order`, unless the spec needs its output earlier."""
        return cls.order

    def cache_slice(self, spec, store) -> object:
        """The slice of the spec (and of the files and versions it names) that the output depends on."""
        raise NotImplementedError

    def cheap(self, spec, frame) -> bool:
        """Whether `plan` may run it: milliseconds, no model (frame: the input plan has at hand, or None)."""
        return False

    def run(self, frame: pl.DataFrame, ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
        raise NotImplementedError

    def run_new_rows(self, batch: pl.DataFrame, kept: pl.DataFrame, ctx: RunContext):
        """A top-up round's new rows through this stage; `kept` is every row kept so far."""
        return self.run(batch, ctx)

    def process_rows(self, items: list, ctx: RunContext) -> list:
        """A per_row stage's model call over a batch of work items (those its per-row cache lacks): one output
        each, in order. It may run on another machine: it reads ctx.spec and ctx.teacher, never the store or
        the caches (the driver writes what it returns)."""
        raise NotImplementedError(f"stage {self.name!r} is not per_row")


# --- what a cache slice is made of ------------------------------------------------------

def dump(model) -> object:
    """A spec section as plain JSON values (None stays None)."""
    return None if model is None else model.model_dump(mode="json", by_alias=True)


def teacher_key(teacher) -> object:
    """The teacher's section as stage caches key on it: without `device`, which changes where the teacher
    runs, not what it answers (the rows agree within float tolerance)."""
    return teacher.model_dump(mode="json", by_alias=True, exclude={"device"})


def file_digests(spec, paths) -> dict:
    """The content of files a spec section names: editing a template re-runs its stage."""
    from engine.models import file_digest

    digests = {}
    for p in paths:
        if p:
            path = spec.resolve_path(p)
            digests[p] = file_digest(path) if path.is_file() else "missing"
    return digests


def pinned(store, ref: str | None) -> str | None:
    """NAME@latest pins to a number: a new version of an input re-runs the stage."""
    return store.resolve(ref).ref if ref else None


def teach_order(spec) -> str:
    """teach.order: "all" (every row is asked) or "selection" (engine.stages.teach_order)."""
    teach = getattr(spec, "teach", None)
    return teach.order if teach is not None else "all"


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
