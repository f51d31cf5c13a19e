"""The `syllabus` command: parse, call one function, print.

Errors users can fix (a bad spec, a missing file, an unknown version) print as one
line, without a traceback, and exit with status 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-centric LLM distillation: curate, version, query and train from one spec.")
# Piped output keeps whole rows rather than wrapping at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

StoreOption = typer.Option(None, "--store", help="store folder (default: $SYLLABUS_STORE or .syllabus)")


def _store(path: Optional[Path]):
    import store

    return store.open(path or Path(os.environ.get("SYLLABUS_STORE", ".syllabus")))


def _spec(path: Path):
    from engine.spec import load_spec

    return load_spec(path)


@app.command()
def validate(spec: Path = typer.Argument(..., help="spec file (YAML)")):
    """Check a spec: fields, files and templates. Errors name the file and the field."""
    from engine.stages.teach import teacher_prompts  # noqa: F401  (templates compile on load)
    from engine.templates import load_template

    s = _spec(spec)
    if s.teacher.prompt:
        load_template(s.resolve_path(s.teacher.prompt))
    if s.training.student_prompt:
        from engine.templates import compile_template

        compile_template(s.training.student_prompt, f"{spec}: training.student_prompt")
    out.print(f"{spec}: ok — dataset {s.name!r}, {len(s.sources)} source(s), {len(s.students)} student(s)")


@app.command()
def run(spec: Path = typer.Argument(..., help="spec file (YAML)"), store: Optional[Path] = StoreOption,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output")):
    """Curate the spec's dataset and commit it as a new version (nothing new if unchanged)."""
    from engine import pipeline

    s = _spec(spec)
    result = pipeline.run(s, _store(store), progress=not quiet, console=err)
    if result.created:
        out.print(f"committed {s.name}@{result.version}: {result.rows} examples, {result.teacher_calls} teacher calls")
    else:
        out.print(f"nothing new: {s.name}@{result.version} already holds this data "
                  f"({result.rows} examples, {result.teacher_calls} teacher calls)")


@app.command()
def versions(name: Optional[str] = typer.Argument(None, help="dataset name (default: all)"),
             store: Optional[Path] = StoreOption):
    """List dataset versions with their lineage."""
    rows = _store(store).versions(name)
    table = Table()
    for column in ("version", "parent", "created", "examples", "train", "val", "test", "rejected", "spec", "teacher"):
        table.add_column(column, justify="right" if column in ("examples", "train", "val", "test", "rejected") else "left")
    for v in rows:
        splits = v.stats.get("split", {})
        table.add_row(v.ref, f"{v.dataset}@{v.parent}" if v.parent else "-", v.created[:19].replace("T", " "),
                      str(v.row_counts.get("examples", 0)), *(str(splits.get(k, "")) for k in ("train", "val", "test")),
                      str(v.row_counts.get("rejections", 0)), v.spec_hash[:12], v.teacher)
    out.print(table)


@app.command()
def sql(query: str = typer.Argument(..., help="SQL over the views examples, tokens, rejections"),
        at: Optional[str] = typer.Option(None, "--at", help="dataset version the views show: NAME@V, NAME@latest"),
        store: Optional[Path] = StoreOption,
        fmt: str = typer.Option("table", "--format", help="table | csv | json")):
    """Read-only SQL (DuckDB) over one dataset version."""
    result = _store(store).sql(query, at=at)
    print_arrow(result, fmt)


def print_arrow(result, fmt: str) -> None:
    import polars as pl

    frame = pl.from_arrow(result)
    if fmt == "csv":
        sys.stdout.write(frame.write_csv())
    elif fmt == "json":
        sys.stdout.write(json.dumps(frame.to_dicts(), default=str, ensure_ascii=False) + "\n")
    else:
        table = Table(show_lines=False)
        for name in frame.columns:
            table.add_column(name)
        for row in frame.iter_rows():
            table.add_row(*(_cell(v) for v in row))
        out.print(table)
        out.print(f"{frame.height} row(s)", style="dim")


def _cell(value) -> str:
    if value is None:
        return "NULL"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


@app.command()
def train(spec: Path = typer.Argument(..., help="spec file (YAML)"),
          dataset: Optional[str] = typer.Option(None, "--dataset", help="version to train on (default: NAME@latest)"),
          store: Optional[Path] = StoreOption, quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Train every student of the spec from one pinned dataset version, in one pass."""
    from engine import training

    s = _spec(spec)
    result = training.train(s, _store(store), dataset, progress=not quiet, console=err)
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
    rows, path = training.evaluate(s, _store(store), dataset, progress=not quiet, console=err)
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
