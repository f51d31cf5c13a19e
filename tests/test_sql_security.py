"""`sql` cannot change the store nor write anywhere: the statement check, the locked connection under
it (tested with the check bypassed), time and memory limits, no store path in settings; `sql`'s
output formats; `export`'s target checks. After each attack the store verifies clean and no file
appeared or changed outside the store's cache."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet  # noqa: F401 - pa.parquet
import pytest
from typer.testing import CliRunner

import store
from engine.cli import app
from store import sql as store_sql
from test_store import examples, lineage


@pytest.fixture
def s(tmp_path, monkeypatch):
    st = store.open(tmp_path / "st")
    rej = pa.table({"prompt_id": ["r0"], "stage": ["dedup"], "reason": ["exact duplicate"]})
    st.commit("demo", {"examples": examples(5), "rejections": rej}, lineage(), parent=None)
    st.commit("demo", {"examples": examples(4), "rejections": rej}, lineage("h2"), parent=1)  # a deletion vector
    assert any(seg.live_mask() is not None for seg in st.resolve("demo@2").segments["examples"])
    (tmp_path / "out").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # relative paths in a query land here
    return st


def snapshot(tmp_path: Path) -> dict[str, bytes]:
    """Every file under tmp_path but the store's cache (reads may refresh their stat stamps)."""
    return {str(p): p.read_bytes() for p in sorted(tmp_path.rglob("*"))
            if p.is_file() and "cache" not in p.relative_to(tmp_path).parts[:2]}


def assert_untouched(s, tmp_path: Path, before: dict[str, bytes]) -> None:
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(before), set(after) ^ set(before)
    assert all(after[k] == before[k] for k in before)
    report = s.verify()
    assert report.ok and report.catalog == "ok"


def targets(s, tmp_path: Path) -> dict[str, str]:
    file = s.resolve("demo@1").files["examples"][0]
    return {"file": str(file), "name": store_sql._url(file), "out": str(tmp_path / "out")}


COPY = "COPY (SELECT 42 AS x) TO '{file}' (FORMAT parquet, use_tmp_file false)"
REFUSED = [
    COPY, "COPY examples TO '{out}/x.csv'", "COPY examples TO 'x.csv'", "COPY examples FROM '{file}'",
    "COPY (SELECT 1 AS x) TO '{name}' (FORMAT parquet, use_tmp_file false)",
    "EXPORT DATABASE '{out}/exp'", "IMPORT DATABASE '{out}'", "COPY FROM DATABASE memory TO m (SCHEMA)",
    "ATTACH '{out}/x.duckdb' AS x", "ATTACH ':memory:' AS m", "DETACH memory", "USE memory",
    "INSTALL httpfs", "FORCE INSTALL json", "LOAD parquet", "LOAD '{out}/x.duckdb_extension'", "UPDATE EXTENSIONS",
    "CREATE TABLE t AS SELECT 1", "CREATE OR REPLACE VIEW examples AS SELECT 1", "CREATE MACRO m(a) AS a",
    "CREATE SECRET s (TYPE s3)", "CREATE SEQUENCE q", "CREATE TYPE t AS ENUM ('a')",
    "INSERT INTO examples SELECT * FROM examples", "UPDATE examples SET split = 'x'", "DELETE FROM examples",
    "TRUNCATE examples", "MERGE INTO examples USING examples e ON examples.prompt_id = e.prompt_id WHEN MATCHED THEN DELETE",
    "DROP VIEW examples", "ALTER VIEW examples RENAME TO e", "COMMENT ON VIEW examples IS 'x'",
    "SET enable_external_access = true", "SET disabled_filesystems = ''", "RESET memory_limit", "SET VARIABLE x = 1",
    "PRAGMA enable_profiling", "PRAGMA version", "CALL pragma_version()", "CHECKPOINT", "FORCE CHECKPOINT",
    "VACUUM", "ANALYZE", "BEGIN", "PREPARE p AS SELECT 1", "EXECUTE p", "DEALLOCATE p", "PIVOT examples ON split",
    # more than one statement, or none
    "SELECT 1; " + COPY, "SELECT 1; SELECT 2", COPY + "; SELECT 1", "", ";", "-- nothing",
    # EXPLAIN ANALYZE runs what it explains: every spelling, comments, options
    "EXPLAIN ANALYZE " + COPY, 'EXPLAIN ("analyze") ' + COPY, "EXPLAIN (ANALYZE) " + COPY,
    "EXPLAIN (ANALYZE true) " + COPY, "EXPLAIN (ANALYZE 1) " + COPY, "explain analyse " + COPY,
    "EXPLAIN /* x */ ANALYZE " + COPY, "EXPLAIN -- x\n ANALYZE " + COPY,
    "/* plan */ explain (analyse) CREATE TABLE t AS SELECT 1", "EXPLAIN (FORMAT json, ANALYZE) " + COPY,
    "EXPLAIN ANALYZE SELECT count(*) FROM examples", "EXPLAIN (FORMAT json) SELECT 1", "EXPLAIN " + COPY,
    # a CTE in front of a write is still the write
    "WITH x AS (SELECT 1) INSERT INTO examples SELECT * FROM examples",
    "WITH x AS (SELECT 1) DELETE FROM examples",
]


@pytest.mark.parametrize("query", REFUSED)
def test_writes_are_refused(s, tmp_path, query):
    before = snapshot(tmp_path)
    with pytest.raises(store_sql.Refused) as e:
        s.sql(query.format(**targets(s, tmp_path)), at="demo@1")
    assert "\n" not in str(e.value) and ("read-only" in str(e.value) or "exactly one statement" in str(e.value))
    assert_untouched(s, tmp_path, before)


@pytest.mark.parametrize("query", ['EXPLAIN ("ANALYSE") ' + COPY, "EXPLAIN EXPLAIN SELECT 1", "SELEC 1"])
def test_what_does_not_parse_is_a_one_line_error(s, tmp_path, query):
    before = snapshot(tmp_path)
    with pytest.raises(store.StoreError) as e:
        s.sql(query.format(**targets(s, tmp_path)), at="demo@1")
    assert "\n" not in str(e.value)
    assert_untouched(s, tmp_path, before)


@pytest.mark.parametrize("query", [
    "SELECT * FROM query('COPY (SELECT 1) TO ''{out}/q.csv''')",
    "SELECT * FROM enable_logging(storage='file', storage_path='{out}/log.csv')",
    "SELECT * FROM read_parquet('{file}')", "SELECT * FROM read_text('{file}')", "SELECT * FROM glob('{out}/*')",
    "FROM '{out}/x.csv'", "SELECT * FROM checkpoint()", "SELECT * FROM force_checkpoint()",
    "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM glob('syllabus://**')",
])
def test_select_type_functions_cannot_write(s, tmp_path, query):
    """Table functions run inside a SELECT; whatever they try, the connection has no writable file."""
    before = snapshot(tmp_path)
    try:
        s.sql(query.format(**targets(s, tmp_path)), at="demo@1")
    except store.StoreError as e:
        assert "\n" not in str(e)
    assert_untouched(s, tmp_path, before)


BYPASS = [
    COPY, "COPY (SELECT 1 AS x) TO '{name}' (FORMAT parquet, use_tmp_file false)",
    "COPY (SELECT 1 AS x) TO '{name}' (FORMAT parquet)", "COPY examples TO '{out}/x.csv'", "COPY examples TO 'x.csv'",
    "COPY examples TO '.tmp/x.csv'", "EXPORT DATABASE '{out}/exp'", "EXPORT DATABASE 'exp'",
    "ATTACH '{out}/x.duckdb' AS x", "INSTALL httpfs", "LOAD '{out}/x.duckdb_extension'",
    "EXPLAIN ANALYZE " + COPY, 'EXPLAIN ("analyze") ' + COPY,
    "SET enable_external_access = true", "SET disabled_filesystems = ''", "RESET disabled_filesystems",
    "SET allowed_directories = ['{out}']", "SET temp_directory = '{out}'", "SET lock_configuration = false",
    "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_parquet('{file}')",
]


def test_connection_cannot_write_even_with_the_check_bypassed(s, tmp_path):
    """The statement check skipped: each write goes straight to the locked connection and fails there."""
    before = snapshot(tmp_path)
    os.makedirs(".tmp")  # DuckDB's default temp directory, relative to the cwd, would be writable
    con = store_sql.connect(dict(s.resolve("demo@2").segments))
    try:
        for query in BYPASS:
            with pytest.raises(duckdb.Error):
                con.execute(query.format(**targets(s, tmp_path)))
        assert con.execute("SELECT count(*) FROM examples").fetchone() == (4,)  # the views still read
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
    finally:
        con.close()
    os.rmdir(".tmp")
    assert_untouched(s, tmp_path, before)


def test_the_reported_attack_via_the_cli(s, tmp_path):
    """The bug report: this exited 0 and overwrote an immutable data file."""
    before = snapshot(tmp_path)
    env = {**os.environ, "SYLLABUS_STORE": str(s.root)}
    exe = str(Path(sys.executable).parent / "syllabus")
    query = 'EXPLAIN ("analyze") ' + COPY.format(**targets(s, tmp_path))
    r = subprocess.run([exe, "sql", query, "--at", "demo@1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == ("error: sql is read-only: EXPLAIN takes no options (EXPLAIN ANALYZE runs the"
                                " statement); use EXPLAIN SELECT ...")
    r = subprocess.run([exe, "verify"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_untouched(s, tmp_path, before)


# One statement of each type DuckDB's parser knows; only SELECT and a plain EXPLAIN run.
STATEMENTS = {
    "SELECT": "SELECT count(*) FROM examples", "EXPLAIN": "EXPLAIN SELECT count(*) FROM examples",
    "INSERT": "INSERT INTO examples SELECT * FROM examples", "UPDATE": "UPDATE examples SET split = 'x'",
    "CREATE": "CREATE TABLE t (a INT)", "DELETE": "DELETE FROM examples", "PREPARE": "PREPARE p AS SELECT 1",
    "EXECUTE": "EXECUTE p", "ALTER": "ALTER VIEW examples RENAME TO e", "TRANSACTION": "BEGIN",
    "COPY": "COPY examples TO 'x.csv'", "VARIABLE_SET": "SET VARIABLE x = 1", "CREATE_FUNC": "CREATE MACRO m(a) AS a",
    "DROP": "DROP VIEW examples", "EXPORT": "EXPORT DATABASE 'x'", "PRAGMA": "PRAGMA version", "VACUUM": "VACUUM",
    "CALL": "CALL pragma_version()", "SET": "SET threads = 1", "LOAD": "LOAD json", "ATTACH": "ATTACH ':memory:' AS m",
    "DETACH": "DETACH m", "MULTI": "PIVOT examples ON split", "COPY_DATABASE": "COPY FROM DATABASE memory TO m (SCHEMA)",
    "MERGE_INTO": "MERGE INTO examples USING examples e ON examples.prompt_id = e.prompt_id WHEN MATCHED THEN DELETE",
}
# Types SQL text does not parse to here: made by the APIs, by parser extensions, or parsed as another
# type (ANALYZE parses as VACUUM, SET VARIABLE as SET, CREATE MACRO as CREATE); those still get an example.
NOT_FROM_TEXT = {"INVALID", "RELATION", "EXTENSION", "LOGICAL_PLAN", "ANALYZE", "VARIABLE_SET", "CREATE_FUNC"}


def test_every_statement_type_but_select_and_explain_is_refused(s, tmp_path):
    before = snapshot(tmp_path)
    members = set(duckdb.StatementType.__members__)
    # A DuckDB with a new statement type fails here until it gets an example above.
    assert members <= set(STATEMENTS) | NOT_FROM_TEXT, members - set(STATEMENTS) - NOT_FROM_TEXT
    for kind, query in STATEMENTS.items():
        if kind not in NOT_FROM_TEXT:
            assert duckdb.extract_statements(query)[0].type.name == kind, query
        if kind in ("SELECT", "EXPLAIN"):
            assert s.sql(query, at="demo@1").num_rows >= 1
        else:
            with pytest.raises(store_sql.Refused, match="read-only"):
                s.sql(query, at="demo@1")
    assert_untouched(s, tmp_path, before)


def test_files_read_from_many_threads_keep_a_position_each(tmp_path):
    """DuckDB reads at an offset as seek, then read, each taking the GIL apart: a thread seeking
    between another's seek and read must not move where that other one reads."""
    import threading

    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)))
    f = store_sql._SharedReader(path)
    seeked, moved = threading.Event(), threading.Event()
    got = {}

    def a():
        f.seek(10)
        seeked.set()
        moved.wait(5)
        got["a"] = f.read(5)

    def b():
        seeked.wait(5)
        f.seek(200)
        got["b"] = f.read(3)
        moved.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert got == {"a": bytes(range(10, 15)), "b": bytes([200, 201, 202])}
    assert f.seek(-2, io.SEEK_END) == 254 and f.read() == bytes([254, 255]) and f.read(4) == b""
    with pytest.raises(OSError):
        f.write(b"x")
    f.close()


@pytest.mark.parametrize("query", [
    "EXPLAIN SELECT count(*) FROM examples", "explain /* c */ select 1", "EXPLAIN\nFROM examples",
    "EXPLAIN (SELECT 1)", "EXPLAIN WITH a AS (SELECT 1) SELECT * FROM a", "/* c */ EXPLAIN SELECT 1;",
])
def test_plain_explain_shows_the_plan(s, query):
    plan = s.sql(query, at="demo@1")
    assert plan["explain_key"].to_pylist()[0] == "physical_plan"


@pytest.mark.parametrize("query", [
    "SELECT count(*) AS n FROM examples", "WITH x AS (SELECT * FROM examples) SELECT count(*) FROM x",
    "FROM examples SELECT count(*)", "DESCRIBE examples", "SHOW TABLES", "SUMMARIZE examples", "VALUES (1)",
    "SELECT 1 UNION ALL SELECT 2", "SELECT count(*) FROM tokens", "SELECT count(*) FROM demo_v1_examples",
])
def test_select_like_statements_run(s, query):
    assert s.sql(query, at="demo@2").num_rows >= 1


def test_python_variables_are_not_tables():
    secret = pa.table({"a": [1]})  # DuckDB's Python client can scan a caller's variable by name
    con = store_sql.connect()
    try:
        with pytest.raises(duckdb.CatalogException):
            con.sql("SELECT * FROM secret").fetchall()
    finally:
        con.close()
    assert secret.num_rows == 1


def test_time_limit(s):
    t0 = time.monotonic()
    with pytest.raises(store_sql.QueryStopped, match=r"^query stopped after 1 s \(the time limit: --timeout"):
        s.sql("SELECT count(*) FROM range(10000000000000)", timeout=1)
    assert time.monotonic() - t0 < 6
    r = CliRunner().invoke(app, ["sql", "SELECT count(*) FROM range(10000000000000)", "--timeout", "0.5",
                                 "--store", str(s.root)])
    assert r.exit_code == 1 and str(r.exception).startswith("query stopped after 0.5 s")
    with pytest.raises(store.StoreError, match="timeout must be a positive number"):
        s.sql("SELECT 1", timeout=0)
    assert s.version("demo@1").sql("SELECT count(*) AS n FROM examples", timeout=None)["n"][0] == 5


def test_memory_limit(s):
    with pytest.raises(store.StoreError, match="^Out of Memory Error") as e:
        s.sql("SELECT list(range) FROM range(100000000)", memory_limit="20MB")
    assert "\n" not in str(e.value)
    with pytest.raises(store.StoreError, match="^memory limit 'lots': "):
        s.sql("SELECT 1", memory_limit="lots")
    r = CliRunner().invoke(app, ["sql", "SELECT list(range) FROM range(100000000)", "--memory-limit", "20MB",
                                 "--store", str(s.root)])
    assert r.exit_code == 1 and "Out of Memory" in str(r.exception)


def test_settings_and_errors_show_no_store_path(s, tmp_path, monkeypatch):
    monkeypatch.chdir(s.root)  # the worst case: DuckDB's defaults derive paths from the cwd
    texts = []
    for query in ["SELECT name, value FROM duckdb_settings()",
                  *(f"SELECT current_setting('{name}') AS v" for name in (
                      "allowed_paths", "allowed_directories", "temp_directory", "home_directory",
                      "secret_directory", "extension_directory", "file_search_path")),
                  "SELECT * FROM duckdb_databases()", "SELECT * FROM duckdb_temporary_files()",
                  "SELECT * FROM duckdb_views()", "SELECT * FROM duckdb_tables()", "EXPLAIN SELECT * FROM examples"]:
        texts.append(json.dumps(s.sql(query, at="demo@2").to_pylist(), default=str))
    for query in ["SELECT * FROM read_parquet('data/demo/examples/x.parquet')", "SELECT * FROM 'catalog.sqlite'",
                  "COPY examples TO 'x.csv'"]:
        with pytest.raises(store.StoreError) as e:
            s.sql(query, at="demo@2")
        texts.append(str(e.value))
    assert any("syllabus://demo/examples/" in t for t in texts)  # the files are named, relative to the store
    for text in texts:
        assert str(tmp_path) not in text and str(s.root) not in text


def cli(s, *args):
    return CliRunner().invoke(app, [*args, "--store", str(s.root)])


def test_csv_writes_lists_and_structs_as_json(s):
    r = cli(s, "sql", "SELECT * FROM examples ORDER BY prompt_id", "--at", "demo@1", "--format", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.output)))
    assert len(rows) == 5 and rows[2]["prompt_id"] == "p2"
    assert json.loads(rows[2]["token_ids"]) == [10, 11, 12]
    assert json.loads(rows[2]["topk_logprobs"])[0] == [-0.25, -1.5]
    r = cli(s, "sql", "SELECT {'a': 1, 'b': ['x', NULL]} AS s, NULL::INT[] AS e, 'plain' AS t", "--format", "csv")
    assert r.exit_code == 0, r.output
    row = next(csv.DictReader(io.StringIO(r.output)))
    assert json.loads(row["s"]) == {"a": 1, "b": ["x", None]} and row["e"] == "" and row["t"] == "plain"


def test_unknown_formats_are_one_line_errors(s, tmp_path):
    r = cli(s, "sql", "SELECT 1", "--format", "xml")
    assert r.exit_code == 1 and r.output == "" and str(r.exception) == "unknown --format 'xml': use table, csv, json"
    r = cli(s, "export", "demo@1", "--format", "xml", "--out", str(tmp_path / "out" / "x.xml"))
    assert r.exit_code == 1 and str(r.exception).startswith("unknown export format 'xml'")
    assert list((tmp_path / "out").iterdir()) == []


def test_export_refuses_the_store_and_existing_targets(s, tmp_path):
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    (tmp_path / "link").symlink_to(s.root / "data")
    for target in (s.root / "x.jsonl", s.root / "data" / "demo" / "x.jsonl", s.root,
                   tmp_path / "link" / "x.jsonl", s.root / ".." / "st" / "models" / "x.jsonl"):
        with pytest.raises(store.StoreError, match="inside the store folder or holds it"):
            s.export("demo@1", "jsonl", target, force=True)
    for target in (tmp_path, Path("..")):  # holds the store: --force would have removed it
        with pytest.raises(store.StoreError, match="inside the store folder or holds it"):
            s.export("demo@1", "parquet", target, force=True)
    r = cli(s, "export", "demo@1", "--format", "jsonl", "--out", str(s.root / "x.jsonl"))
    assert r.exit_code == 1 and "\n" not in str(r.exception) and "inside the store" in str(r.exception)
    (tmp_path / "link").unlink()
    assert_untouched(s, tmp_path, before)

    kept = out / "a.parquet"
    kept.write_text("keep me")
    r = cli(s, "export", "demo@1", "--format", "parquet", "--out", str(kept))
    assert r.exit_code == 1 and str(r.exception) == f"--out {kept} exists: choose another path, or --force to replace it"
    assert kept.read_text() == "keep me"
    r = cli(s, "export", "demo@1", "--format", "parquet", "--out", str(kept), "--force")
    assert r.exit_code == 0, r.output
    assert pa.parquet.read_table(kept).num_rows == 5

    folder = out / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(store.StoreError, match="exists and is not empty"):
        s.export("demo@1", "parquet", folder)
    with pytest.raises(store.StoreError, match="not an hf export: not replacing it, even with --force"):
        s.export("demo@1", "parquet", folder, force=True)
    assert (folder / "notes.txt").read_text() == "mine"
    s.export("demo@1", "hf", out / "hf")
    assert s.export("demo@2", "hf", out / "hf", force=True).rows == 4  # an earlier hf export is replaced
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "hf", "mine"]  # no temporary file left behind
