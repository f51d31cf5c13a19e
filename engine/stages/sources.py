"""Sources: prompts from JSONL, CSV, Parquet and text files, `datasets` folders, inline lists, and store versions.

Every source becomes rows with a stable prompt_id. Malformed rows (bad JSON, missing or
empty text, not UTF-8, text over max_chars) are collected with their line and reason:
up to the source's `max_bad_rows` they go to `rejections` and the run goes on; beyond it
the run stops before any teacher call, with one line listing the first few.

A `datasets` folder (Dataset or DatasetDict.save_to_disk; `split:` picks one split) is read
as an Arrow table, like Parquet: its bad rows are named by row number.

Text files and inline lists have no columns: each line or item is a prompt, and
`category:` names the category of every row instead of a column.

`from: students:RUN_ID/STUDENT` reads the version that student was trained on as `from: NAME@V` does;
its rows (origin "student") carry which row of that version each one is, and teach has the student
answer them and the teacher score the answers (engine/stages/student_source.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import polars as pl

from engine.errors import StageError
from engine.spec import NOT_DATASETS, datasets_layout, datasets_split
from engine.stages.base import (
    REJECTION_SCHEMA,
    RunContext,
    Stage,
    dump,
    file_digests,
    pinned,
    prompt_id,
    rejections,
)

ROW_SCHEMA = {
    "prompt_id": pl.String,
    "parent_id": pl.String,
    "source": pl.String,
    "category": pl.String,
    "template_id": pl.String,
    "origin": pl.String,  # source | template | teacher | student: how the prompt (student: its answer) was made
    "prompt": pl.String,
    "label": pl.String,
}

SHOWN_BAD_ROWS = 3  # bad rows an error message lists; the count says how many there are
RAW_PREVIEW_CHARS = 200  # a rejected raw line is kept this long in rejections.prompt
COLUMNLESS_FORMATS = ("text", "inline")


@dataclass(frozen=True)
class Record:
    """One raw row of a source: its fields, or why they could not be read."""

    where: str  # "line 4" in a text file, "row 4" in Parquet, a datasets folder or a store version, "item 4" inline
    raw: bytes  # the row as read: a rejection shows it and hashes it
    fields: dict | None = None
    problem: str | None = None


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str
    raw: bytes

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class SourceRead:
    name: str  # how messages name the source: its file, or sources[i] (inline)
    rows: list[dict] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)


# --- readers: path or query -> Records ------------------------------------------------


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _lines(path: Path) -> Iterator[tuple[int, bytes, str | None]]:
    """(line number, raw bytes without the newline, decoded text or None) per line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM is not part of the first row
                raw = raw[3:]
            yield lineno, raw, _decode(raw)


def _records_jsonl(path: Path, src) -> Iterator[Record]:
    for lineno, raw, line in _lines(path):
        where = f"line {lineno}"
        if line is None:
            yield Record(where, raw, problem="not UTF-8")
        elif line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield Record(where, raw, problem=f"invalid JSON ({e.msg})")
                continue
            except ValueError:  # json reads integers through int(), which has a length limit
                yield Record(where, raw, problem=f"invalid JSON (an integer over {sys.get_int_max_str_digits()} digits)")
                continue
            except RecursionError:
                yield Record(where, raw, problem="invalid JSON (nested too deeply)")
                continue
            if isinstance(value, dict):
                yield Record(where, raw, fields=value)
            else:
                yield Record(where, raw, problem=f"expected a JSON object, got {_json_type(value)}")


def _json_type(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "null")


def _records_text(path: Path, src) -> Iterator[Record]:
    for lineno, raw, line in _lines(path):
        if line is None:
            yield Record(f"line {lineno}", raw, problem="not UTF-8")
        elif line.strip():
            yield Record(f"line {lineno}", raw, fields={"text": line})


def _records_csv(path: Path, src) -> Iterator[Record]:
    # surrogateescape keeps undecodable bytes, so one bad row does not sink the file.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise StageError(f"{path}: line 1: invalid CSV header ({e})") from None
    if header is None:
        return
    _require_columns(src, header, str(path))
    start = reader.line_num
    while True:
        try:
            values = next(reader, None)
        except csv.Error as e:
            raise StageError(f"{path}: line {start + 1}: invalid CSV ({e})") from None
        if values is None:
            return
        raw_text = "".join(lines[start : reader.line_num]).rstrip("\r\n")
        raw, where = raw_text.encode("utf-8", errors="surrogateescape"), f"line {start + 1}"
        start = reader.line_num
        if not values or not any(v.strip() for v in values):
            continue  # a blank line
        if _decode(raw) is None:
            yield Record(where, raw, problem="not UTF-8")
        elif len(values) > len(header):
            yield Record(where, raw, problem=f"{len(values)} fields but the header has {len(header)} (an unquoted comma?)")
        else:
            yield Record(where, raw, fields=dict(zip(header, values)))


def _records_parquet(path: Path, src) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        _require_columns(src, parquet.schema_arrow.names, str(path))
        columns = _mapped_columns(src, parquet.schema_arrow.names)
        yield from _batch_records(parquet.iter_batches(columns=columns, batch_size=4096))
    except (pa.ArrowException, OSError) as e:
        raise StageError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _records_datasets(path: Path, src) -> Iterator[Record]:
    if datasets_layout(path) is None:
        raise StageError(f"{path} {NOT_DATASETS}" if path.is_dir() else
                         f"{path}: format datasets needs a folder written by save_to_disk, not a file")
    try:
        split = datasets_split(path, src.split)
    except ValueError as e:
        raise StageError(f"{path}: {e}") from None
    try:
        import datasets  # here, not at the top: it takes a second to import and most specs never need it
    except ImportError:
        raise StageError(f"{path}: reading a datasets folder needs the `datasets` package (pip install datasets)") from None
    import pyarrow as pa

    try:
        dataset = datasets.load_from_disk(str(path))
        dataset = dataset[split] if split else dataset
        table = dataset.data.table  # memory-mapped Arrow: no copy (save_to_disk wrote any selection out flat)
        _require_columns(src, table.column_names, str(path))
        table = _class_names(table.select(_mapped_columns(src, table.column_names)), dataset.features, src)
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        raise StageError(f"{path}: not a readable datasets folder ({_first_line(e)})") from None
    yield from _batch_records(table.to_batches(max_chunksize=4096))


def _class_names(table, features, src):
    """A ClassLabel column stores class ids; as a category or gold label the spec means the names (-1: none)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    for column in dict.fromkeys(c for c in (src.category, src.label) if c):
        feature = features.get(column)
        if isinstance(feature, datasets.ClassLabel):
            ids = table[column]
            names = pa.array(feature.names, pa.string()).take(pc.if_else(pc.less(ids, 0), pa.scalar(None, ids.type), ids))
            table = table.set_column(table.column_names.index(column), column, names)
    return table


def _batch_records(batches) -> Iterator[Record]:
    """Records of Arrow record batches, numbered by row: a table has no lines."""
    number = 0
    for batch in batches:
        for fields in batch.to_pylist():
            number += 1
            yield Record(f"row {number}", _raw_of(fields), fields=fields)


def _records_store(src, store, name: str, at: str | None = None, extra: tuple[str, ...] = ()) -> Iterator[Record]:
    """The examples of version `at` (default: the source's `from:`) that `where:` keeps, its mapped columns
    and the `extra` ones it has."""
    if store is None:
        raise StageError(f"{name}: from: no store to read {src.from_} from")
    at = at or src.from_
    available = _store_sql(store, "SELECT * FROM examples LIMIT 0", at, f"{name}: from").column_names
    _require_columns(src, available, name)
    columns = _mapped_columns(src, available) + [c for c in extra if c in available]
    selected = ", ".join(_quote(c) for c in dict.fromkeys(columns))
    where = f" WHERE ({src.where})" if src.where else ""
    table = _store_sql(store, f"SELECT {selected} FROM examples{where}", at, f"{name}: where")
    for number, fields in enumerate(table.to_pylist(), start=1):
        yield Record(f"row {number}", _raw_of(fields), fields=fields)


def _store_sql(store, query: str, at: str, context: str):
    from store import StoreError

    try:
        return store.sql(query, at=at)
    except StoreError as e:
        raise StageError(f"{context}: {e}") from None


def _records_student(src, store, name: str, index: int, spec) -> Iterator[Record]:
    """The rows of the version the student was trained on, as `from: NAME@V` reads them, with their prompt_id
    (which teach reads the student's context by)."""
    from engine.stages.student_source import trained_student

    if store is None:
        raise StageError(f"{name}: from: no store to read {src.from_} from")
    trained = trained_student(spec, store, index, src)
    return _records_store(src, store, name, at=trained["dataset"], extra=("prompt_id",))


def _records_inline(src) -> Iterator[Record]:
    for number, item in enumerate(src.inline, start=1):
        yield Record(f"item {number}", item.encode("utf-8", errors="surrogateescape"), fields={"text": item})


def _mapped_columns(src, available) -> list[str]:
    return [c for c in dict.fromkeys((src.text, src.category, src.label)) if c is not None and c in available]


def _require_columns(src, available, name: str) -> None:
    """Tables with a header must hold the mapped columns: say so once, not once per row."""
    for role in ("text", "category", "label"):
        column = getattr(src, role)
        if column is not None and column not in available:
            raise StageError(f"{name}: no {role} column {column!r} (columns: {', '.join(map(str, available)) or 'none'})")


def _raw_of(fields: dict) -> bytes:
    return json.dumps(fields, ensure_ascii=False, default=str).encode("utf-8", errors="surrogateescape")


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --- records -> rows -------------------------------------------------------------------


def _text_problem(value, column: str | None, max_chars: int) -> str | None:
    """Why a prompt text is unusable, or None; `column` is None for text files and inline lists."""
    subject = f"{column!r} text" if column else "text"
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"empty {subject}"
    if not isinstance(value, str):
        return f"{column!r} is not text (got {type(value).__name__})"
    if len(value.strip()) > max_chars:
        return f"{subject} is {len(value.strip())} characters (max_chars is {max_chars})"
    return None


def _cell(value) -> str | None:
    return None if value is None or value == "" else str(value)


def _to_row(src, record: Record, index: int = 0) -> dict | str:
    """A row of ROW_SCHEMA, or the reason this record is a bad row."""
    columnless = _kind(src) in COLUMNLESS_FORMATS
    column = "text" if columnless else src.text
    fields = record.fields
    if column not in fields:
        return f"no {column!r} field"
    problem = _text_problem(fields[column], None if columnless else column, src.max_chars)
    if problem:
        return problem
    text = fields[column].strip()
    pid = prompt_id(text)
    student = _student_fields(src, fields, index)
    return {**student,
        "prompt_id": pid,
        "parent_id": pid,
        "source": src.origin,
        "category": src.category if columnless else _cell(fields.get(src.category)) if src.category else None,
        "template_id": None,
        "origin": "student" if student else "source",
        "prompt": text,
        "label": None if columnless or not src.label else _cell(fields.get(src.label)),
    }


def _student_fields(src, fields: dict, index: int) -> dict:
    """A student source's row: which source it is (its student and settings) and which row of the version
    it was trained on (teach reads the student's context there)."""
    if src.student is None:
        return {}
    from engine.stages.student_source import SOURCE_INDEX, STUDENT_ROW

    return {SOURCE_INDEX: index, STUDENT_ROW: _cell(fields.get("prompt_id"))}


def _kind(src) -> str:
    if src.inline is not None:
        return "inline"
    if src.student is not None:
        return "student"
    if src.from_ is not None:
        return "store"
    return src.source_format


def _source_name(src, index: int, path: Path | None) -> str:
    return str(path) if path is not None else f"sources[{index}] ({src.origin})"


def read_source(src, *, path: Path | None = None, store=None, index: int = 0, spec=None) -> SourceRead:
    """Read one source into good rows and bad rows, stopping after `limit` good rows (spec: the spec whose
    sources[index] it is, which a student source checks its student against)."""
    name = _source_name(src, index, path)
    kind = _kind(src)
    if kind in ("inline", "text") and src.label:
        raise StageError(f"{name}: label: a {kind} source has no columns to take a label from")
    read, seen_columns = SourceRead(name), {}
    try:
        for record in _records(src, kind, path, store, name, index, spec):
            seen_columns.update(dict.fromkeys(record.fields or ()))
            row = record.problem or _to_row(src, record, index)
            if isinstance(row, str):
                read.bad.append(BadRow(record.where, row, record.raw))
                continue
            read.rows.append(row)
            if src.limit is not None and len(read.rows) >= src.limit:
                break
    except OSError as e:  # a folder, a name too long for the OS, no permission: one line, not a traceback
        raise StageError(f"{name}: cannot read the source ({e.strerror or e})") from None
    if kind == "jsonl" and seen_columns:
        _require_columns(src, seen_columns, name)  # no header: a column no row has is a typo in the spec
    return read


def _records(src, kind: str, path: Path | None, store, name: str, index: int = 0, spec=None) -> Iterator[Record]:
    if kind == "inline":
        return _records_inline(src)
    if kind == "student":
        return _records_student(src, store, name, index, spec)
    if kind == "store":
        return _records_store(src, store, name)
    if path is None or not path.exists():  # a folder is there, but unreadable: said by the caller
        raise StageError(f"{path or src.path}: no such source file")
    if kind == "datasets":  # a folder: its size says nothing
        return _records_datasets(path, src)
    if path.stat().st_size == 0:
        raise StageError(f"{path}: source file is empty")
    readers = {"jsonl": _records_jsonl, "csv": _records_csv, "parquet": _records_parquet, "text": _records_text}
    return readers[kind](path, src)


def check_bad_rows(src, read: SourceRead) -> None:
    """Stop the run when a source has more bad rows than it tolerates, or nothing usable."""
    shown = "; ".join(str(b) for b in read.bad[:SHOWN_BAD_ROWS])
    if len(read.bad) > src.max_bad_rows:
        count = f"{len(read.bad)} bad row{'s' if len(read.bad) != 1 else ''}"
        raise StageError(f"{read.name}: {count} (max_bad_rows is {src.max_bad_rows}): {shown}")
    if not read.rows:
        raise StageError(f"{read.name}: no usable rows ({shown})" if read.bad else f"{read.name}: source has no rows")


def bad_row_rejections(src, read: SourceRead, stage: str) -> pl.DataFrame:
    """Tolerated bad rows as rejections: the raw line (truncated), identified by its hash."""
    if not read.bad:
        return pl.DataFrame(schema=REJECTION_SCHEMA)
    frame = pl.DataFrame({
        "prompt_id": [hashlib.sha256(b.raw).hexdigest() for b in read.bad],
        "source": [src.origin] * len(read.bad),
        "prompt": [_preview(b.raw) for b in read.bad],
    })
    return rejections(frame, stage, pl.Series([str(b) for b in read.bad], dtype=pl.String))


def _preview(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace")
    return text if len(text) <= RAW_PREVIEW_CHARS else text[: RAW_PREVIEW_CHARS - 1] + "…"


def _content_digest(spec, src) -> dict:
    """What a source's rows are read from: its file, or every file of its datasets folder."""
    if src.source_format != "datasets":
        return file_digests(spec, [src.path])
    from engine.models import (
        folder_digest,  # the model fingerprint's: each file, by content
    )

    folder = spec.resolve_path(src.path)
    return {src.path: folder_digest(folder) if folder.is_dir() else "missing"}


class Sources(Stage):
    name = "sources"
    order = 10

    def cache_slice(self, spec, store):
        return [[dump(s), _content_digest(spec, s), _pinned(spec, store, i, s)] for i, s in enumerate(spec.sources)]

    def cheap(self, spec, frame) -> bool:
        return True

    def run(self, frame: pl.DataFrame | None, ctx: RunContext):
        spec = ctx.spec
        rows, rejected, bad_rows = [], [], 0
        for index, src in enumerate(spec.sources):
            path = spec.resolve_path(src.path) if src.path is not None else None
            read = read_source(src, path=path, store=ctx.store, index=index, spec=spec)
            check_bad_rows(src, read)
            rows.extend(read.rows)
            rejected.append(bad_row_rejections(src, read, self.name))
            bad_rows += len(read.bad)
        all_rows = pl.DataFrame(rows, schema=_row_schema(spec))
        is_first = all_rows["prompt_id"].is_first_distinct()
        kept, dupes = all_rows.filter(is_first), all_rows.filter(~is_first)
        rejected.append(rejections(dupes, self.name, "duplicate of an earlier prompt"))
        stats = {"read": all_rows.height + bad_rows, "kept": kept.height, "duplicates": dupes.height, "bad_rows": bad_rows}
        if any(src.student is not None for src in spec.sources):  # lineage: which run, student, data, teacher
            from engine.stages.student_source import student_lineage

            stats["students"] = student_lineage(spec, ctx.store)
        return kept, pl.concat(rejected), stats


def _pinned(spec, store, index: int, src):
    """A store version pinned to its number; a student source: its version and the student's weights."""
    if src.student is None:
        return pinned(store, src.from_)
    from engine.stages.student_source import student_pin

    return student_pin(spec, store, index, src)


def _row_schema(spec) -> dict:
    """ROW_SCHEMA, plus what teach needs of a student source's rows (never committed)."""
    if all(src.student is None for src in spec.sources):
        return ROW_SCHEMA
    from engine.stages.student_source import STUDENT_COLUMNS

    return {**ROW_SCHEMA, **STUDENT_COLUMNS}
