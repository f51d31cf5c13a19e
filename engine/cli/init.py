"""`syllabus init DOMAIN --prompts FILE`: scaffold a spec and a teacher template."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.cli.common import app, out


@app.command()
def init(domain: str = typer.Argument(..., help="dataset name: makes specs/DOMAIN.yaml and templates/DOMAIN_teacher.j2"),
         prompts: Path = typer.Option(..., "--prompts", help="your prompts: JSONL, CSV, Parquet, or text with one per line"),
         out_dir: Path = typer.Option(Path("."), "--out-dir", help="folder that gets specs/ and templates/"),
         sample: int = typer.Option(50, "--sample", min=1, help="rows the spec reads to start with (its source's limit)"),
         force: bool = typer.Option(False, "--force", help="overwrite existing files")):
    """Scaffold a spec and a starter teacher template that validate and run on a sample of your prompts."""
    from engine.scaffold import relative_to_cwd, scaffold

    made = scaffold(domain, prompts, out_dir, force=force, sample=sample)
    cols = made.columns
    found = [f"text column {cols.text!r}"] if cols.text else ["one prompt per line"]
    found += [f"label {cols.label!r}"] if cols.label else []
    found += [f"{len(cols.categories)} categories in {cols.category!r}"] if cols.categories else []
    found += [f"{made.bad_rows} malformed row{'s' if made.bad_rows > 1 else ''} tolerated"] if made.bad_rows else []
    out.print(f"created {relative_to_cwd(made.spec_path)} and {relative_to_cwd(made.template_path)} "
              f"from {prompts} ({made.format}: {', '.join(found)})", highlight=False)
    spec = made.spec_path.relative_to(out_dir).as_posix()
    where = "" if out_dir.resolve() == Path.cwd().resolve() else f"cd {out_dir} && "
    out.print(f"next: {where}syllabus validate {spec} && syllabus run {spec}", highlight=False)
