"""What every CLI module shares: the app, the consoles, the --store option."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-centric LLM distillation: curate, version, query and train from one spec.")
# Piped output keeps whole rows rather than wrapping at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)

StoreOption = typer.Option(None, "--store", help="store folder (default: $SYLLABUS_STORE or .syllabus)")


def store_path(path: Optional[Path]) -> Path:
    """--store, else $SYLLABUS_STORE, else .syllabus; also the store `models:RUN_ID/STUDENT` names refer to."""
    from engine.models import use_store

    found = path or Path(os.environ.get("SYLLABUS_STORE", ".syllabus"))
    use_store(found)
    return found


def open_store(path: Optional[Path]):
    import store

    return store.open(store_path(path))


def print_cut_off(console: Console, shares) -> None:
    """Answers cut off at max_new_tokens, per category, with a warning when the share is high."""
    from store.inspect import CUT_OFF_WARN

    if shares is None or not shares.height:
        return
    parts = [f"{c} {share:.0%} ({n}/{m})" for c, m, n, share in shares.select("category", "examples", "cut_off", "share").iter_rows()]
    console.print(f"answers cut off at max_new_tokens: {'; '.join(parts)}", highlight=False)
    overall = shares.filter(category="all")["share"][0]
    if overall > CUT_OFF_WARN:
        console.print(f"[yellow]warning:[/] {overall:.0%} of answers were cut off mid-answer: raise "
                      "teacher.generation.max_new_tokens, or set mining.truncated: drop", highlight=False)


def print_gold(console: Console, gold, *, warning_only: bool = False) -> None:
    """The teacher's accuracy against the sources' gold labels (overall, per category), and the warning
    line when it is low: a teacher prompt gone wrong shows before anyone trains."""
    from rich.markup import escape

    if not isinstance(gold, dict) or not gold.get("n"):
        return
    if not warning_only:
        from engine.scoring import gold_lines

        for line in gold_lines(gold):
            console.print(escape(line), highlight=False, soft_wrap=True)
    if gold.get("warning"):
        console.print(f"[yellow]warning:[/] {escape(gold['warning'])}", highlight=False, soft_wrap=True)


def print_answer_format(console: Console, teach_stats) -> None:
    """How many taught responses lacked the answer marker (teach stage stats): kept with answer null."""
    if not isinstance(teach_stats, dict) or not teach_stats.get("answer_format_broken"):
        return
    broken, rows = teach_stats["answer_format_broken"], teach_stats.get("rows")
    of = f" of {rows}" if rows else ""
    console.print(f"[yellow]answer format:[/] {broken}{of} responses lack the answer marker (teacher.reasoning): "
                  "kept with answer null, which matches no label", highlight=False, soft_wrap=True)
