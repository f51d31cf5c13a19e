"""What `syllabus show NAME@V` prints: counts per category and split, a confidence histogram,
rejections per stage and reason, the full lineage, files and what they share with the parent."""

from __future__ import annotations

import re

from dataclasses import dataclass, field

import polars as pl

from .catalog import VersionInfo
from .sql import quote

PROBABILITY = ("mean_token_prob", "min_token_prob", "answer_prob", "margin")  # measures in [0, 1]


@dataclass
class Summary:
    info: VersionInfo
    by_category_split: pl.DataFrame | None
    measure: str | None
    histogram: list[tuple[float, float, int]] = field(default_factory=list)
    rejections: pl.DataFrame | None = None
    files: dict[str, dict] = field(default_factory=dict)   # table -> files, bytes, shared files/bytes
    models: list[dict] = field(default_factory=list)


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
