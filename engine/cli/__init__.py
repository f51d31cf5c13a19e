"""The `syllabus` command: parse, call one function, print.

Each module registers its verbs on the shared app: curate (validate, plan, run, train,
eval), datasets (versions, show, models, sql, diff, export, tag, gc, verify), init, report. Errors users
can fix (a bad spec, a missing file, an unknown version) print as one line, without a
traceback, and exit with status 1.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from engine.cli import curate, datasets, init, report  # noqa: F401  (each registers its verbs)
from engine.cli.common import app, err

__all__ = ["app", "main"]


def main() -> None:
    from engine.errors import Interrupted, UserError
    from store import StoreError

    try:
        app()
    except Interrupted as e:
        err.print(f"[yellow]interrupted:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(130)
    except (UserError, StoreError) as e:
        for line in str(e).splitlines() or [type(e).__name__]:  # a spec with several problems: one line each
            err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(1)
