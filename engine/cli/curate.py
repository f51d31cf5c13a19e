"""Verbs over a spec: validate, plan, run, train, eval."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from engine.cli.common import (StoreOption, app, err, open_store, out, print_answer_format, print_cut_off, print_gold,
                               store_path)


def _spec(path: Path):
    from engine.spec import load_spec

    with _every_problem():
        return load_spec(path)


@contextmanager
def _every_problem():
    """A spec's problems come all at once: print each as its own `error:` line, then exit 1."""
    from engine.errors import SpecError, TemplateProblem

    try:
        yield
    except (SpecError, TemplateProblem) as e:
        if len(e.lines) == 1:
            raise  # main() prints it like any other error
        for line in e.lines:
            err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def validate(spec: Path = typer.Argument(..., help="spec file (YAML)"),
             store: Optional[Path] = typer.Option(None, "--store", help="store whose trained students a "
                                                  "`models:RUN_ID/STUDENT` teacher names (default: "
                                                  "$SYLLABUS_STORE or .syllabus); never written")):
    """Check a spec: fields, files and templates, a trained-student teacher, each student's size.
    Every problem is one line naming the file and the field."""
    from engine.preflight import check_teacher, ensemble_notes, student_shapes
    from engine.templates import check_spec_templates

    s = _spec(spec)
    with _every_problem():
        taken = check_spec_templates(s)
    store_path(store)  # only where `models:` names point: validate creates no store
    check_teacher(s)
    shapes = student_shapes(s)
    notes = ensemble_notes(s)  # what each ensemble member gives: logit targets or answers only
    for line in [*taken, *notes]:  # which fields were read as files and which as inline text
        out.print(f"{spec}: {escape(line)}", highlight=False, soft_wrap=True)
    _print_shapes(shapes)
    out.print(f"{spec}: ok — dataset {s.name!r}, {len(s.sources)} source(s), {len(s.students)} student(s)")


def _print_shapes(shapes) -> None:
    from engine.preflight import shapes_table

    if shapes.rows:
        out.print(shapes_table(shapes))
    if shapes.note:
        out.print(f"note: {escape(shapes.note)}", highlight=False, soft_wrap=True)


@app.command()
def run(spec: Path = typer.Argument(..., help="spec file (YAML)"), store: Optional[Path] = StoreOption,
        quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
        executor: Optional[str] = typer.Option(None, "--executor", help="local | ray: where the teacher and "
                                               "embedder run (default: the spec's executor.kind)"),
        address: Optional[str] = typer.Option(None, "--address", help="the Ray cluster: auto | HOST:PORT "
                                              "(default: the spec's executor.address)")):
    """Curate the spec's dataset and commit it as a new version (nothing new if unchanged)."""
    from engine.curate import pipeline

    s = _with_executor(_spec(spec), executor, address)
    result = pipeline.run(s, open_store(store), progress=not quiet, console=err)
    if not quiet:
        err.print(pipeline.summary_table(result))
        print_cut_off(err, result.cut_off)
        print_answer_format(err, result.stage_stats.get("teach"))
    print_gold(err, result.gold, warning_only=quiet)  # the warning even when quiet: a broken prompt must show
    if result.created:
        out.print(f"committed {s.name}@{result.version}: {result.rows} examples, {result.teacher_calls} teacher calls")
    else:
        out.print(f"nothing new: {s.name}@{result.version} already holds this data "
                  f"({result.rows} examples, {result.teacher_calls} teacher calls)")


def _with_executor(s, kind: str | None, address: str | None):
    """The spec with --executor and --address in place of its executor's kind and address."""
    from pydantic import ValidationError

    from engine.errors import SpecError
    from engine.spec import Executor

    changes = {k: v for k, v in (("kind", kind), ("address", address)) if v is not None}
    if not changes:
        return s
    try:
        executor = Executor.model_validate({**s.executor.model_dump(), **changes})
    except ValidationError as e:
        problem = e.errors()[0]
        raise SpecError(f"--{problem['loc'][0] if problem['loc'][0] != 'kind' else 'executor'}: "
                        f"{problem['msg'].removeprefix('Value error, ')}") from None
    return s.model_copy(update={"executor": executor})


@app.command()
def plan(spec: Path = typer.Argument(..., help="spec file (YAML)"), store: Optional[Path] = StoreOption):
    """What `run` would do: cached stages, teacher calls still to pay and their estimated time."""
    from rich.table import Table

    from engine.curate.plan import make_plan, member_lines
    from engine.preflight import check_teacher, student_shapes

    s = _spec(spec)
    st = open_store(store)
    check_teacher(s)
    shapes = student_shapes(s)  # an impossible student fails here, before any stage runs
    p = make_plan(s, st)
    table = Table(title=f"plan for {s.name}")
    table.add_column("stage")
    table.add_column("status")
    for name, status in p.stages:
        table.add_row(name, status)
    out.print(table)
    bound = p.bound
    if p.teacher_calls == 0 and not bound:
        out.print("teacher calls to pay: 0 (every answer is cached)")
    elif p.teacher_rows is None:
        out.print(f"teacher calls to pay: {bound}0 (every answer of the teach stage is cached)")
    else:
        what = (f"requests ({p.teacher_rows // p.samples} prompts x {p.samples} samples)" if p.samples > 1
                else "prompts")
        out.print(f"teacher calls to pay: {bound}{p.teacher_calls} of {p.teacher_rows} {what} "
                  f"(about {p.seconds / 60:.1f} min; {p.speed_source})")
    if p.best_calls is not None and p.teacher_calls and p.best_calls < p.teacher_calls:
        saved = p.teacher_calls - p.best_calls
        if p.order == "selection":
            out.print(f"teach.order: selection stops asking a category once in-band answers fill its quota: "
                      f"{p.best_calls} calls if every answer is in band, {saved} saved (an estimate: each answer "
                      f"outside the band costs one more call, up to {p.teacher_calls})")
        else:
            out.print(f"teach.order: selection would pay {p.best_calls} of these calls if every answer is in "
                      f"band, {saved} fewer (an estimate)")
    if p.top_up:
        out.print("plus the calls of top-up rounds for categories short of their quota "
                  "(coverage.augment_until_quota), known only once selection has run")
    if p.student_rows:
        out.print(f"student sources: {p.student_rows} rows, answered by their students ({p.student_calls} answers "
                  f"to generate) and scored by the teacher ({p.scorings} scorings to pay, counted above)")
    for line in member_lines(p):  # ensemble members: their own answers and scorings
        out.print(line, highlight=False, soft_wrap=True)
    _print_shapes(shapes)


def _seeds(text: Optional[str]) -> Optional[list[int]]:
    """--seeds 0,1,2 as a list of distinct seeds."""
    from engine.errors import UserError

    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UserError(f"--seeds: {text!r} is not a comma-separated list of seeds (e.g. 0,1,2)")
    return list(dict.fromkeys(int(p) for p in parts))


SeedsOption = typer.Option(None, "--seeds", help="train or score each student once per seed, e.g. 0,1,2 "
                                                 "(default: training.seeds, else training.seed)")


@app.command()
def train(spec: Path = typer.Argument(..., help="spec file (YAML)"),
          dataset: Optional[str] = typer.Option(None, "--dataset", help="version to train on (default: NAME@latest)"),
          seeds: Optional[str] = SeedsOption,
          nproc: int = typer.Option(1, "--nproc", help="processes to shard each batch across (gloo on CPU, nccl "
                                                       "on CUDA: one GPU each); the same steps as one process"),
          store: Optional[Path] = StoreOption, quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Train every student of the spec from one pinned dataset version, in one pass (one run per seed)."""
    from engine.train import runs as training

    s = _spec(spec)
    for seed, result in training.train_seeds(s, open_store(store), dataset, _seeds(seeds), progress=not quiet,
                                             nproc=nproc):
        verb = "trained" if result.created else "already trained"
        at = "" if seed is None else f" (seed {seed})"
        out.print(f"{verb}: {', '.join(result.students)} on {result.dataset_ref}{at} -> {result.run_dir}")


@app.command(name="eval")
def evaluate(spec: Path = typer.Argument(..., help="spec file (YAML)"),
             dataset: Optional[str] = typer.Option(None, "--dataset", help="version the students were trained on"),
             seeds: Optional[str] = SeedsOption,
             as_json: bool = typer.Option(False, "--json", help="print the whole report as JSON (what eval.json holds)"),
             store: Optional[Path] = StoreOption, quiet: bool = typer.Option(False, "--quiet", "-q")):
    """Teacher vs students on the test split and each eval source: accuracy with n, 95% interval and the
    majority baseline, per category, confusion, agreement, KL, retention, size and speed."""
    import json
    import sys

    from engine.train import runs as training
    from engine.train.evaluate import (category_table, confusion_table, format_table, one_answer_warnings,
                                       set_heading)

    s = _spec(spec)
    report, path = training.evaluate(s, open_store(store), dataset, seeds=_seeds(seeds), progress=not quiet)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
        return
    for entry in report["sets"]:
        first, *rest = set_heading(entry).splitlines()
        out.print(f"\n[bold]{escape(first)}[/]", highlight=False, soft_wrap=True)
        for line in rest:
            out.print(escape(line), highlight=False, soft_wrap=True)
        out.print(format_table(entry["models"], title=f"teacher vs students: {entry['name']}", seeds=entry["seeds"]))
        for extra in (category_table(entry["models"]), confusion_table(entry["models"])):
            if extra is not None:
                out.print(extra)
        for line in one_answer_warnings(entry):
            out.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    methods = report["methods"]
    out.print(f"intervals: {methods['interval']}; retention: {methods['retention_interval']}"
              + ("; students over seeds: mean (min–max)" if len(report["seeds"]) > 1 else ""),
              style="dim", highlight=False)
    if report["teacher_calls"]:
        out.print(f"teacher calls for eval.sources: {report['teacher_calls']} (cached for the next eval)", style="dim")
    out.print(f"saved {path}", style="dim")
