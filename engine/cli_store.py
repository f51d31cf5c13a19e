"""Store commands: versions, sql (and the rest of the store's verbs as they land)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from engine.cli_common import StoreOption, app, open_store, out


@app.command()
def versions(name: Optional[str] = typer.Argument(None, help="dataset name (default: all)"),
             store: Optional[Path] = StoreOption):
    """List dataset versions with their lineage."""
    rows = open_store(store).versions(name)
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
    result = open_store(store).sql(query, at=at)
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
