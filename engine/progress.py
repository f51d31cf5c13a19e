"""One progress-bar look for every long step: description, bar, count, elapsed, ETA."""

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description:<11}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not enabled,
    )
