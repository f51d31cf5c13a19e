"""Split: train/val/test from a seeded hash of the group key, stable as data grows.

The split is drawn before the teacher sees any row (right after dedup), so the test split
never depends on the teacher's confidence: mining's band and the coverage quotas decide
over train and val only, and pass test rows through untouched. Grouping by parent_id
(the default) keeps every augmentation of a prompt in its original's split.

Top-up rounds (coverage.augment_until_quota) make variations because selection found a
category short, a decision that depends on the teacher's confidence: a variation whose
group falls in the test split is therefore rejected here, so the test split is the same
whatever the band, quotas or top-up do.
"""

from __future__ import annotations

import polars as pl

from engine.stages.base import RunContext, Stage, dump, no_rejections, rejections, seeded_unit

TEST = "test"
TOP_UP_TEST = "top-up variation in the test split: the test split is drawn before mining and never grown by top-up"


def assign_split(key: str, splits) -> str:
    u = seeded_unit("split", splits.seed, key)
    if u < splits.train:
        return "train"
    return "val" if u < splits.train + splits.val else TEST


def is_test(frame: pl.DataFrame) -> pl.Series:
    """Which rows belong to the test split (none when the frame has no split yet)."""
    if "split" not in frame.columns:
        return pl.Series([False] * frame.height, dtype=pl.Boolean)
    return (frame["split"] == TEST).fill_null(False)


class Split(Stage):
    name = "split"
    order = 55  # after dedup, before teach: no teacher-confidence decision can shape the splits
    top_up = "new_rows"

    def cache_slice(self, spec, store):
        return dump(spec.splits)

    def cheap(self, spec, frame) -> bool:
        return True

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        splits = ctx.spec.splits
        names = [assign_split(key, splits) for key in frame[splits.group_by]]
        kept = frame.with_columns(split=pl.Series(names, dtype=pl.String))
        counts = dict(kept.group_by("split").len().iter_rows())
        stats = {s: counts.get(s, 0) for s in ("train", "val", "test")}
        stats["drawn_by"] = f"hash of {splits.group_by} (seed {splits.seed})"  # `show` says how the test split was drawn
        return kept, no_rejections(), stats

    def run_new_rows(self, batch: pl.DataFrame, kept: pl.DataFrame, ctx: RunContext):
        """A top-up round's variations get their split; those that land in test are rejected."""
        out, _, stats = self.run(batch, ctx)
        test = is_test(out)
        return out.filter(~test), rejections(out.filter(test), self.name, TOP_UP_TEST), stats
