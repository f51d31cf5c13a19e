"""Select: quota arithmetic, round robin across clusters, and shortfalls that name their reason."""

import polars as pl
import pytest

from engine.spec import Category, Coverage, Diversity
from engine.stages.base import REJECTION_SCHEMA, RunContext, rejections
from engine.stages.select import Quota, Select, quota, round_robin, shortfalls


class FakeSpec:
    def __init__(self, **parts):
        self.__dict__.update(parts)


def context(coverage: dict, seed: int | None = None, rejected=()) -> RunContext:
    spec = FakeSpec(coverage=Coverage(**coverage), diversity=Diversity(seed=seed) if seed is not None else None)
    return RunContext(spec=spec, cache_dir=None, progress=False, rejected=list(rejected))


def rows(ids, categories, clusters=None) -> pl.DataFrame:
    data = {"prompt_id": ids, "parent_id": ids, "category": categories, "prompt": [f"text {i}" for i in ids]}
    if clusters is not None:
        data["cluster"] = pl.Series(clusters, dtype=pl.Int32)
    return pl.DataFrame(data, schema_overrides={"category": pl.String})


# --- quota arithmetic ---------------------------------------------------------------

@pytest.mark.parametrize("category, total, expected", [
    ({"share": 0.5}, 10, Quota(5, 5)),
    ({"share": 0.25}, 10, Quota(3, 3)),  # 2.5 rounds half up
    ({"share": 0.45}, 10, Quota(5, 5)),  # 4.5 -> 5 (no float drift: 0.45 * 10 is taken exactly)
    ({"share": 0.1}, 30, Quota(3, 3)),
    ({"share": 0.2}, 12, Quota(2, 2)),  # 2.4 -> 2
    ({"share": 0.5, "min": 8}, 10, Quota(8, 8)),  # clamped up to min
    ({"share": 0.5, "max": 3}, 10, Quota(3, 3)),  # clamped down to max
    ({"share": 0.5, "min": 2, "max": 9}, 10, Quota(5, 5)),  # inside the clamp
    ({"min": 2, "max": 5}, None, Quota(5, 2)),  # keep up to max, short below min
    ({"max": 5}, 100, Quota(5, None)),
    ({"min": 4}, None, Quota(None, 4)),
    ({}, None, Quota(None, None)),
])
def test_quota_arithmetic(category, total, expected):
    assert quota(Category(**category), total) == expected


# --- round robin ----------------------------------------------------------------------

# Cluster ids are not in order of appearance; n1 has no cluster. Seeded orders inside the
# clusters (seed 7): cluster 0 [b1], cluster 1 [c1, c2, c3], cluster 2 [a2, a3, a4, a1], none [n1].
IDS = ["a1", "a2", "a3", "a4", "b1", "c1", "c2", "c3", "n1"]
CLUSTERS = [2, 2, 2, 2, 0, 1, 1, 1, None]


@pytest.mark.parametrize("keep, seed, expected", [
    (3, 7, ["b1", "c1", "a2"]),
    (6, 7, ["b1", "c1", "a2", "n1", "c2", "a3"]),
    (6, 0, ["b1", "c1", "a4", "n1", "c3", "a1"]),  # seed 0: cluster 1 [c1, c3, c2], cluster 2 [a4, a1, a3, a2]
    (9, 7, ["b1", "c1", "a2", "n1", "c2", "a3", "c3", "a4", "a1"]),
    (20, 7, ["b1", "c1", "a2", "n1", "c2", "a3", "c3", "a4", "a1"]),
])
def test_round_robin_order(keep, seed, expected):
    assert [IDS[i] for i in round_robin(IDS, CLUSTERS, keep, seed)] == expected


def test_round_robin_without_clusters_is_the_seeded_order():
    assert [IDS[i] for i in round_robin(IDS[:8], [0] * 8, 4, 0)] == ["a4", "a1", "c1", "c3"]


def test_select_keeps_the_quota_across_clusters_and_rejects_the_rest():
    frame = rows(IDS + ["y1", "y2"], ["x"] * 9 + ["y", "zzz"], CLUSTERS + [0, 0])
    cov = {"total": 12, "categories": {"x": {"share": 0.5}, "y": {"min": 1}}}
    kept, rejected, stats = Select().run(frame, context(cov, seed=7))
    assert kept["prompt_id"].to_list() == ["a2", "a3", "b1", "c1", "c2", "n1", "y1"]  # frame order
    assert kept.columns == frame.columns
    assert rejected.schema == pl.Schema(REJECTION_SCHEMA)
    assert list(zip(rejected["prompt_id"], rejected["stage"], rejected["reason"])) == [
        ("y2", "select", "category 'zzz' is not in coverage.categories"),
        ("a1", "select", "over quota: category 'x' keeps 6 of 9"),
        ("a4", "select", "over quota: category 'x' keeps 6 of 9"),
        ("c3", "select", "over quota: category 'x' keeps 6 of 9"),
    ]
    assert stats == {
        "rows": 11, "kept": 7, "over_quota": 3, "unknown_category": 1,
        "categories": {"x": {"quota": 6, "have": 9, "kept": 6}, "y": {"quota": None, "have": 1, "kept": 1}},
        "shortfall": {},
    }


def test_select_without_cluster_column_and_without_diversity_uses_seed_0():
    frame = rows(IDS[:8], ["x"] * 8)
    kept, _, stats = Select().run(frame, context({"categories": {"x": {"max": 4}}}))
    assert sorted(kept["prompt_id"]) == sorted(["a4", "a1", "c1", "c3"])
    assert stats["categories"]["x"] == {"quota": 4, "have": 8, "kept": 4}


def test_null_category_is_rejected():
    kept, rejected, _ = Select().run(rows(["p"], [None]), context({"categories": {"x": {}}}))
    assert kept.height == 0 and rejected["reason"].to_list() == ["no category"]


# --- shortfalls -------------------------------------------------------------------------

def dropped(stage, category, n, start=0):
    frame = rows([f"{stage}{category}{i}" for i in range(start, start + n)], [category] * n)
    return rejections(frame, stage, "some reason")


SHORT_COVERAGE = {"total": 100, "categories": {
    "few": {"share": 0.2},  # 20 wanted; sourced 8; lost 2 to dedup: sources are the cause
    "dupes": {"share": 0.2},  # 20 wanted; sourced 40, dedup dropped 25, mine 5
    "band": {"share": 0.2},  # 20 wanted; sourced 30, dedup 3, mine dropped 15
    "fine": {"share": 0.2},  # 20 wanted, 25 here: no shortfall
    "floor": {"min": 10},  # no share: short below min
}}


def test_shortfalls_name_the_dominant_loss():
    frame = rows([f"f{i}" for i in range(6)] + [f"d{i}" for i in range(10)] + [f"b{i}" for i in range(12)]
                 + [f"ok{i}" for i in range(25)] + ["m0"],
                 ["few"] * 6 + ["dupes"] * 10 + ["band"] * 12 + ["fine"] * 25 + ["floor"])
    rejected = [
        dropped("sources", "few", 50),  # before the category's rows were made: not a loss
        dropped("assign", "few", 50),
        dropped("dedup", "few", 2),
        dropped("dedup", "dupes", 25), dropped("mine", "dupes", 5),
        dropped("dedup", "band", 3), dropped("mine", "band", 15),
        dropped("mine", "band", 15),  # the same rows reported twice (a re-run stage) count once
        dropped("select", "fine", 40),
    ]
    got = shortfalls(frame, Coverage(**SHORT_COVERAGE), rejected)
    assert got == {
        "few": {"target": 20, "have": 6, "short_by": 14,
                "why": "too few from sources: 8 made by sources and augmentation for a target of 20"},
        "dupes": {"target": 20, "have": 10, "short_by": 10, "why": "too many duplicates: dedup dropped 25 of 40"},
        "band": {"target": 20, "have": 12, "short_by": 8, "why": "too few in band: mine dropped 15 of 30"},
        "floor": {"target": 10, "have": 1, "short_by": 9,
                  "why": "too few from sources: 1 made by sources and augmentation for a target of 10"},
    }


def test_shortfall_ties_prefer_sources_then_dedup_and_other_stages_are_named():
    frame = rows(["a", "b"], ["x", "y"])
    cov = Coverage(categories={"x": {"min": 5}, "y": {"min": 5}})
    rejected = pl.concat([dropped("dedup", "x", 3), dropped("mine", "x", 3),  # sources gap 0, 3 vs 3: dedup
                          dropped("teach", "y", 7)])
    got = shortfalls(frame, cov, rejected)
    assert got["x"]["why"] == "too many duplicates: dedup dropped 3 of 7"
    assert got["y"]["why"] == "dropped by teach: 7 of 8"
    equal = shortfalls(rows(["a"], ["x"]), cov, [dropped("dedup", "x", 2)])  # gap 2 = dedup 2
    assert equal["x"]["why"].startswith("too few from sources")


def test_select_reports_shortfall_from_the_context_rejections():
    frame = rows(["a", "b"], ["x", "x"])
    ctx = context({"total": 10, "categories": {"x": {"share": 0.5}}}, rejected=[dropped("mine", "x", 4)])
    kept, rejected, stats = Select().run(frame, ctx)
    assert kept.height == 2 and rejected.height == 0
    assert stats["shortfall"] == {
        "x": {"target": 5, "have": 2, "short_by": 3, "why": "too few in band: mine dropped 4 of 6"}}
    assert shortfalls(frame, ctx.spec.coverage, []) == {
        "x": {"target": 5, "have": 2, "short_by": 3,
              "why": "too few from sources: 2 made by sources and augmentation for a target of 5"}}
