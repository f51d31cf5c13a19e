"""Sources: read prompts from JSONL or CSV files into rows with a stable prompt_id.

Bad input stops the run before any teacher call, with one line naming file and line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterator

import polars as pl

from engine.stages.base import RunContext, StageError, prompt_id, rejections

ROW_SCHEMA = {
    "prompt_id": pl.String,
    "parent_id": pl.String,
    "source": pl.String,
    "category": pl.String,
    "template_id": pl.String,
    "origin": pl.String,  # source | template | teacher: how the prompt was made
    "prompt": pl.String,
    "label": pl.String,
}


def _records_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise StageError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise StageError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _records_csv(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise StageError(f"{path}:{line}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for record in reader:
            yield reader.line_num, record
    except csv.Error as e:
        raise StageError(f"{path}:{reader.line_num}: invalid CSV ({e})") from None


def _text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def read_source(src, path: Path) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path}: no such source file")
    reader = _records_jsonl if src.source_format == "jsonl" else _records_csv
    rows, seen_columns = [], set()
    for lineno, record in reader(path):
        seen_columns.update(record)
        text = record.get(src.text)
        if src.text not in record:
            raise StageError(f"{path}:{lineno}: no {src.text!r} field (the source's text column)")
        if not isinstance(text, str) or not text.strip():
            raise StageError(f"{path}:{lineno}: empty or non-text {src.text!r} field")
        pid = prompt_id(text)
        rows.append({
            "prompt_id": pid,
            "parent_id": pid,
            "source": str(path),
            "category": _text(record.get(src.category)) if src.category else None,
            "template_id": None,
            "origin": "source",
            "prompt": text.strip(),
            "label": _text(record.get(src.label)) if src.label else None,
        })
    if not rows:
        raise StageError(f"{path}: source has no rows")
    for role in ("category", "label"):
        column = getattr(src, role)
        if column and column not in seen_columns:
            raise StageError(f"{path}: no row has the {role} column {column!r}")
    return rows


class Sources:
    name = "sources"

    def run(self, frame: pl.DataFrame | None, ctx: RunContext):
        spec = ctx.spec
        rows = []
        for src in spec.sources:
            rows.extend(read_source(src, spec.resolve_path(src.path)))
        all_rows = pl.DataFrame(rows, schema=ROW_SCHEMA)
        is_first = all_rows["prompt_id"].is_first_distinct()
        kept, dupes = all_rows.filter(is_first), all_rows.filter(~is_first)
        stats = {"read": all_rows.height, "kept": kept.height, "duplicates": dupes.height}
        return kept, rejections(dupes, self.name, "duplicate of an earlier prompt"), stats
