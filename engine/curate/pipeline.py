"""Execute a spec: run the stages in order, then commit one version to the store.

Stage order: sources → assign → augment → embed → dedup → teach → confidence → mine
→ diversity → select → split (a stage the spec does not ask for is left out).
Each stage's result is cached by content (engine.curate.stage_cache), so a re-run starts from
the deepest stage whose output is already known, and changing only the band or a quota
re-runs selection without calling the teacher or the embedder.

Nothing reaches the store until every stage has finished: a run that fails or is
interrupted leaves no version behind (completed teacher answers and embeddings stay cached).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import polars as pl
from rich.console import Console
from rich.table import Table

import engine
import store as store_api
from engine.errors import Interrupted
from store.inspect import reason_kind
from engine.curate.stage_cache import CACHED_STAGES, StageCache, file_digest, stage_key
from engine.stages.base import RunContext, no_rejections
from engine.teachers import teacher_fingerprint
from engine.templates import check_spec_templates

EXAMPLE_COLUMNS = [
    "prompt_id", "parent_id", "source", "category", "template_id", "origin", "cluster", "split", "prompt", "label",
    "teacher_prompt", "response", "reasoning", "answer",
    "conf_mean_token_prob", "conf_min_token_prob", "conf_answer_prob", "conf_margin", "conf_entropy",
    "token_ids", "token_logprobs", "topk_ids", "topk_logprobs",
]


COMMIT_ATTEMPTS = 5


def needs_embeddings(spec) -> bool:
    return bool(spec.dedup.semantic or spec.diversity)


def stages_for(spec) -> list:
    """The stages this spec asks for, in order."""
    from engine.stages.confidence import Confidence
    from engine.stages.mine import Mine
    from engine.stages.sources import Sources
    from engine.stages.split import Split
    from engine.stages.teach import Teach

    chosen = [Sources()]
    if spec.coverage:
        from engine.stages.coverage import Assign

        chosen.append(Assign())
    if spec.augment:
        from engine.stages.augment import Augment

        chosen.append(Augment())
    if needs_embeddings(spec):
        from engine.stages.embed import Embed

        chosen.append(Embed())
    if spec.dedup.exact or spec.dedup.semantic or spec.dedup.against:
        from engine.stages.dedup import Dedup

        chosen.append(Dedup())
    chosen += [Teach(), Confidence(), Mine()]
    if spec.diversity:
        from engine.stages.diversity import Diversity

        chosen.append(Diversity())
    if spec.coverage:
        from engine.stages.select import Select

        chosen.append(Select())
    chosen.append(Split())
    return chosen


def _dump(model) -> object:
    return None if model is None else model.model_dump(mode="json", by_alias=True)


def stage_config(name: str, spec, st) -> object:
    """The slice of the spec (and the files it names) that a stage's output depends on."""
    def files(paths):
        return {p: file_digest(spec.resolve_path(p)) for p in paths if p}

    def version_of(ref):
        return st.resolve(ref).ref if ref else None  # NAME@latest pins to a number

    if name == "sources":
        return [[_dump(s), files([s.path]), version_of(s.from_)] for s in spec.sources]
    if name == "assign":
        from engine.models import fingerprint

        # Only what decides a row's category: quotas are select's business, so changing one re-runs select alone.
        cov = spec.coverage
        rules = {name: [c.describe, c.keywords] for name, c in cov.categories.items()}
        by_embedding = cov.assign == "embedding"
        return [cov.assign, cov.similarity_floor, rules,
                [_dump(spec.embed), fingerprint(spec.embed.model)] if by_embedding else None]
    if name == "augment":
        teacher = [_dump(spec.teacher), teacher_fingerprint(spec.teacher)] if any(a.teacher for a in spec.augment) else None
        return [[_dump(a) for a in spec.augment], files([a.template for a in spec.augment]), teacher]
    if name == "embed":
        from engine.models import fingerprint

        return [_dump(spec.embed), fingerprint(spec.embed.model)]
    if name == "dedup":
        return [_dump(spec.dedup), version_of(spec.dedup.against)]
    if name == "teach":
        return [_dump(spec.teacher), teacher_fingerprint(spec.teacher), files([spec.teacher.prompt])]
    if name == "confidence":
        return [_dump(spec.teacher.reasoning), teacher_fingerprint(spec.teacher)]
    if name == "mine":
        return _dump(spec.mining)
    if name == "diversity":
        return _dump(spec.diversity)
    if name == "select":
        return [_dump(spec.coverage), _dump(spec.diversity)]
    if name == "split":
        return _dump(spec.splits)
    raise ValueError(f"no cache slice for stage {name!r}")


def stage_keys(spec, st) -> list[tuple[object, str]]:
    """(stage, key) for each stage, known before anything runs."""
    keyed, upstream = [], ""
    for stage in stages_for(spec):
        upstream = stage_key(stage, stage_config(stage.name, spec, st), upstream)
        keyed.append((stage, upstream))
    return keyed


def resume_point(keyed, cache: StageCache) -> int:
    """Index of the deepest stage whose output is cached and whose predecessors' records are too; -1 if none."""
    best = -1
    for i, (stage, key) in enumerate(keyed):
        if not cache.has_record(key):
            break
        if stage.name in CACHED_STAGES and cache.has_output(key):
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


@dataclass
class Curation:
    """A run in progress: each stage's output, rejections and stats, by stage name."""

    ctx: RunContext
    cache: StageCache
    keyed: list
    console: Console
    outputs: dict = field(default_factory=dict)  # only what is at hand; see output()
    records: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def output(self, name: str) -> pl.DataFrame:
        """A stage's output: at hand, or from the stage cache when the run resumed past it."""
        if name not in self.outputs:
            key = next(k for stage, k in self.keyed if stage.name == name)
            self.outputs[name] = self.cache.load_output(key)
        return self.outputs[name]

    def rejections(self) -> pl.DataFrame:
        return pl.concat([no_rejections(), *self.records.values()], how="diagonal_relaxed").select(no_rejections().columns)

    def record(self, name: str, frame, dropped: pl.DataFrame, stats: dict) -> None:
        if frame is not None:
            self.outputs[name] = frame
        self.records[name] = dropped
        self.stats[name] = stats
        self.ctx.rejected = list(self.records.values())  # what select's shortfall reasons read
        self.console.print(_stage_line(name, stats, dropped.height))


def run_stage(stage, frame, ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    started = time.perf_counter()
    rows_in = 0 if frame is None else frame.height
    out, dropped, stats = stage.run(frame, ctx)
    stats.update(rows_in=rows_in, rows_out=out.height, seconds=round(time.perf_counter() - started, 2))
    return out, dropped, stats


def curate(spec, st, *, progress: bool = True, console: Console | None = None):
    """Run every stage; returns (examples, rejections, per-stage stats, counters)."""
    console = console or Console(stderr=True, quiet=not progress)
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
            cur.cache.save(key, frame if stage.name in CACHED_STAGES else None, dropped, stats)
        cur.record(stage.name, frame, dropped, stats)
    if spec.coverage and spec.coverage.augment_until_quota:
        from engine.curate.top_up import top_up_until_quota

        frame = top_up_until_quota(cur)
    examples = frame.select(c for c in EXAMPLE_COLUMNS if c in frame.columns)
    return examples, cur.rejections(), cur.stats, ctx.counters


def _stage_line(name: str, stats: dict, dropped: int) -> str:
    timing = "cached" if stats.get("from_stage_cache") else f"{stats['seconds']:.2f}s"
    rows_in, rows_out = stats.get("rows_in"), stats.get("rows_out")
    return f"[bold]{name:<11}[/] {rows_in!s:>7} in  {rows_out!s:>7} kept  {dropped:>6} dropped  {timing:>8}"


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
    tables = {"examples": examples.to_arrow(), "rejections": rejected.to_arrow()}
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            result = st.commit(spec.name, tables, lineage, parent=st.latest_version(spec.name))
            break
        except store_api.ParentMoved:
            # Another run committed first: build on its version instead (the data is ours either way).
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
    return RunResult(result.version, result.created, examples.height, stage_stats,
                     counters.get("teacher_calls", 0), rejected)


def summary_table(result: RunResult) -> Table:
    """Rows in, kept and dropped per stage, the drops by reason, and the time."""
    table = Table(title="curation summary")
    for column, justify in (("stage", "left"), ("in", "right"), ("kept", "right"), ("dropped", "right"),
                            ("why", "left"), ("time", "right")):
        table.add_column(column, justify=justify)
    kinds = (result.rejections.with_columns(kind=pl.col("reason").map_elements(reason_kind, return_dtype=pl.String))
             .group_by("stage", "kind").len().sort("len", descending=True))
    for name, stats in result.stage_stats.items():
        mine = kinds.filter(pl.col("stage") == name)
        why = "; ".join(f"{n} {k}" for k, n in mine.select("kind", "len").head(3).iter_rows())
        dropped = int(mine["len"].sum()) if mine.height else 0
        timing = "cached" if stats.get("from_stage_cache") else f"{stats.get('seconds', 0):.1f}s"
        table.add_row(name, str(stats.get("rows_in", "")), str(stats.get("rows_out", "")), str(dropped), why, timing)
    return table
