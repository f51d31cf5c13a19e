"""`syllabus report NAME@V`: the version's HTML report (engine/report.py). Thin: parse, render, print the path."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from engine.cli.common import StoreOption, app, open_store, out


@app.command()
def report(ref: str = typer.Argument(..., help="NAME@V, NAME@latest or NAME@TAG"),
           train: Optional[str] = typer.Option(None, "--train", help="training run to show (default: the latest "
                                               "run trained on this version, if any)"),
           out_path: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: "
                                                   "out/reports/<run id>.html, or <dataset>-v<N>.html without a run)"),
           store: Optional[Path] = StoreOption):
    """One self-contained HTML page: coverage, the funnel of rows, the teacher's confidence, clusters,
    augmentation yield, training curves and teacher vs students, each chart inline SVG."""
    from engine.report import write_report

    path = write_report(open_store(store), ref, run=train, out=out_path)
    out.print(f"wrote {path}", highlight=False, soft_wrap=True)
