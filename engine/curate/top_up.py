"""`coverage.augment_until_quota`: make more variations for short categories, up to a cap.

After the stages have run, a category that falls short of its quota gets new variations
of its originals (engine.stages.augment.top_up). They pass through the stages that
declare `top_up = "new_rows"` (embed, dedup against everything already kept, teach,
confidence); then the stages that declare `top_up = "pool"` (mining, diversity,
selection, splits) run again over the whole pool. At most `coverage.augment_rounds`
rounds; each new teacher answer is cached like any other.
"""

from __future__ import annotations

import polars as pl

from engine.curate.curation import Curation
from engine.stages.augment import top_up

# Ask for more than the gap: some variations will be duplicates or fall outside the band.
OVERSHOOT = 2


def _pool_for(category: str, taught: pl.DataFrame, dropped: pl.DataFrame) -> pl.DataFrame:
    """The category's surviving originals, plus every variation made so far (for the cap)."""
    columns = ["prompt_id", "parent_id", "source", "category", "template_id", "origin", "prompt", "label"]
    kept = taught.filter(pl.col("category") == category).select(columns)
    made = (dropped.filter((pl.col("category") == category) & (pl.col("parent_id") != pl.col("prompt_id")))
            .with_columns(template_id=pl.lit(None, pl.String), origin=pl.lit("template")).select(columns))
    return pl.concat([kept, made], how="vertical_relaxed")


def _new_variations(cur: Curation, short: dict, taught: pl.DataFrame, rnd: int) -> pl.DataFrame | None:
    seen = set(taught["prompt_id"]) | set(cur.rejections()["prompt_id"])
    made = [top_up(_pool_for(cat, taught, cur.rejections()), cat, OVERSHOOT * info["short_by"], rnd, seen, cur.ctx)
            for cat, info in short.items()]
    made = [m for m in made if m.height]
    return pl.concat(made, how="vertical_relaxed") if made else None


def _through_new_row_stages(cur: Curation, batch: pl.DataFrame, taught: pl.DataFrame) -> pl.DataFrame:
    """A round's variations through each "new_rows" stage; each stage's drops join its rejections."""
    for stage in cur.stages(top_up="new_rows"):
        batch, dropped, _ = stage.run_new_rows(batch, taught, cur.ctx)
        if dropped.height:
            cur.reject(stage.name, dropped)
    return batch


def top_up_until_quota(cur: Curation) -> pl.DataFrame:
    spec = cur.ctx.spec
    grows = cur.stages(top_up="new_rows")[-1].name  # the pool: every row taught so far
    frame = cur.output(cur.stages()[-1].name)
    rounds = made_total = 0
    for rnd in range(1, spec.coverage.augment_rounds + 1):
        short = cur.stats["select"].get("shortfall") or {}
        if not short:
            break
        taught = cur.output(grows)
        new = _new_variations(cur, short, taught, rnd)
        if new is None:
            cur.console.print(f"[yellow]top-up[/] round {rnd}: no new variation is possible (cap or templates exhausted)")
            break
        rounds, made_total = rnd, made_total + new.height
        cur.console.print(f"[bold]top-up[/] round {rnd}: {new.height} new variations for {', '.join(short)}")
        frame = cur.grow(grows, _through_new_row_stages(cur, new, taught))
        for stage in cur.stages(top_up="pool"):
            frame = cur.redo(stage, frame)
    cur.stats["top_up"] = {"rounds": rounds, "variations": made_total,
                           "still_short": cur.stats["select"].get("shortfall") or {}}
    return frame
