"""Read-only DuckDB SQL over versions' Parquet files.

Views: the tables of the version bound by `at` (`examples`, `rejections`, ... and `tokens`), and
any version by name, `<dataset>_v<N>_<table>`, `<dataset>_latest_<table>` or `<dataset>_<tag>_<table>`,
created only for the names the query mentions; `syllabus_versions` lists every version.

A view reads its files through `read_parquet`; a file shared with a parent that lost some rows
in this version carries a deletion vector, applied as an anti-join on `file_row_number`.

Two locks, each enough alone to keep the store unchanged:
- The statement: exactly one, parsed by DuckDB, of type SELECT (SELECT, WITH, FROM, VALUES,
  DESCRIBE, SHOW, SUMMARIZE), or a plain EXPLAIN of one. EXPLAIN takes no options: ANALYZE, in any
  spelling (`("analyze")`, `(ANALYZE true)`, `analyse`), runs the statement it explains.
- The connection cannot write a file. DuckDB sees the version's files only as
  `syllabus://<dataset>/<table>/<sha256>.parquet` on a filesystem whose open() refuses every mode
  but "rb"; its local filesystem is disabled (no path on disk can be read or written, temp
  spill files included), external access is off with only those names allowed, and the
  configuration is locked. `allowed_paths` alone is not enough: DuckDB lets a query write to the
  paths it may read (COPY ... TO one of them with use_tmp_file false overwrites it).
Since DuckDB never receives a path on disk, settings and errors show no absolute path of the store.
Each query runs under a time limit (interrupted by a timer) and a memory limit (no spilling).
"""

from __future__ import annotations

import datetime
import io
import os
import threading
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa

from .errors import StoreError
from .layout import Segment

TIMEOUT_S = 60.0
MEMORY_LIMIT = "50%"  # of the machine's RAM; DuckDB parses '4GB', '512MiB', '50%'
_PROTOCOL = "syllabus"
_SELECT = duckdb.StatementType.SELECT

# Columns of `examples` carried onto each token row, when the version has them.
_TOKEN_KEYS = ("prompt_id", "split", "category", "finish_reason")
# One row per generated token: unnest() calls in one SELECT zip their lists together.
# Positions are 0-based; topk_ids / topk_logprobs are the lists at that position.
_TOKEN_LISTS = {
    "position": "unnest(range(len(token_ids)))",
    "token_id": "unnest(token_ids)",
    "topk_ids": "unnest(topk_ids)",
    "topk_logprobs": "unnest(topk_logprobs)",
}


class Refused(StoreError):
    """A statement `sql` does not run: not read-only, or more than one."""


class QueryStopped(StoreError):
    """A query ran past its time limit."""


def run_sql(query: str, views: dict[str, list[Segment]] | None = None,
            extra_tables: dict[str, pa.Table] | None = None, *,
            timeout: float | None = TIMEOUT_S, memory_limit: str | None = MEMORY_LIMIT) -> pa.Table:
    """Run one read-only statement; `views` (name -> segments) become views, `examples`-like ones
    (named `examples` or `*_examples`) get a matching `tokens` view. `timeout` in seconds (None: no
    limit), `memory_limit` as DuckDB reads it ('4GB', '50%')."""
    if timeout is not None and not timeout > 0:
        raise StoreError(f"timeout must be a positive number of seconds (got {timeout})")
    text = parse(query)
    con = connect(views, extra_tables, memory_limit=memory_limit)
    try:
        return _run(con, text, timeout)
    finally:
        con.close()


def parse(query: str) -> str:
    """The text to run for `query`, or Refused: one SELECT, or `EXPLAIN <one SELECT>`."""
    statements = _statements(query)
    if len(statements) != 1:
        raise Refused(f"sql runs exactly one statement (got {len(statements)})")
    (text, kind), = statements
    if kind == _SELECT:
        return text
    if kind == duckdb.StatementType.EXPLAIN:
        return _plain_explain(text)
    raise Refused(f"sql is read-only: {kind.name.replace('_', ' ')} statements are refused (use SELECT)")


def _statements(query: str) -> list[tuple[str, duckdb.StatementType]]:
    try:
        return [(st.query, st.type) for st in duckdb.extract_statements(query)]
    except duckdb.Error as e:
        raise StoreError(_first_line(e)) from None
    except ValueError:  # a statement type the Python enum lacks (UPDATE EXTENSIONS is one)
        raise Refused("sql is read-only: this kind of statement is refused (use SELECT)") from None


def _plain_explain(text: str) -> str:
    # Whatever follows the EXPLAIN keyword must itself be one SELECT, so options (where ANALYZE
    # hides, spelled or quoted any way the parser accepts) never pass; and what runs is rebuilt
    # from the checked SELECT, not the text the user wrote.
    tokens = duckdb.tokenize(text)
    words = [i for i, (_, kind) in enumerate(tokens) if kind != duckdb.token_type.comment]
    if len(words) >= 2 and words[0] + 1 < len(tokens):
        first, after = tokens[words[0]][0], tokens[words[0] + 1][0]
        if text[first:after].strip().upper() == "EXPLAIN":
            try:
                inner = [(st.query, st.type) for st in duckdb.extract_statements(text[after:])]
            except (duckdb.Error, ValueError):
                inner = []
            if len(inner) == 1 and inner[0][1] == _SELECT:
                return "EXPLAIN " + inner[0][0]
    raise Refused("sql is read-only: EXPLAIN takes no options (EXPLAIN ANALYZE runs the statement);"
                  " use EXPLAIN SELECT ...")


def connect(views: dict[str, list[Segment]] | None = None, extra_tables: dict[str, pa.Table] | None = None,
            *, memory_limit: str | None = MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the views, then locked so that nothing it runs can write a file."""
    con = duckdb.connect(":memory:")
    try:
        files: dict[str, Path] = {}  # filled as views are made: a view reads its files' schema when created
        con.register_filesystem(_ReadOnlyFiles(files, skip_instance_cache=True))
        dv = 0
        for name, segments in (views or {}).items():
            files.update({_name(s.path): Path(s.path) for s in segments})
            parts = []
            plain = [_url(s.path) for s in segments if s.live_mask() is None]
            if plain or not segments:
                parts.append(f"SELECT * FROM read_parquet({_list(plain)})")
            for seg in segments:
                if seg.live_mask() is None:
                    continue
                dv += 1
                con.register("_dv_src", pa.table({"pos": pa.array(seg.deleted.astype("int64"))}))
                con.execute(f"CREATE TABLE _dv{dv} AS SELECT pos FROM _dv_src")
                con.unregister("_dv_src")
                parts.append(f"SELECT * EXCLUDE (file_row_number) FROM read_parquet({_list([_url(seg.path)])},"
                             f" file_row_number=true) WHERE file_row_number NOT IN (SELECT pos FROM _dv{dv})")
            con.execute(f"CREATE VIEW {quote(name)} AS {' UNION ALL '.join(parts)}")
        for name, table in (extra_tables or {}).items():
            con.register("_extra_src", table)
            con.execute(f"CREATE TABLE {quote(name)} AS SELECT * FROM _extra_src")
            con.unregister("_extra_src")
        for name in list(views or {}):
            if name == "examples" or name.endswith("_examples"):
                tokens = name[: -len("examples")] + "tokens"
                if tokens not in (views or {}):
                    _tokens_view(con, name, tokens)
        _lock(con, [_url(p) for p in files.values()], memory_limit)
    except duckdb.Error as e:
        con.close()
        raise StoreError(_first_line(e)) from None
    except BaseException:
        con.close()
        raise
    return con


def _lock(con: duckdb.DuckDBPyConnection, urls: list[str], memory_limit: str | None) -> None:
    if memory_limit is not None:
        try:
            con.execute("SET memory_limit = ?", [memory_limit])
        except duckdb.Error as e:
            raise StoreError(f"memory limit {memory_limit!r}: {_first_line(e)}") from None
    con.execute("SET temp_directory = ''")  # no spill files; also drops the cwd from allowed_directories
    con.execute("SET disabled_filesystems = 'LocalFileSystem'")  # no path on disk, read or write
    con.execute(f"SET allowed_paths = {_list(urls)}")  # views read their files lazily
    con.execute("SET enable_external_access = false")
    con.execute("SET python_enable_replacements = false")  # no reading the caller's Python variables
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def _run(con: duckdb.DuckDBPyConnection, text: str, timeout: float | None) -> pa.Table:
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(timeout, stop) if timeout is not None else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        return con.sql(text).to_arrow_table()
    except duckdb.Error as e:
        if fired.is_set() and isinstance(e, duckdb.InterruptException):
            raise QueryStopped(f"query stopped after {timeout:g} s (the time limit: --timeout,"
                               " or timeout= in Python)") from None
        raise StoreError(_first_line(e)) from None
    finally:
        if timer:
            timer.cancel()


class _ReadOnlyFiles(fsspec.AbstractFileSystem):
    """The only filesystem a query's DuckDB has: the views' files by store-relative name, read-only.

    Writing goes through open() with a mode other than "rb", refused here; the base class's
    rm, mv and cp are unimplemented and raise too."""

    protocol = _PROTOCOL

    def __init__(self, files: dict[str, Path], **kwargs):
        super().__init__(**kwargs)
        self.files = files

    def _path(self, path: str) -> Path:
        name = self._strip_protocol(path)
        if name not in self.files:
            raise FileNotFoundError(path)
        return self.files[name]

    def _open(self, path, mode="rb", **kwargs):
        if mode != "rb":
            raise PermissionError(f"{path} is read-only")
        return _SharedReader(self._path(path))

    def info(self, path, **kwargs):
        st = os.stat(self._path(path))
        return {"name": self._strip_protocol(path), "size": st.st_size, "type": "file", "mtime": st.st_mtime}

    def modified(self, path):
        return datetime.datetime.fromtimestamp(os.stat(self._path(path)).st_mtime)

    def ls(self, path, detail=True, **kwargs):
        return [self.info(n) if detail else n for n in self.files]


class _SharedReader(io.RawIOBase):
    """A read-only file that DuckDB's threads read at once. DuckDB reads at an offset as a seek,
    then a read, each taking the GIL apart, so with one shared position a thread can read where
    another one seeked (seen as "TProtocolException: Invalid data"). Here each thread keeps its
    own position and reads with pread."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._at = threading.local()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return getattr(self._at, "pos", 0)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._at.pos = offset + {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._size}[whence]
        return self._at.pos

    def read(self, size: int = -1) -> bytes:
        pos = self.tell()
        size = self._size - pos if size is None or size < 0 else size
        chunks = []
        while size > 0 and (chunk := os.pread(self._fd, size, pos)):
            chunks.append(chunk)
            pos, size = pos + len(chunk), size - len(chunk)
        self._at.pos = pos
        return b"".join(chunks)

    def write(self, data) -> int:
        raise PermissionError("the store's files are read-only")

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _name(path) -> str:
    return "/".join(Path(path).parts[-3:])  # <dataset>/<table>/<sha256>.parquet


def _url(path) -> str:
    return f"{_PROTOCOL}://{_name(path)}"


def tokens_view_sql(columns: list[str], source: str = "examples", name: str = "tokens") -> str | None:
    """The `tokens` view over `examples` with these columns, or None without token_ids."""
    if "token_ids" not in columns:
        return None
    keys = [c for c in _TOKEN_KEYS if c in columns]
    lists = [f"{expr} AS {col}" for col, expr in _TOKEN_LISTS.items()
             if col in ("position", "token_id") or col in columns]
    return f"CREATE VIEW {quote(name)} AS SELECT {', '.join(keys + lists)} FROM {quote(source)}"


def _tokens_view(con: duckdb.DuckDBPyConnection, source: str, name: str) -> None:
    columns = [r[0] for r in con.execute(f"DESCRIBE {quote(source)}").fetchall()]
    sql = tokens_view_sql(columns, source, name)
    if sql:
        con.execute(sql)


def _list(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def quote(name: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # a Python error raised inside DuckDB: its last line says what
        return lines[-1].strip()
    return lines[0] if lines else type(e).__name__
