"""A curation run in progress: each stage's output, rejections and stats, by stage name.

The pipeline fills it stage by stage; top-up (engine.curate.top_up) grows it through
its methods. Neither reaches into the other's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import polars as pl
from rich.console import Console

from engine.curate.stage_cache import StageCache
from engine.stages.base import RunContext, Stage, no_rejections


def run_stage(stage: Stage, frame, ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """One stage over a frame, its stats completed with rows in and out and seconds."""
    started = time.perf_counter()
    rows_in = 0 if frame is None else frame.height
    out, dropped, stats = stage.run(frame, ctx)
    stats.update(rows_in=rows_in, rows_out=out.height, seconds=round(time.perf_counter() - started, 2))
    return out, dropped, stats


@dataclass
class Curation:
    ctx: RunContext
    cache: StageCache
    keyed: list  # (stage, cache key) in pipeline order
    console: Console
    outputs: dict = field(default_factory=dict)  # only what is at hand; see output()
    records: dict = field(default_factory=dict)  # stage name -> its rejections
    stats: dict = field(default_factory=dict)

    def stages(self, top_up: str | None = None) -> list[Stage]:
        """The run's stages in order; with `top_up`, those that declare that role."""
        return [stage for stage, _ in self.keyed if top_up is None or stage.top_up == top_up]

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

    def grow(self, name: str, rows: pl.DataFrame) -> pl.DataFrame:
        """A stage's output with top-up rows added."""
        self.outputs[name] = pl.concat([self.output(name), rows], how="diagonal_relaxed")
        return self.outputs[name]

    def reject(self, name: str, dropped: pl.DataFrame) -> None:
        """More rows a stage dropped (top-up rows), beside its earlier rejections."""
        self.records[name] = pl.concat([self.records.get(name, no_rejections()), dropped], how="diagonal_relaxed")
        self.ctx.rejected = list(self.records.values())

    def redo(self, stage: Stage, frame: pl.DataFrame) -> pl.DataFrame:
        """Run a stage again over a grown pool; its earlier drops are decided afresh."""
        self.records[stage.name] = no_rejections()
        self.ctx.rejected = list(self.records.values())
        out, dropped, stats = run_stage(stage, frame, self.ctx)
        self.record(stage.name, out, dropped, stats)
        return out


def _stage_line(name: str, stats: dict, dropped: int) -> str:
    timing = "cached" if stats.get("from_stage_cache") else f"{stats['seconds']:.2f}s"
    rows_in, rows_out = stats.get("rows_in"), stats.get("rows_out")
    return f"[bold]{name:<11}[/] {rows_in!s:>7} in  {rows_out!s:>7} kept  {dropped:>6} dropped  {timing:>8}"


