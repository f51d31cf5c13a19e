"""Read-only DuckDB SQL over versions' Parquet files.

Views: the tables of the version bound by `at` (`examples`, `rejections`, ... and `tokens`), and
any version by name, `<dataset>_v<N>_<table>`, `<dataset>_latest_<table>` or `<dataset>_<tag>_<table>`,
created only for the names the query mentions; `syllabus_versions` lists every version.

A view reads its files through `read_parquet`; a file shared with a parent that lost some rows
in this version carries a deletion vector, applied as an anti-join on `file_row_number`.

Two locks, because either alone leaks:
- DuckDB's own: `enable_external_access=false` with `allowed_paths` = the views' files, then
  `lock_configuration`. Nothing outside those files can be read, written, attached or loaded, and
  the query cannot undo the settings. But allowed paths are writable too (COPY ... TO one of them
  with use_tmp_file false overwrites it), and in-memory CREATE/INSERT still work.
- Ours: the query is parsed first and only SELECT-like statements (SELECT, WITH, FROM, VALUES,
  DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) are run.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .errors import StoreError
from .layout import Segment

_READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

# Columns of `examples` carried onto each token row, when the version has them.
_TOKEN_KEYS = ("prompt_id", "split", "category")
# One row per generated token: unnest() calls in one SELECT zip their lists together.
# Positions are 0-based; topk_ids / topk_logprobs are the lists at that position.
_TOKEN_LISTS = {
    "position": "unnest(range(len(token_ids)))",
    "token_id": "unnest(token_ids)",
    "topk_ids": "unnest(topk_ids)",
    "topk_logprobs": "unnest(topk_logprobs)",
}


def run_sql(query: str, views: dict[str, list[Segment]] | None = None,
            extra_tables: dict[str, pa.Table] | None = None) -> pa.Table:
    """Run one read-only statement; `views` (name -> segments) become views, `examples`-like ones
    (named `examples` or `*_examples`) get a matching `tokens` view."""
    statement = parse(query)
    con = duckdb.connect(":memory:")
    try:
        files: list[str] = []
        dv = 0
        for name, segments in (views or {}).items():
            parts = []
            plain = [str(s.path) for s in segments if s.live_mask() is None]
            if plain or not segments:
                parts.append(f"SELECT * FROM read_parquet({_list(plain)})")
            for seg in segments:
                if seg.live_mask() is None:
                    continue
                dv += 1
                con.register("_dv_src", pa.table({"pos": pa.array(seg.deleted.astype("int64"))}))
                con.execute(f"CREATE TABLE _dv{dv} AS SELECT pos FROM _dv_src")
                con.unregister("_dv_src")
                parts.append(f"SELECT * EXCLUDE (file_row_number) FROM read_parquet({_list([seg.path])},"
                             f" file_row_number=true) WHERE file_row_number NOT IN (SELECT pos FROM _dv{dv})")
            files += [str(s.path) for s in segments]
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
        _lock(con, files)
        return con.sql(statement.query).to_arrow_table()
    except duckdb.Error as e:
        raise StoreError(_first_line(e)) from None
    finally:
        con.close()


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


def _lock(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    # Views read their files lazily, so those exact paths must stay reachable.
    con.execute(f"SET allowed_paths = {_list(files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET python_enable_replacements = false")  # no reading the caller's Python variables
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def parse(query: str) -> duckdb.Statement:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise StoreError(_first_line(e)) from None
    if len(statements) != 1:
        raise StoreError(f"sql runs exactly one statement (got {len(statements)})")
    statement = statements[0]
    if statement.type not in _READ_ONLY:
        kind = statement.type.name.replace("_", " ")
        raise StoreError(f"sql is read-only: {kind} statements are refused (use SELECT)")
    if statement.type == duckdb.StatementType.EXPLAIN and "ANALYZE" in _keywords(query):
        # EXPLAIN ANALYZE executes the statement it explains, COPY or CREATE included.
        raise StoreError("sql is read-only: EXPLAIN ANALYZE is refused (plain EXPLAIN shows the plan)")
    return statement


def _keywords(query: str) -> set[str]:
    tokens = duckdb.tokenize(query)
    ends = [start for start, _ in tokens[1:]] + [len(query)]
    return {query[start:end].strip().upper().replace("ANALYSE", "ANALYZE")
            for (start, kind), end in zip(tokens, ends) if kind == duckdb.token_type.keyword}


def _list(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def quote(name: str) -> str:
    """A SQL identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
