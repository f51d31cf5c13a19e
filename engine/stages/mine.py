"""Mine: keep the rows whose confidence lies in the band, plus a seeded share of the rest.

With `truncated: drop`, answers cut off at max_new_tokens go first, whatever their confidence:
a student would learn to stop mid-sentence.

The share outside the band is exact: round(outside_band_keep * n_outside) rows, chosen
by a seeded hash of prompt_id, so the same spec always keeps the same rows.

Mining decides over train and val only: the test split was drawn before the teacher
answered (engine.stages.split), and its rows pass through untouched, whatever their
confidence, so evaluation never sees rows the teacher's confidence chose.
"""

from __future__ import annotations

import polars as pl

from engine.stages.base import RunContext, Stage, dump, rejections, seeded_unit
from engine.stages.split import is_test


def in_band(mining) -> pl.Expr:
    """The rows whose confidence lies in mining.band (bounds included; a missing score is outside)."""
    lo, hi = mining.band
    return pl.col(f"conf_{mining.confidence}").is_between(lo, hi, closed="both").fill_null(False)


def cut_off(mining) -> pl.Expr:
    """With truncated: drop, the rows whose answer hit max_new_tokens (they go whatever their confidence)."""
    return (pl.col("finish_reason") == "length").fill_null(False) if mining.truncated == "drop" else pl.lit(False)


def surely_kept(mining) -> pl.Expr:
    """The train and val rows mining keeps whatever the other rows are: in band, and not cut off under
    truncated: drop. (outside_band_keep's share is drawn over all the rows outside the band, so whether
    one of those is kept depends on the others: teach.order: selection counts only these.)"""
    return in_band(mining) & ~cut_off(mining)


class Mine(Stage):
    name = "mine"
    order = 80
    top_up = "pool"

    def cache_slice(self, spec, store):
        return dump(spec.mining)

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        mining = ctx.spec.mining
        test = is_test(frame)
        untouched, frame = frame.filter(test), frame.filter(~test)
        cut = cut_off(mining)
        truncated, frame = frame.filter(cut), frame.filter(~cut)
        kept, dropped, stats = self._band(frame, mining)
        if truncated.height:
            limit = ctx.spec.teacher.generation.max_new_tokens
            cut_reason = f"answer cut off at max_new_tokens {limit} (mining.truncated: drop)"
            dropped = pl.concat([rejections(truncated, self.name, cut_reason), dropped])
        kept = pl.concat([kept, untouched], how="diagonal_relaxed").sort("prompt_id")
        stats = {**stats, "rows": stats["rows"] + truncated.height, "cut_off": truncated.height}
        if "split" in frame.columns:  # the rows have their split (in a run, always): say what test kept
            stats["test_untouched"] = untouched.height
        return kept, dropped, stats

    def _band(self, frame: pl.DataFrame, mining):
        lo, hi = mining.band
        column = f"conf_{mining.confidence}"
        score = pl.col(column)
        inside = frame.filter(in_band(mining))
        outside = frame.filter(~in_band(mining))
        draw = pl.Series([seeded_unit("mine", mining.seed, pid) for pid in outside["prompt_id"]], dtype=pl.Float64)
        n_keep = round(mining.outside_band_keep * outside.height)
        ranked = outside.with_columns(_draw=draw).sort("_draw", "prompt_id")
        kept_outside, dropped = ranked.head(n_keep).drop("_draw"), ranked.slice(n_keep).drop("_draw")
        kept = pl.concat([inside, kept_outside]).sort("prompt_id")
        reasons = dropped.select(
            pl.when(score.is_null())
            .then(pl.lit(f"{column} missing"))
            .otherwise(pl.format("{} {} outside band [{}, {}]", pl.lit(column), score.round(4), pl.lit(lo), pl.lit(hi)))
        ).to_series()
        stats = {"rows": frame.height, "in_band": inside.height, "outside_kept": kept_outside.height, "dropped": dropped.height}
        return kept, rejections(dropped, self.name, reasons), stats
