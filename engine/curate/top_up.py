"""`coverage.augment_until_quota`: make more variations for short categories, up to a cap.

After the stages have run, a category that falls short of its quota gets new variations
of its originals (engine.stages.augment.top_up). They pass through the same stages as
every row — embed, dedup against everything already kept, teach, confidence — and then
mining, diversity, selection and splits run again over the whole pool. At most
`coverage.augment_rounds` rounds; each new teacher answer is cached like any other.
"""

from __future__ import annotations

import polars as pl

from engine.stages.augment import top_up
from engine.stages.base import no_rejections

# Ask for more than the gap: some variations will be duplicates or fall outside the band.
OVERSHOOT = 2

REDONE_STAGES = ("mine", "diversity", "select", "split")


def _stage(cur, name):
    return next((stage for stage, _ in cur.keyed if stage.name == name), None)


def _pool_for(category: str, taught: pl.DataFrame, dropped: pl.DataFrame) -> pl.DataFrame:
    """The category's surviving originals, plus every variation made so far (for the cap)."""
    columns = ["prompt_id", "parent_id", "source", "category", "template_id", "origin", "prompt", "label"]
    kept = taught.filter(pl.col("category") == category).select(columns)
    made = (dropped.filter((pl.col("category") == category) & (pl.col("parent_id") != pl.col("prompt_id")))
            .with_columns(template_id=pl.lit(None, pl.String), origin=pl.lit("template")).select(columns))
    return pl.concat([kept, made], how="vertical_relaxed")


def _teach_new_rows(cur, new: pl.DataFrame, taught: pl.DataFrame) -> pl.DataFrame:
    """New rows through embed → dedup (against every kept row) → teach → confidence."""
    from engine.curate.pipeline import run_stage

    ctx, batch = cur.ctx, new
    if (embed := _stage(cur, "embed")) is not None:
        batch, _, _ = run_stage(embed, batch, ctx)
    if (dedup := _stage(cur, "dedup")) is not None:
        # Kept rows come first, so a new row that repeats one of them is the one dropped.
        pool = pl.concat([taught.select(batch.columns), batch], how="vertical_relaxed")
        survivors, dropped, _ = run_stage(dedup, pool, ctx)
        batch = batch.filter(pl.col("prompt_id").is_in(survivors["prompt_id"].implode()))
        cur.records["dedup"] = pl.concat([cur.records["dedup"], dropped], how="diagonal_relaxed")
    for name in ("teach", "confidence"):
        batch, _, _ = run_stage(_stage(cur, name), batch, ctx)
    return batch


def top_up_until_quota(cur) -> pl.DataFrame:
    spec, ctx = cur.ctx.spec, cur.ctx
    frame = cur.output("split")
    rounds = made_total = 0
    for rnd in range(1, spec.coverage.augment_rounds + 1):
        short = cur.stats["select"].get("shortfall") or {}
        if not short:
            break
        taught = cur.output("confidence")
        seen = set(taught["prompt_id"]) | set(cur.rejections()["prompt_id"])
        new = [top_up(_pool_for(cat, taught, cur.rejections()), cat, OVERSHOOT * info["short_by"], rnd, seen, ctx)
               for cat, info in short.items()]
        new = pl.concat([n for n in new if n.height], how="vertical_relaxed") if any(n.height for n in new) else None
        if new is None:
            cur.console.print(f"[yellow]top-up[/] round {rnd}: no new variation is possible (cap or templates exhausted)")
            break
        rounds, made_total = rnd, made_total + new.height
        cur.console.print(f"[bold]top-up[/] round {rnd}: {new.height} new variations for {', '.join(short)}")
        cur.outputs["confidence"] = taught = pl.concat([taught, _teach_new_rows(cur, new, taught)], how="diagonal_relaxed")
        frame = taught
        for name in REDONE_STAGES:
            if (stage := _stage(cur, name)) is not None:
                frame, dropped, stats = _redo(cur, stage, frame)
    cur.stats["top_up"] = {"rounds": rounds, "variations": made_total,
                           "still_short": cur.stats["select"].get("shortfall") or {}}
    return frame


def _redo(cur, stage, frame):
    from engine.curate.pipeline import run_stage

    cur.records[stage.name] = no_rejections()  # its earlier drops are decided afresh
    cur.ctx.rejected = list(cur.records.values())
    out, dropped, stats = run_stage(stage, frame, cur.ctx)
    cur.record(stage.name, out, dropped, stats)
    return out, dropped, stats
