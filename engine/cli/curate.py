"""Verbs over a spec: validate, plan, run, train, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.cli.common import StoreOption, app, err, open_store, out


def _spec(path: Path):
    from engine.spec import load_spec

    return load_spec(path)


@app.command()
def validate(spec: Path = typer.Argument(..., help="spec file (YAML)")):
    """Check a spec: fields, files and templates. Errors name the file and the field."""
    from engine.templates import check_spec_templates

    s = _spec(spec)
    check_spec_templates(s)
    out.print(f"{spec}: ok — dataset {s.name!r}, {len(s.sources)} source(s), {len(s.students)} student(s)")


@app.command()
def run(spec: Path = typer.Argument(..., help="spec file (YAML)"), store: Optional[Path] = StoreOption,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output")):
    """Curate the spec's dataset and commit it as a new version (nothing new if unchanged)."""
    from engine.curate import pipeline

    s = _spec(spec)
    result = pipeline.run(s, open_store(store), progress=not quiet, console=err)
    if not quiet:
        err.print(pipeline.summary_table(result))
    if result.created:
        out.print(f"committed {s.name}@{result.version}: {result.rows} examples, {result.teacher_calls} teacher calls")
    else:
        out.print(f"nothing new: {s.name}@{result.version} already holds this data "
                  f"({result.rows} examples, {result.teacher_calls} teacher calls)")


@app.command()
def plan(spec: Path = typer.Argument(..., help="spec file (YAML)"), store: Optional[Path] = StoreOption):
    """What `run` would do: cached stages, teacher calls still to pay and their estimated time."""
    from rich.table import Table

    from engine.curate.plan import make_plan

    s = _spec(spec)
    p = make_plan(s, open_store(store))
    table = Table(title=f"plan for {s.name}")
    table.add_column("stage")
    table.add_column("status")
    for name, status in p.stages:
        table.add_row(name, status)
    out.print(table)
    bound = p.bound
    if p.teacher_calls == 0 and not bound:
        out.print("teacher calls to pay: 0 (every answer is cached)")
    else:
        out.print(f"teacher calls to pay: {bound}{p.teacher_calls} of {p.teacher_rows} prompts "
                  f"(about {p.seconds / 60:.1f} min; {p.speed_source})")


@app.command()
def train(spec: Path = typer.Argument(..., help="spec file (YAML)"),
          dataset: Optional[str] = typer.Option(None, "--dataset", help="version to train on (default: NAME@latest)"),
          store: Optional[Path] = StoreOption, quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Train every student of the spec from one pinned dataset version, in one pass."""
    from engine.train import runs as training

    s = _spec(spec)
    result = training.train(s, open_store(store), dataset, progress=not quiet, console=err)
    verb = "trained" if result.created else "already trained"
    out.print(f"{verb}: {', '.join(result.students)} on {result.dataset_ref} -> {result.run_dir}")


@app.command(name="eval")
def evaluate(spec: Path = typer.Argument(..., help="spec file (YAML)"),
             dataset: Optional[str] = typer.Option(None, "--dataset", help="version the students were trained on"),
             store: Optional[Path] = StoreOption, quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Teacher vs students on the test split: size, speed, accuracy, agreement, KL, retention."""
    from engine.train import runs as training
    from engine.train import format_table

    s = _spec(spec)
    rows, path = training.evaluate(s, open_store(store), dataset, progress=not quiet, console=err)
    out.print(format_table(rows))
    out.print(f"saved {path}", style="dim")
