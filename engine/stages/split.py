"""Split: train/val/test from a seeded hash of the group key, stable as data grows.

Grouping by parent_id keeps every augmentation of a prompt in its original's split.
"""

from __future__ import annotations

import polars as pl

from engine.stages.base import RunContext, no_rejections, seeded_unit


def assign_split(key: str, splits) -> str:
    u = seeded_unit("split", splits.seed, key)
    if u < splits.train:
        return "train"
    return "val" if u < splits.train + splits.val else "test"


class Split:
    name = "split"

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        splits = ctx.spec.splits
        names = [assign_split(key, splits) for key in frame[splits.group_by]]
        kept = frame.with_columns(split=pl.Series(names, dtype=pl.String))
        counts = dict(kept.group_by("split").len().iter_rows())
        stats = {s: counts.get(s, 0) for s in ("train", "val", "test")}
        return kept, no_rejections(), stats
