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


def open_store(path: Optional[Path]):
    import store

    return store.open(path or Path(os.environ.get("SYLLABUS_STORE", ".syllabus")))
