"""Read-only DuckDB SQL over one version's Parquet files.

Two locks, because either alone leaks:
- DuckDB's own: `enable_external_access=false` with `allowed_paths` = the version's files, then
  `lock_configuration`. Nothing outside those files can be read, written, attached or loaded, and
  the query cannot undo the settings. But allowed paths are writable too (COPY ... TO one of them
  with use_tmp_file false overwrites it), and in-memory CREATE/INSERT still work.
- Ours: the query is parsed first and only SELECT-like statements (SELECT, WITH, FROM, VALUES,
  DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) are run.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import StoreError

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


def run_sql(query: str, tables: dict[str, list[Path]] | None = None) -> pa.Table:
    """Run one read-only statement; `tables` (name -> files) become views, plus `tokens`."""
    statement = _parse(query)
    con = duckdb.connect(":memory:")
    try:
        files = [str(p) for paths in (tables or {}).values() for p in paths]
        for name, paths in (tables or {}).items():
            con.execute(f"CREATE VIEW {_quote(name)} AS SELECT * FROM read_parquet({_list(paths)})")
        if "examples" in (tables or {}):
            _tokens_view(con)
        _lock(con, files)
        return con.sql(statement.query).to_arrow_table()
    except duckdb.Error as e:
        raise StoreError(_first_line(e)) from None
    finally:
        con.close()


def tokens_view_sql(columns: list[str]) -> str | None:
    """The `tokens` view over `examples` with these columns, or None without token_ids."""
    if "token_ids" not in columns:
        return None
    keys = [c for c in _TOKEN_KEYS if c in columns]
    lists = [f"{expr} AS {name}" for name, expr in _TOKEN_LISTS.items()
             if name in ("position", "token_id") or name in columns]
    return f"CREATE VIEW tokens AS SELECT {', '.join(keys + lists)} FROM examples"


def _tokens_view(con: duckdb.DuckDBPyConnection) -> None:
    columns = [r[0] for r in con.execute("DESCRIBE examples").fetchall()]
    sql = tokens_view_sql(columns)
    if sql:
        con.execute(sql)


def _lock(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    # Views read their files lazily, so those exact paths must stay reachable.
    con.execute(f"SET allowed_paths = {_list(files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def _parse(query: str) -> duckdb.Statement:
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
    return statement


def _list(paths) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
