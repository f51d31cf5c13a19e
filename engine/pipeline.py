"""Execute a spec: run the stages in order, then commit one version to the store.

Nothing reaches the store until every stage has finished: a run that fails or is
interrupted leaves no version behind (completed teacher answers stay in the cache).
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
from engine.stages.base import RunContext, no_rejections
from engine.stages.confidence import Confidence
from engine.stages.mine import Mine
from engine.stages.sources import Sources
from engine.stages.split import Split
from engine.stages.teach import Teach
from engine.teachers import teacher_fingerprint

EXAMPLE_COLUMNS = [
    "prompt_id", "parent_id", "source", "category", "template_id", "origin", "cluster", "split", "prompt", "label",
    "teacher_prompt", "response", "reasoning", "answer",
    "conf_mean_token_prob", "conf_min_token_prob", "conf_answer_prob", "conf_margin", "conf_entropy",
    "token_ids", "token_logprobs", "topk_ids", "topk_logprobs",
]


def stages() -> list:
    return [Sources(), Teach(), Confidence(), Mine(), Split()]


@dataclass
class RunResult:
    version: int
    created: bool
    rows: int
    stage_stats: dict = field(default_factory=dict)
    teacher_calls: int = 0


def curate(spec, st, *, progress: bool = True, console: Console | None = None):
    """Run every stage; returns (examples, rejections, per-stage stats, counters)."""
    console = console or Console(stderr=True, quiet=not progress)
    ctx = RunContext(spec=spec, cache_dir=st.root / "cache", progress=progress, store=st)
    frame, rejected, stage_stats = None, [no_rejections()], {}
    for stage in stages():
        started = time.perf_counter()
        rows_in = 0 if frame is None else frame.height
        frame, dropped, stats = stage.run(frame, ctx)
        stats["seconds"] = round(time.perf_counter() - started, 2)
        stage_stats[stage.name] = stats
        rejected.append(dropped)
        ctx.rejected.append(dropped)
        console.print(f"[bold]{stage.name:<11}[/] {rows_in:>6} in  {frame.height:>6} kept  "
                      f"{dropped.height:>5} dropped  {stats['seconds']:>7.2f}s")
    examples = frame.select(c for c in EXAMPLE_COLUMNS if c in frame.columns)
    return examples, pl.concat(rejected), stage_stats, ctx.counters


def run(spec, st: store_api.Store, *, progress: bool = True, console: Console | None = None) -> RunResult:
    try:
        examples, rejected, stage_stats, counters = curate(spec, st, progress=progress, console=console)
    except KeyboardInterrupt:
        raise Interrupted("nothing was committed; completed teacher answers are cached for the next run") from None
    latest = st.latest_version(spec.name)
    lineage = {
        "spec_text": spec.text,
        "spec_hash": spec.spec_hash,
        "spec_path": str(spec.path) if spec.path else None,
        "teacher": teacher_fingerprint(spec.teacher),
        "code_version": engine.__version__,
        "stats": stage_stats,
    }
    result = st.commit(spec.name, {"examples": examples.to_arrow(), "rejections": rejected.to_arrow()},
                       lineage, parent=latest)
    return RunResult(result.version, result.created, examples.height, stage_stats, counters.get("teacher_calls", 0))


def summary_table(result: RunResult) -> Table:
    table = Table(title="stages")
    for column in ("stage", "stats"):
        table.add_column(column)
    for name, stats in result.stage_stats.items():
        table.add_row(name, "  ".join(f"{k}={v}" for k, v in stats.items()))
    return table
