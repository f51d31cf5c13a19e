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
    if result.created:
        out.print(f"committed {s.name}@{result.version}: {result.rows} examples, {result.teacher_calls} teacher calls")
    else:
        out.print(f"nothing new: {s.name}@{result.version} already holds this data "
                  f"({result.rows} examples, {result.teacher_calls} teacher calls)")


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
