"""Export a version: JSONL chat messages (what TRL and fine-tuning services read), Parquet, or a
Hugging Face `datasets` folder (save_to_disk; `datasets.load_from_disk` opens it).

An examples table (one with a `response` column) goes out as chat: `messages` = [system?, user,
assistant: response]. The user turn is a column (`prompt` by default) or texts a caller computes from
the rows, or, per row, the whole list of turns before the answer (a system message, few-shot turns, the
user turn): the store knows nothing of specs, so the engine renders what its students read and passes
that in. With plain=True (a model reading plain text, no chat template) the rows go out as `text` (what
the model read, the user texts) and `completion` (the response) instead of `messages`. jsonl and hf hold
`messages` or `text` and `completion` (plus the META columns with meta=True); parquet holds every
column, token ids and top-k included, plus those. A table without `response` (rejections)
goes out as it is in parquet and hf, and jsonl refuses it.

Outputs appear whole or not at all: written beside the target under a temporary name, then renamed.
The target may not lie inside the store (nor hold it), and replaces an existing file or `hf`
folder only with force=True.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import pyarrow as pa

from .errors import StoreError

FORMATS = ("jsonl", "parquet", "hf")
# Beside `messages` with meta=True, those the table has, in this order (conf_* in table order).
META = ("prompt_id", "category", "split", "label", "conf_*", "finish_reason")

# The user turn: a column of the table, or a function from the exported rows (their non-list
# columns, in export order) to one text per row, or to one list of {"role", "content"} turns per row
# (everything before the assistant's answer).
UserTurn = str | Callable[[pl.DataFrame], Sequence[str | list[dict]]]


@dataclass
class ExportResult:
    ref: str
    format: str
    path: Path
    rows: int


def export(store, ref: str, fmt: str, out: Path, *, table: str = "examples", split: str | None = None,
           user: UserTurn = "prompt", system: str | None = None, meta: bool = False,
           force: bool = False, plain: bool = False) -> ExportResult:
    if fmt not in FORMATS:
        raise StoreError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    info = store.resolve(ref)
    out = Path(out).expanduser()
    _check_target(Path(store.root), out, force)
    schema = _schema(info, table)
    chat = "response" in schema
    if chat or fmt == "jsonl":
        for column in ([user] if isinstance(user, str) else []) + ["response"]:
            if column not in schema:
                raise StoreError(f"{info.ref}:{table} has no '{column}' column for chat messages")
    if split is not None and "split" not in schema:
        raise StoreError(f"{info.ref}:{table} has no 'split' column to filter by")
    scalar = [c for c, t in schema.items() if not t.is_nested()]  # token lists are no user turn's business
    # jsonl and hf carry only the chat (and meta): the token lists, most of the bytes, stay unread.
    frame = store.read(info, table, columns=None if fmt == "parquet" or not chat else scalar)
    if split is not None:
        frame = frame.filter(pl.col("split") == split)
    if chat:
        if plain and system:
            raise StoreError("a system message needs a chat: plain text has none")
        columns = _plain(frame.select(scalar), user) if plain else [_messages(frame.select(scalar), user, system)]
        frame = frame.with_columns(columns) if fmt == "parquet" else pl.DataFrame(
            [*columns, *(frame[c] for c in _meta_columns(scalar) if meta)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        if fmt == "jsonl":
            _jsonl(frame, tmp)
        elif fmt == "parquet":
            frame.write_parquet(tmp, compression="zstd")
        else:
            _hf(frame, tmp)
        if out.exists() or out.is_symlink():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return ExportResult(info.ref, fmt, out, frame.height)


def _check_target(root: Path, out: Path, force: bool) -> None:
    # Resolved, so that a symlink or `..` cannot lead into the store; a target holding the store
    # (`--out .`) is refused too, as --force would replace the folder the store lives in.
    target, root = out.resolve(), root.resolve()
    if target == root or root in target.parents or target in root.parents:
        raise StoreError(f"--out {out} is inside the store folder or holds it: export elsewhere")
    if not (out.exists() or out.is_symlink()):
        return
    full = out.is_dir() and not out.is_symlink() and any(out.iterdir())
    if not force:
        raise StoreError(f"--out {out} exists{' and is not empty' if full else ''}:"
                         " choose another path, or --force to replace it")
    if full and not (out / "dataset_info.json").exists():  # --force never deletes a folder of the user's
        raise StoreError(f"--out {out} is a folder but not an hf export: not replacing it, even with --force")


def _schema(info, table: str) -> dict[str, pl.DataType]:
    if table not in info.segments:
        raise StoreError(f"{info.ref} has no table '{table}' (tables: {', '.join(sorted(info.segments))})")
    return dict(pl.read_parquet_schema(info.segments[table][0].path))


def _meta_columns(columns: list[str]) -> list[str]:
    return [c for m in META for c in columns if (c.startswith("conf_") if m == "conf_*" else c == m)]


def _user_texts(rows: pl.DataFrame, user: UserTurn) -> list:
    texts = rows[user].to_list() if isinstance(user, str) else list(user(rows))
    if len(texts) != rows.height:
        raise StoreError(f"the user turn gave {len(texts)} texts for {rows.height} rows")
    return texts


def _plain(rows: pl.DataFrame, user: UserTurn) -> list[pl.Series]:
    """`text` (what the model read, as it read it) and `completion` (the response) per row."""
    texts = _user_texts(rows, user)
    if any(not isinstance(t, str) for t in texts):
        raise StoreError("plain text takes one text per row, not turns")
    return [pl.Series("text", texts, dtype=pl.String), rows["response"].cast(pl.String).alias("completion")]


MESSAGE = pl.Struct({"role": pl.String, "content": pl.String})


def _messages(rows: pl.DataFrame, user: UserTurn, system: str | None) -> pl.Series:
    """[system?, user, assistant] per row, as list<struct<role, content>>; where the caller gives the turns
    before the answer, [system?, *those turns, assistant]."""
    found = _user_texts(rows, user)
    if any(not isinstance(t, str) for t in found):
        head = [{"role": "system", "content": system}] if system else []
        chats = [head + [{"role": m["role"], "content": m["content"]} for m in turns]
                 + [{"role": "assistant", "content": answer}] for turns, answer in zip(found, rows["response"])]
        return pl.Series("messages", chats, dtype=pl.List(MESSAGE))
    texts = pl.Series(found, dtype=pl.String)

    def turn(role: str, content: pl.Expr) -> pl.Expr:
        return pl.struct(pl.lit(role).alias("role"), content.cast(pl.String).alias("content"))
    turns = ([turn("system", pl.lit(system))] if system else []) + [
        turn("user", pl.lit(texts)), turn("assistant", pl.col("response"))]
    return rows.select(pl.concat_list(turns).alias("messages"))["messages"]


def _jsonl(frame: pl.DataFrame, path: Path) -> None:
    """One line per example: {"messages": [...], meta...}, in prompt_id order."""
    frame = frame.with_columns(pl.col(pl.Float32, pl.Float64).fill_nan(None))  # NaN is not JSON: null
    with open(path, "w", encoding="utf-8") as f:
        for row in frame.iter_rows(named=True):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _hf(frame: pl.DataFrame, path: Path) -> None:
    try:
        import datasets
    except ImportError:
        raise StoreError("--format hf needs the `datasets` package (pip install datasets)") from None
    table = _plain_types(frame.to_arrow())
    datasets.Dataset(table).save_to_disk(str(path))


def _plain_types(table: pa.Table) -> pa.Table:
    """large_string / large_list (polars' Arrow) -> string / list, the types `datasets` features map to."""
    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_large_binary(t):
            return pa.binary()
        if pa.types.is_large_list(t) or pa.types.is_list(t):
            return pa.list_(plain(t.value_type))
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, plain(f.type), f.nullable) for f in t])
        return t
    return table.cast(pa.schema([pa.field(f.name, plain(f.type), f.nullable) for f in table.schema]))
