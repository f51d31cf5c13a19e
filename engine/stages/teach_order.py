"""`teach: {order: selection}`: ask the teacher only for the rows selection can keep.

With `order: all` (the default) every row that survives dedup is taught, and selection then throws
the surplus of a capped category away. With `order: selection` (the spec must have coverage):

- the test split (drawn before teaching, never filtered by the teacher) and the train and val rows
  of categories without a cap are asked in full;
- train and val rows of a category coverage does not name are not asked: selection drops them;
- the train and val rows of a capped category are asked in the order selection keeps rows
  (engine.stages.select.round_robin over the diversity clusters, with selection's seed), in
  rounds: each round asks every category not yet full for as many more rows as its quota still
  lacks, all categories' rows batched together (teacher.batch_size). After each round the answers
  are scored as the confidence stage scores them, and those mining keeps whatever else is taught
  (engine.stages.mine.surely_kept: in band, not cut off) count towards the quota. A category is
  full once they fill it, or when it has no row left.

A row's verdict depends on its own answer only, so it is the same whether it is asked early or
late, and a category ends with at least its quota of rows mining keeps: selection keeps exactly
the quota, as with order: all. Rows mining keeps outside the band (outside_band_keep) do not
count: that share is drawn over all the rows outside the band, so whether one is kept depends on
rows not asked yet. Rows never asked go to rejections with the reason. Every answered batch is
cached as it comes, so an interrupted run replays its rounds from the cache and pays nothing twice.
"""

from __future__ import annotations

import polars as pl

from engine.stages.base import RunContext, no_rejections, rejections
from engine.stages.confidence import Confidence
from engine.stages.mine import surely_kept
from engine.stages.select import quotas, round_robin
from engine.stages.split import is_test

ORDER_NOTE = "(teach.order: selection)"


def partition(frame: pl.DataFrame, spec) -> tuple[list[int], dict[str, list[int]], dict[str, int], list[tuple[int, str]]]:
    """Rows by how ordered teaching treats them: (asked in full, {category: its rows} for capped
    categories, {category: its quota}, [(row, reason)] never asked). Positions are row indices."""
    caps = {name: q.keep for name, q in quotas(spec.coverage).items()}
    test = is_test(frame).to_list()
    categories = frame["category"].to_list() if "category" in frame.columns else [None] * frame.height
    always, capped, unknown = [], {}, []
    for row, (in_test, category) in enumerate(zip(test, categories)):
        if in_test or (category in caps and caps[category] is None):
            always.append(row)
        elif category in caps:
            capped.setdefault(category, []).append(row)
        else:
            what = "no category" if category is None else f"category {category!r} is not in coverage.categories"
            unknown.append((row, f"not taught: {what}, so selection would drop it {ORDER_NOTE}"))
    return always, capped, {name: caps[name] for name in capped}, unknown


def call_bounds(frame: pl.DataFrame, keys: list[str | None], cached: set[str], spec) -> tuple[int, int, int]:
    """For `plan`: (prompts ordered teaching may ask, calls at most, calls at best) over the teach
    stage's input; keys[i]: row i's request key (None: it cannot render), cached: keys answered.
    At best every answer is in band: a capped category asks its quota and no more (an estimate)."""
    always, capped, keeps, _ = partition(frame, spec)

    def fresh(rows: list[int]) -> set[str]:
        return {keys[r] for r in rows if keys[r] is not None} - cached

    asked = always + [r for rows in capped.values() for r in rows]
    prompts = len({keys[r] for r in asked if keys[r] is not None})
    best = len(fresh(always))
    for name, rows in capped.items():
        rows = [r for r in rows if keys[r] is not None]
        answered = len({keys[r] for r in rows} & cached)
        best += max(0, min(keeps[name], len(rows)) - answered)  # an interrupted run asked its first rows
    return prompts, len(fresh(asked)), min(best, len(fresh(asked)))


def in_selection_order(frame: pl.DataFrame, spec) -> tuple[list[int], dict[str, list[int]], dict[str, int], list]:
    """partition(), each capped category's rows in the order selection would keep them."""
    always, capped, keeps, unknown = partition(frame, spec)
    seed = spec.diversity.seed if getattr(spec, "diversity", None) else 0
    ids = frame["prompt_id"].to_list()
    clusters = frame["cluster"].to_list() if "cluster" in frame.columns else [0] * frame.height
    queues = {}
    for name, rows in capped.items():
        order = round_robin([ids[r] for r in rows], [clusters[r] for r in rows], len(rows), seed)
        queues[name] = [rows[p] for p in order]
    return always, queues, keeps, unknown


def ask_in_selection_order(frame: pl.DataFrame, prompts: list, ctx: RunContext):
    """Ask the teacher round by round until each capped category's quota is filled by answers mining keeps.

    frame and prompts: the rows that render, one prompt each. Returns (rows asked, in frame order;
    their prompts; their outputs; new teacher calls; rows not asked, as rejections; stats).
    """
    from engine.stages.teach import ask_teacher

    spec = ctx.spec
    always, queues, keeps, unknown = in_selection_order(frame, spec)
    category_of = {r: name for name, queue in queues.items() for r in queue}
    kept = dict.fromkeys(queues, 0)  # answers mining keeps whatever else is taught, per category
    asked = {name: min(keeps[name], len(queue)) for name, queue in queues.items()}  # of its queue, so far
    todo = always + [r for name, queue in queues.items() for r in queue[: asked[name]]]
    answers: dict[int, object] = {}
    calls = rounds = 0
    while todo:
        rounds += 1
        outputs, new = ask_teacher(ctx, [prompts[r] for r in todo], "teach" if rounds == 1 else f"teach, round {rounds}")
        calls += new
        answers.update(zip(todo, outputs))
        counted = [r for r in todo if r in category_of]
        for r, keep in zip(counted, _surely_kept(frame, prompts, counted, [answers[r] for r in counted], ctx)):
            kept[category_of[r]] += keep
        todo = []
        for name, queue in queues.items():
            more = queue[asked[name] : asked[name] + max(0, keeps[name] - kept[name])]
            todo += more
            asked[name] += len(more)

    taught = sorted(answers)
    skipped = sorted([(r, f"not taught: category {name!r} quota of {keeps[name]} filled by in-band answers {ORDER_NOTE}")
                      for name, queue in queues.items() for r in queue[asked[name]:]] + unknown)
    dropped = (rejections(_rows(frame, [r for r, _ in skipped]), "teach",
                          pl.Series([why for _, why in skipped], dtype=pl.String)) if skipped else no_rejections())
    stats = {"order": "selection", "rounds": rounds, "not_taught": len(skipped),
             "quotas": {name: {"quota": keeps[name], "rows": len(queue), "taught": asked[name], "in_band": kept[name]}
                        for name, queue in queues.items()}}
    return _rows(frame, taught), [prompts[r] for r in taught], [answers[r] for r in taught], calls, dropped, stats


def _rows(frame: pl.DataFrame, rows: list[int]) -> pl.DataFrame:
    return frame.select(pl.all().gather(rows)) if rows else frame.clear()


def _surely_kept(frame: pl.DataFrame, prompts: list, rows: list[int], outputs: list, ctx: RunContext) -> list[bool]:
    """For each of `rows` (just answered): whether mining keeps it whatever else is taught."""
    from engine.stages.teach import Teach

    if not rows:
        return []
    answered = Teach._attach(_rows(frame, rows), [prompts[r] for r in rows], outputs, ctx.spec)
    scored, _, _ = Confidence().run(answered, ctx)
    return scored.select(surely_kept(ctx.spec.mining)).to_series().to_list()
