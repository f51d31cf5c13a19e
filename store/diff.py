"""Diff two versions by prompt_id: rows added, removed, and changed (same prompt_id, different content).

The diff is one SQL query over the versions' named views (`<dataset>_v<N>_examples`), so the
query `--sql` prints runs as is in `syllabus sql` and can be refined there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from .errors import StoreError
from .layout import KEY
from .sql import quote

# What makes a kept prompt "changed": the teacher's output, the gold label, where the row sits.
COMPARED = ("response", "answer", "label", "category", "split")
SHOWN = ("category", "split", "prompt")


@dataclass
class DiffResult:
    a: str
    b: str
    query: str
    totals: dict[str, int]
    counts: pl.DataFrame              # change, category, split, n
    samples: dict[str, pl.DataFrame] = field(default_factory=dict)


def diff_query(a_view: str, b_view: str, a_columns: list[str], b_columns: list[str],
               compared: tuple[str, ...] = COMPARED) -> str:
    both = [c for c in compared if c in a_columns and c in b_columns]
    shown = [c for c in SHOWN if c in a_columns or c in b_columns]
    changed = ", ".join(f"CASE WHEN a.{c} IS DISTINCT FROM b.{c} THEN '{c}' END" for c in both)
    differs = " OR ".join(f"a.{c} IS DISTINCT FROM b.{c}" for c in both) or "false"

    def pick(c):
        if c in a_columns and c in b_columns:
            return f"coalesce(b.{c}, a.{c}) AS {c}"
        return f"{'b' if c in b_columns else 'a'}.{c} AS {c}"

    sides = [f"a.{c} AS {c}_a, b.{c} AS {c}_b" for c in ("response", "label") if c in both]
    return "\n".join([
        "SELECT",
        "  CASE WHEN a.prompt_id IS NULL THEN 'added' WHEN b.prompt_id IS NULL THEN 'removed' ELSE 'changed' END AS change,",
        "  coalesce(b.prompt_id, a.prompt_id) AS prompt_id,",
        *(f"  {pick(c)}," for c in shown),
        f"  list_filter([{changed}], lambda x: x IS NOT NULL) AS what" + ("," if sides else "") if both
        else "  []::VARCHAR[] AS what" + ("," if sides else ""),
        *(f"  {s}{',' if i < len(sides) - 1 else ''}" for i, s in enumerate(sides)),
        f"FROM {quote(a_view)} a FULL OUTER JOIN {quote(b_view)} b ON a.prompt_id = b.prompt_id",
        f"WHERE a.prompt_id IS NULL OR b.prompt_id IS NULL OR {differs}",
    ])


def diff(store, a: str, b: str, *, table: str = "examples", sample: int = 5) -> DiffResult:
    va, vb = store.resolve(a), store.resolve(b)
    for v in (va, vb):
        if table not in v.segments:
            raise StoreError(f"{v.ref} has no table '{table}'")
    views = [f"{v.dataset}_v{v.version}_{table}" for v in (va, vb)]
    cols = [store.sql(f"DESCRIBE {quote(view)}")["column_name"].to_pylist() for view in views]
    for v, c in zip((va, vb), cols):
        if KEY not in c:
            raise StoreError(f"{v.ref}:{table} has no {KEY} column to match rows by")
    query = diff_query(views[0], views[1], cols[0], cols[1])
    group = [c for c in ("category", "split") if c in cols[0] or c in cols[1]]
    counts = pl.from_arrow(store.sql(
        f"SELECT change, {', '.join(group + [''])}count(*) AS n FROM ({query}) GROUP BY ALL ORDER BY ALL"))
    totals = {k: 0 for k in ("added", "removed", "changed")}
    for change, n in counts.group_by("change").agg(pl.col("n").sum()).iter_rows():
        totals[change] = int(n)
    samples = {}
    if sample > 0:
        rows = pl.from_arrow(store.sql(
            f"SELECT * FROM ({query}) QUALIFY row_number() OVER (PARTITION BY change ORDER BY prompt_id) <= {int(sample)}"
            " ORDER BY change, prompt_id"))
        for kind in ("added", "removed", "changed"):
            samples[kind] = rows.filter(pl.col("change") == kind).drop("change")
    return DiffResult(va.ref, vb.ref, query, totals, counts, samples)
