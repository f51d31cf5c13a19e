"""The `syllabus` command: parse, call one function, print.

Errors users can fix (a bad spec, a missing file, an unknown version) print as one
line, without a traceback, and exit with status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from engine import cli_store  # noqa: F401  (registers the store commands)
from engine import cli_init  # noqa: F401  (registers `syllabus init`)
from engine.cli_common import StoreOption, app, err, open_store, out


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
    from engine import pipeline

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

    from engine.plan import make_plan

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
    from engine import training

    s = _spec(spec)
    result = training.train(s, open_store(store), dataset, progress=not quiet, console=err)
    verb = "trained" if result.created else "already trained"
    out.print(f"{verb}: {', '.join(result.students)} on {result.dataset_ref} -> {result.run_dir}")


@app.command(name="eval")
def evaluate(spec: Path = typer.Argument(..., help="spec file (YAML)"),
             dataset: Optional[str] = typer.Option(None, "--dataset", help="version the students were trained on"),
             store: Optional[Path] = StoreOption, quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Teacher vs students on the test split: size, speed, accuracy, agreement, KL, retention."""
    from engine import training
    from engine.train import format_table

    s = _spec(spec)
    rows, path = training.evaluate(s, open_store(store), dataset, progress=not quiet, console=err)
    out.print(format_table(rows))
    out.print(f"saved {path}", style="dim")


def main() -> None:
    from engine.errors import USER_ERRORS, Interrupted

    try:
        app()
    except Interrupted as e:
        err.print(f"[yellow]interrupted:[/] {e}", highlight=False)
        sys.exit(130)
    except USER_ERRORS as e:
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
