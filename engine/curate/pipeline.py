"""Execute a spec: run the stages in order, then commit one version to the store.

Stages come from engine/stages/, in the order each declares: sources → assign → augment
→ embed → dedup → split → teach → confidence → mine → diversity → select (a stage the
spec does not ask for is left out). The test split is drawn before the teacher answers, so
no decision on its confidence (mining, selection) ever touches it.
Each stage's result is cached by content (engine.curate.stage_cache), so a re-run starts from
the deepest stage whose output is already known, and changing only the band or a quota
re-runs selection without calling the teacher or the embedder.

Nothing reaches the store until every stage has finished: a run that fails or is
interrupted leaves no version behind (completed teacher answers and embeddings stay cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
from rich.console import Console
from rich.table import Table

import engine
import store as store_api
from engine.curate.curation import Curation, run_stage
from engine.curate.executors import running_on
from engine.curate.stage_cache import StageCache, stage_key
from engine.curate.top_up import top_up_until_quota
from engine.errors import Interrupted
from engine.models import store_model_lineage, use_store
from engine.preflight import check_teacher
from engine.scoring import GOLD
from engine.stages import stages_for
from engine.stages.base import RunContext
from engine.teachers import teacher_fingerprint
from engine.templates import check_spec_templates
from store.inspect import cut_off_shares, reason_kind

EXAMPLE_COLUMNS = [
    "prompt_id", "parent_id", "source", "category", "template_id", "origin", "cluster", "split", "prompt", "label",
    "teacher_prompt", "response", "reasoning", "answer", "finish_reason", "sample_responses", "sample_answers",
    "conf_mean_token_prob", "conf_min_token_prob", "conf_answer_prob", "conf_margin", "conf_entropy",
    "conf_self_consistency", "conf_teacher_agreement", "ensemble_answers",
    "options", "option_probs", "conf_option_answer_prob", "conf_option_margin", "conf_option_entropy",
    "token_ids", "token_logprobs", "topk_ids", "topk_logprobs",
]


# A commit whose expected parent moved (another run landed first) is retried on the new latest.
COMMIT_ATTEMPTS = 5


def stage_keys(spec, st) -> list[tuple[object, str]]:
    """(stage, key) for each stage, known before anything runs."""
    keyed, upstream = [], ""
    for stage in stages_for(spec):
        upstream = stage_key(stage, stage.cache_slice(spec, st), upstream)
        keyed.append((stage, upstream))
    return keyed


def resume_point(keyed, cache: StageCache) -> int:
    """Index of the deepest stage whose output is cached and whose predecessors' records are too; -1 if none."""
    best = -1
    for i, (stage, key) in enumerate(keyed):
        if not cache.has_record(key):
            break
        if stage.cached and cache.has_output(key):
            best = i
    return best


@dataclass
class RunResult:
    version: int
    created: bool
    rows: int
    stage_stats: dict = field(default_factory=dict)
    teacher_calls: int = 0
    rejections: pl.DataFrame | None = None
    cut_off: pl.DataFrame | None = None  # per category: answers that hit max_new_tokens
    gold: dict | None = None  # the teacher's accuracy against gold labels (engine.scoring.teacher_gold)


def curate(spec, st, *, progress: bool = True, console: Console | None = None):
    """Run every stage; returns (examples, rejections, per-stage stats, counters)."""
    # executor.kind: ray connects first (no cluster: one line, before any work); the per-row stages then
    # hand their model calls to it, and everything else, the commit included, stays on this driver.
    with running_on(spec.executor, stages_for(spec)):
        return _curate(spec, st, progress=progress, console=console)


def _curate(spec, st, *, progress: bool, console: Console | None):
    console = console or Console(stderr=True, quiet=not progress)
    use_store(st.root)  # a `models:RUN_ID/STUDENT` teacher is a student of this store
    check_teacher(spec)  # a chained teacher that is not there stops the run before any stage
    check_spec_templates(spec)  # a template error stops the run before any stage
    ctx = RunContext(spec=spec, cache_dir=st.root / "cache", progress=progress, store=st)
    cur = Curation(ctx, StageCache(ctx.cache_dir), stage_keys(spec, st), console)
    start = resume_point(cur.keyed, cur.cache)
    frame = None
    for i, (stage, key) in enumerate(cur.keyed):
        if i <= start:
            dropped, stats = cur.cache.load_record(key)
            frame = cur.cache.load_output(key) if i == start else None
            stats["from_stage_cache"] = True
        else:
            frame, dropped, stats = run_stage(stage, frame, ctx)
            cur.cache.save(key, frame if stage.cached else None, dropped, stats)
        cur.record(stage.name, frame, dropped, stats)
    if spec.coverage and spec.coverage.augment_until_quota:
        frame = top_up_until_quota(cur)
    gold = gold_of_teacher(cur, spec)
    if gold is not None:
        cur.stats[GOLD] = gold
    examples = frame.select(c for c in EXAMPLE_COLUMNS if c in frame.columns)
    return examples, cur.rejections(), cur.stats, ctx.counters


def gold_of_teacher(cur: Curation, spec) -> dict | None:
    """The teacher against gold over every row it answered (before mining and selection; top-up rows
    included), when the sources carry labels (engine.scoring.teacher_gold)."""
    from engine.scoring import teacher_gold

    stages = [stage.name for stage in cur.stages()]
    if "teach" not in stages:
        return None
    # The last stage that top-up grows holds every row taught (it comes after teach and drops none).
    pool = cur.stages(top_up="new_rows")[-1].name
    taught = cur.output(pool if stages.index(pool) >= stages.index("teach") else "teach")
    t = spec.teacher
    fields = ["teacher.prompt", *(["teacher.system"] if t.system else []),
              *(["teacher.messages"] if t.messages else []), *(["teacher.chat"] if not t.chat else [])]
    return teacher_gold(taught, " and ".join(fields))


def run(spec, st: store_api.Store, *, progress: bool = True, console: Console | None = None) -> RunResult:
    try:
        examples, rejected, stage_stats, counters = curate(spec, st, progress=progress, console=console)
    except KeyboardInterrupt:
        raise Interrupted("nothing was committed; completed teacher answers are cached for the next run") from None
    lineage = {
        "spec_text": spec.text,
        "spec_hash": spec.spec_hash,
        "spec_path": str(spec.path) if spec.path else None,
        "teacher": teacher_fingerprint(spec.teacher),
        "code_version": engine.__version__,
        "stats": stage_stats,
    }
    chain = store_model_lineage(st, spec.teacher.model) if spec.teacher.backend == "transformers" else None
    if chain:  # the teacher is a trained student: which run, which data, and its own teacher
        lineage["teacher_chain"] = chain
    if getattr(spec, "ensemble", None) is not None:  # the other teachers, their weights beside the teacher's
        lineage["ensemble"] = {"weight": spec.ensemble.weight,
                               "members": [{"teacher": teacher_fingerprint(m), "weight": m.weight}
                                           for m in spec.ensemble.members]}
    tables = {"examples": examples.to_arrow(), "rejections": rejected.to_arrow()}
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            result = st.commit(spec.name, tables, lineage, parent=st.latest_version(spec.name))
            break
        except store_api.ParentMoved:
            # Another run committed first: build on its version instead (the data is ours either way).
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
    # The lineage's stats hold the teacher's accuracy against gold beside the stages'; the result keeps it apart.
    stages = {name: stats for name, stats in stage_stats.items() if name != GOLD}
    return RunResult(result.version, result.created, examples.height, stages,
                     counters.get("teacher_calls", 0), rejected, cut_off_shares(examples), stage_stats.get(GOLD))


def summary_table(result: RunResult) -> Table:
    """Rows in, kept and dropped per stage, the drops by reason, and the time."""
    table = Table(title="curation summary")
    for column, justify in (("stage", "left"), ("in", "right"), ("kept", "right"), ("dropped", "right"),
                            ("why", "left"), ("time", "right")):
        table.add_column(column, justify=justify)
    kinds = (result.rejections.with_columns(kind=pl.col("reason").map_elements(reason_kind, return_dtype=pl.String))
             .group_by("stage", "kind", maintain_order=True).agg(n=pl.len(), example=pl.col("reason").first())
             .sort("n", descending=True, maintain_order=True))
    for name, stats in result.stage_stats.items():
        mine = kinds.filter(pl.col("stage") == name)
        # A kind is shown by one of its reasons, numbers and all: "29× e.g. near-duplicate of 3fa2c1d0 (cos 0.95 ≥ 0.92)".
        why = "; ".join(f"{n}× {'e.g. ' if n > 1 else ''}{example}"
                        for n, example in mine.select("n", "example").head(3).iter_rows())
        dropped = int(mine["n"].sum()) if mine.height else 0
        timing = "cached" if stats.get("from_stage_cache") else f"{stats.get('seconds', 0):.1f}s"
        table.add_row(name, str(stats.get("rows_in", "")), str(stats.get("rows_out", "")), str(dropped), why, timing)
    return table
