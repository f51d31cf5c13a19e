"""Mine: keep the rows whose confidence lies in the band, plus a seeded share of the rest.

The share outside the band is exact: round(outside_band_keep * n_outside) rows, chosen
by a seeded hash of prompt_id, so the same spec always keeps the same rows.
"""

from __future__ import annotations

import polars as pl

from engine.stages.base import RunContext, rejections, seeded_unit


class Mine:
    name = "mine"

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        mining = ctx.spec.mining
        lo, hi = mining.band
        column = f"conf_{mining.confidence}"
        score = pl.col(column)
        in_band = frame.filter(score.is_between(lo, hi, closed="both").fill_null(False))
        outside = frame.filter(~score.is_between(lo, hi, closed="both").fill_null(False))
        draw = pl.Series([seeded_unit("mine", mining.seed, pid) for pid in outside["prompt_id"]], dtype=pl.Float64)
        n_keep = round(mining.outside_band_keep * outside.height)
        ranked = outside.with_columns(_draw=draw).sort("_draw", "prompt_id")
        kept_outside, dropped = ranked.head(n_keep).drop("_draw"), ranked.slice(n_keep).drop("_draw")
        kept = pl.concat([in_band, kept_outside]).sort("prompt_id")
        reasons = dropped.select(
            pl.when(score.is_null())
            .then(pl.lit(f"{column} missing"))
            .otherwise(pl.format("{} {} outside band [{}, {}]", pl.lit(column), score.round(4), pl.lit(lo), pl.lit(hi)))
        ).to_series()
        stats = {"rows": frame.height, "in_band": in_band.height, "outside_kept": kept_outside.height, "dropped": dropped.height}
        return kept, rejections(dropped, self.name, reasons), stats
