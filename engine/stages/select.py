"""Select: enforce the coverage quotas on the final dataset, evenly across diversity clusters.

Runs after dedup and mining, so a quota counts rows that will really be trained on. A
category with more rows than its quota keeps them by round robin over its clusters
(seeded order inside each cluster), so no one cluster crowds out the others. A category
with fewer rows than its target or min is reported with the main reason (too few from
the sources, too many duplicates, too few in the mining band), computed from the
rejections of the stages before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

import polars as pl

from engine.stages.base import REJECTION_SCHEMA, RunContext, Stage, dump, rejections, seeded_unit
from engine.stages.split import is_test

# Stages whose drops happen before a category's rows are counted as made (sources/augment),
# that are this one, or that only keep top-up rows out of the test split: not losses a
# shortfall can blame.
NOT_LOSSES = {"sources", "assign", "augment", "select", "split"}
LOSS_NAMES = {"dedup": "too many duplicates", "mine": "too few in band"}


@dataclass(frozen=True)
class Quota:
    keep: int | None  # at most this many rows are kept; None: all
    target: int | None  # fewer rows than this is a shortfall; None: never short


def round_half_up(x: Decimal) -> int:
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def quota(category, total: int | None) -> Quota:
    """A share aims at round(share * total) (half up), clamped to [min, max]; else keep up to max, want min."""
    if category.share is not None:
        target = round_half_up(Decimal(str(category.share)) * total)
        if category.min is not None:
            target = max(target, category.min)
        if category.max is not None:
            target = min(target, category.max)
        return Quota(keep=target, target=target)
    return Quota(keep=category.max, target=category.min)


def quotas(coverage) -> dict[str, Quota]:
    return {name: quota(c, coverage.total) for name, c in coverage.categories.items()}


def round_robin(ids: list[str], clusters: list[int | None], keep: int, seed: int) -> list[int]:
    """Positions of the `keep` rows picked: one per cluster per turn, clusters by id (no cluster
    last), rows in a seeded order inside each cluster."""
    members: dict[int | None, list[int]] = {}
    for i, c in enumerate(clusters):
        members.setdefault(c, []).append(i)
    order = sorted(members, key=lambda c: (c is None, c or 0))
    queues = [sorted(members[c], key=lambda i: (seeded_unit("select", seed, ids[i]), ids[i])) for c in order]
    picked: list[int] = []
    turn = 0
    while len(picked) < keep:
        live = [q for q in queues if turn < len(q)]
        if not live:
            break
        picked.extend(q[turn] for q in live[: keep - len(picked)])
        turn += 1
    return picked


def downstream_losses(rejected: pl.DataFrame | list[pl.DataFrame]) -> dict[str, dict[str, int]]:
    """{category: {stage: rows dropped}} for the stages after augmentation (each row counted once)."""
    if isinstance(rejected, list):
        rejected = pl.concat(rejected, how="vertical_relaxed") if rejected else pl.DataFrame(schema=REJECTION_SCHEMA)
    lost = (rejected.filter(~pl.col("stage").is_in(list(NOT_LOSSES)) & pl.col("category").is_not_null())
            .unique(subset=["prompt_id", "stage"], keep="first", maintain_order=True)
            .group_by("category", "stage", maintain_order=True).len())
    out: dict[str, dict[str, int]] = {}
    for category, stage, n in lost.iter_rows():
        out.setdefault(category, {})[stage] = n
    return out


def why_short(target: int, have: int, lost: dict[str, int]) -> str:
    """The largest of: the gap left by the sources themselves, and each stage's drops."""
    made = have + sum(lost.values())
    others = sorted(stage for stage in lost if stage not in LOSS_NAMES)
    causes = {"sources": max(0, target - made), **{s: lost.get(s, 0) for s in (*LOSS_NAMES, *others)}}
    cause = max(causes, key=causes.get)  # the first of equals: sources, then dedup, then mine
    if cause == "sources":
        return f"too few from sources: {made} made by sources and augmentation for a target of {target}"
    if cause in LOSS_NAMES:
        return f"{LOSS_NAMES[cause]}: {cause} dropped {causes[cause]} of {made}"
    return f"dropped by {cause}: {causes[cause]} of {made}"


def shortfalls(frame: pl.DataFrame, coverage, rejected: pl.DataFrame | list[pl.DataFrame]) -> dict[str, dict]:
    """{category: {target, have, short_by, why}} for each category with fewer rows than its target or min.

    frame: the rows selection chooses from (after dedup and mining); rejected: the rejections
    so far (ctx.rejected). A category's rows made by sources and augmentation are counted as
    the rows it has plus those the later stages dropped. Test rows count for nothing: quotas
    are on train and val.
    """
    frame = frame.filter(~is_test(frame))
    counts = dict(frame.filter(pl.col("category").is_not_null()).group_by("category").len().iter_rows())
    losses = downstream_losses(rejected)
    out = {}
    for name, q in quotas(coverage).items():
        have = counts.get(name, 0)
        if q.target is None or have >= q.target:
            continue
        out[name] = {"target": q.target, "have": have, "short_by": q.target - have,
                     "why": why_short(q.target, have, losses.get(name, {}))}
    return out


class Select(Stage):
    """Keep each category's quota of rows, round robin across clusters; report shortfalls."""

    name = "select"
    order = 100
    top_up = "pool"

    @classmethod
    def wanted(cls, spec) -> bool:
        return spec.coverage is not None

    def cache_slice(self, spec, store):
        return [dump(spec.coverage), dump(spec.diversity)]

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        coverage = ctx.spec.coverage
        diversity = getattr(ctx.spec, "diversity", None)
        seed = diversity.seed if diversity else 0
        everything = frame.with_row_index("_row")
        test = is_test(frame)
        untouched = everything.filter(test)["_row"].to_list()  # test rows: not for quotas to decide
        rows = everything.filter(~test)
        known = pl.col("category").is_in(list(coverage.categories))
        unknown = rows.filter(~known | pl.col("category").is_null())
        reasons = [f"category {c!r} is not in coverage.categories" if c is not None else "no category"
                   for c in unknown["category"]]

        keep_rows: list[int] = []
        per_category = {}
        over = []
        for name, q in quotas(coverage).items():
            members = rows.filter(pl.col("category") == name)
            if q.keep is None or members.height <= q.keep:
                picked = members["_row"].to_list()
            else:
                clusters = members["cluster"].to_list() if "cluster" in members.columns else [0] * members.height
                positions = round_robin(members["prompt_id"].to_list(), clusters, q.keep, seed)
                picked = members["_row"].gather(positions).to_list()
                dropped = members.filter(~pl.col("_row").is_in(picked))
                over.append((dropped, f"over quota: category {name!r} keeps {q.keep} of {members.height}"))
            keep_rows.extend(picked)
            per_category[name] = {"quota": q.keep, "have": members.height, "kept": len(picked)}

        kept = everything.filter(pl.col("_row").is_in(keep_rows + untouched)).drop("_row")
        dropped = pl.concat([unknown.drop("_row").with_columns(_reason=pl.Series(reasons, dtype=pl.String))]
                            + [d.drop("_row").with_columns(_reason=pl.lit(r)) for d, r in over])
        stats = {
            "rows": rows.height,
            "kept": kept.height - len(untouched),
            "over_quota": sum(d.height for d, _ in over),
            "unknown_category": unknown.height,
            "categories": per_category,
            "shortfall": shortfalls(rows, coverage, ctx.rejected),
        }
        if "split" in frame.columns:  # the rows have their split (in a run, always): say what test kept
            stats["test_untouched"] = len(untouched)
        return kept, rejections(dropped.drop("_reason"), self.name, dropped["_reason"]), stats
