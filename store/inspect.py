"""What `syllabus show NAME@V` prints: counts per category and split, a confidence histogram,
rejections per stage and reason, the full lineage, files and what they share with the parent."""

from __future__ import annotations

import re

from dataclasses import dataclass, field

import polars as pl

from .catalog import VersionInfo
from .sql import quote

PROBABILITY = ("mean_token_prob", "min_token_prob", "answer_prob", "margin", "self_consistency")  # in [0, 1]


@dataclass
class Summary:
    info: VersionInfo
    by_category_split: pl.DataFrame | None
    measure: str | None
    histogram: list[tuple[float, float, int]] = field(default_factory=list)
    rejections: pl.DataFrame | None = None
    cut_off: pl.DataFrame | None = None  # per category: answers that hit max_new_tokens (finish_reason "length")
    files: dict[str, dict] = field(default_factory=dict)   # table -> files, bytes, shared files/bytes
    models: list[dict] = field(default_factory=list)
    test_split: str | None = None  # how the test split was drawn, from the version's stage stats


def describe_test_split(stats: dict) -> str | None:
    """How a version's test split was drawn, said from its lineage stats (None: no split stage ran).

    A split stage that records `drawn_by` drew the split before the teacher answered; the
    stages that record `test_untouched` passed the test rows through without deciding on them.
    """
    split = stats.get("split") if isinstance(stats, dict) else None
    if not isinstance(split, dict):
        return None
    drawn_by = split.get("drawn_by")
    if not drawn_by:
        return ("test split: drawn last, from the rows every earlier stage kept (mining and selection included), "
                "so the teacher's confidence chose them")
    untouched = sorted(name for name, st in stats.items() if isinstance(st, dict) and "test_untouched" in st)
    passed = f"; {', '.join(untouched)} passed its rows through untouched" if untouched else ""
    return f"test split: drawn by {drawn_by} before the teacher answered{passed} (never filtered by the teacher's confidence)"


def summary(store, ref: str, measure: str | None = None, bins: int = 10) -> Summary:
    info = store.resolve(ref)
    at = info.ref
    cols = {t: store.sql(f"DESCRIBE {quote(t)}", at=at)["column_name"].to_pylist() for t in info.segments}
    ex = cols.get("examples", [])
    group = [c for c in ("category", "split") if c in ex]
    by = None
    if group:
        by = pl.from_arrow(store.sql(f"SELECT {', '.join(group)}, count(*) AS n FROM examples GROUP BY ALL ORDER BY ALL", at=at))
    column = _measure_column(ex, measure)
    out = Summary(info, by, column)
    out.test_split = describe_test_split(info.stats)
    if column:
        name = column.removeprefix("conf_")
        if name in PROBABILITY:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = store.sql(f"SELECT min({column}) AS lo, max({column}) AS hi FROM examples", at=at).to_pylist()[0].values()
        if lo is not None:
            hi = hi if hi > lo else lo + 1.0
            width = (hi - lo) / bins
            hist = store.sql(
                f"SELECT least(floor(({column} - {lo}) / {width}), {bins - 1})::INT AS b, count(*) AS n FROM examples"
                f" WHERE {column} IS NOT NULL GROUP BY b", at=at).to_pydict()
            counts = dict(zip(hist["b"], hist["n"]))
            out.histogram = [(lo + i * width, lo + (i + 1) * width, int(counts.get(i, 0))) for i in range(bins)]
    if "finish_reason" in ex:
        out.cut_off = cut_off_shares(pl.from_arrow(store.sql(
            f"SELECT {'category' if 'category' in ex else 'NULL AS category'}, finish_reason FROM examples", at=at)))
    rej = cols.get("rejections", [])
    if "stage" in rej:
        # Reasons carry numbers and ids ("cos 0.953", "keeps 30 of 68"): count them by kind, with an example.
        pattern = REASON_DETAIL.replace("'", "''")  # as a SQL string literal
        kind = f"regexp_replace(reason, '{pattern}', '…', 'g')" if "reason" in rej else "NULL"
        example = "any_value(reason) AS example, " if "reason" in rej else ""
        out.rejections = pl.from_arrow(store.sql(
            f"SELECT stage, {kind} AS reason, {example}count(*) AS n FROM rejections"
            f" GROUP BY ALL ORDER BY n DESC, stage, reason", at=at))
    parent = store.catalog.versions(info.dataset, info.parent)[0] if info.parent else None
    for table, segs in info.segments.items():
        mine = {s.sha256 for s in segs}
        theirs = {s.sha256 for s in parent.segments.get(table, [])} if parent else set()
        out.files[table] = {
            "files": len(segs), "bytes": sum(s.bytes for s in segs),
            "shared_files": len(mine & theirs), "shared_bytes": sum(s.bytes for s in segs if s.sha256 in theirs),
            "rows": info.row_counts.get(table, 0),
        }
    out.models = store.models(info.dataset, info.version)
    return out


# A share of cut-off answers above this is worth a warning: students learn to stop mid-sentence.
CUT_OFF_WARN = 0.05


def cut_off_shares(frame: pl.DataFrame) -> pl.DataFrame:
    """Per category (and `all`): examples, answers cut off at max_new_tokens, and their share."""
    rows = frame.select(category=pl.col("category").fill_null("(none)"), cut=pl.col("finish_reason") == "length")
    per = rows.group_by("category").agg(examples=pl.len(), cut_off=pl.col("cut").sum()).sort("category")
    total = pl.DataFrame({"category": ["all"], "examples": [rows.height], "cut_off": [int(rows["cut"].sum())]})
    both = pl.concat([per, total], how="vertical_relaxed")
    return both.with_columns(share=(pl.col("cut_off") / pl.col("examples")).fill_nan(0.0).round(3))


# The numbers, long hex ids and quoted names inside a rejection reason (RE2 and Python alike).
REASON_DETAIL = r"\b[0-9a-f]{8,}\b|[-+]?\d+(?:\.\d+)?(?:e-?\d+)?|'[^']*'"
_REASON_DETAIL = re.compile(REASON_DETAIL)


def reason_kind(reason: str) -> str:
    """A reason without its details, so that drops of one kind count together."""
    return " ".join(_REASON_DETAIL.sub("…", reason).split())


def _measure_column(columns: list[str], measure: str | None) -> str | None:
    for name in ([measure] if measure else []) + ["mean_token_prob"]:
        column = name if name.startswith("conf_") else f"conf_{name}"
        if column in columns:
            return column
    found = [c for c in columns if c.startswith("conf_")]
    return found[0] if found else None
