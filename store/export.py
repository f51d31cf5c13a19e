"""Export a version: JSONL chat messages (what TRL and fine-tuning services read), Parquet, or a
Hugging Face `datasets` folder (save_to_disk; `datasets.load_from_disk` opens it).

Outputs appear whole or not at all: written beside the target under a temporary name, then renamed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from .errors import StoreError

FORMATS = ("jsonl", "parquet", "hf")


@dataclass
class ExportResult:
    ref: str
    format: str
    path: Path
    rows: int


def export(store, ref: str, fmt: str, out: Path, *, table: str = "examples", split: str | None = None,
           system: str | None = None) -> ExportResult:
    if fmt not in FORMATS:
        raise StoreError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    info = store.resolve(ref)
    out = Path(out)
    if out.exists() and (out.is_dir() and any(out.iterdir())):
        raise StoreError(f"{out} exists and is not empty: choose another --out or remove it")
    if fmt == "jsonl":
        for column in ("prompt", "response"):
            if column not in _columns(store, info, table):
                raise StoreError(f"{info.ref}:{table} has no '{column}' column for chat messages")
    if split is not None and "split" not in _columns(store, info, table):
        raise StoreError(f"{info.ref}:{table} has no 'split' column to filter by")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        if fmt == "jsonl":
            rows = _jsonl(store, info, table, split, system, tmp)
        else:
            frame = store.read(info, table)
            if split is not None:
                frame = frame.filter(pl.col("split") == split)
            rows = frame.height
            if fmt == "parquet":
                frame.write_parquet(tmp, compression="zstd")
            else:
                _hf(frame, tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return ExportResult(info.ref, fmt, out, rows)


def _columns(store, info, table: str) -> list[str]:
    from .layout import file_schema
    if table not in info.segments:
        raise StoreError(f"{info.ref} has no table '{table}' (tables: {', '.join(sorted(info.segments))})")
    return [c.split(":")[0] for c in file_schema(info.segments[table][0].path).split(";")]


def _jsonl(store, info, table, split, system, path: Path) -> int:
    """One line per example: {"messages": [system?, user: prompt, assistant: response]}, in prompt_id order."""
    rows = 0
    frame = store.read(info, table, columns=[c for c in ("prompt_id", "split", "prompt", "response")
                                             if c in _columns(store, info, table)])
    if split is not None:
        frame = frame.filter(pl.col("split") == split)
    with open(path, "w", encoding="utf-8") as f:
        for prompt, response in zip(frame["prompt"].to_list(), frame["response"].to_list()):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            rows += 1
        f.flush()
        os.fsync(f.fileno())
    return rows


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
        if pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_large_binary(t):
            return pa.binary()
        if pa.types.is_large_list(t) or pa.types.is_list(t):
            return pa.list_(plain(t.value_type))
        return t
    return table.cast(pa.schema([pa.field(f.name, plain(f.type), f.nullable) for f in table.schema]))
