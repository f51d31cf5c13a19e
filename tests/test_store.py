"""The store's real behaviour on real files: commits, idempotence, references, SQL lockdown, failures."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import store
from store import catalog as catalog_mod


def examples(n: int = 3, offset: int = 0) -> pa.Table:
    """Rows shaped like the engine's: per-token top-k ids and float16 logprobs."""
    lengths = [(i % 3) + 1 for i in range(offset, offset + n)]
    return pa.table({
        "prompt_id": [f"p{i}" for i in range(offset, offset + n)],
        "category": ["factual" if i % 2 else "analytical" for i in range(offset, offset + n)],
        "split": ["train"] * n,
        "token_ids": pa.array([list(range(10, 10 + k)) for k in lengths], pa.list_(pa.int32())),
        "topk_ids": pa.array([[[t, t + 1] for t in range(10, 10 + k)] for k in lengths],
                             pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array([[np.array([-0.25, -1.5], np.float16)] * k for k in lengths],
                                  pa.list_(pa.list_(pa.float16()))),
    })


def rejections(n: int = 1) -> pa.Table:
    return pa.table({"prompt_id": [f"r{i}" for i in range(n)], "stage": ["dedup"] * n,
                     "reason": ["exact duplicate"] * n})


def lineage(spec_hash: str = "h1", **extra) -> dict:
    return {"spec_text": "name: demo\n", "spec_hash": spec_hash, "teacher": "smollm2@abc",
            "code_version": "0.1.0", "stats": {"kept": 3}, **extra}


@pytest.fixture
def s(tmp_path):
    return store.open(tmp_path / ".syllabus")


def test_open_creates_layout(tmp_path):
    s = store.open(tmp_path / "st")
    assert s.root == (tmp_path / "st").resolve()
    for sub in ("catalog.sqlite", "data", "models", "staging", "cache"):
        assert (s.root / sub).is_dir() or (s.root / sub).is_file()
    assert s.versions() == []


def test_reopening_a_store_keeps_its_versions_tags_models_and_data(tmp_path):
    s = store.open(tmp_path / "st")
    s.commit("demo", {"examples": examples(3), "rejections": rejections(2)}, lineage(), parent=None)
    s.commit("demo", {"examples": examples(4)}, lineage("h2"), parent=1)
    s.tag("demo@1", "prod")
    s.record_model(dataset="demo", version=2, run_id="r1", student="tiny", path=s.root / "models" / "r1" / "tiny",
                   spec_hash="h2", metrics={"steps": 3})
    files = {p: p.stat().st_mtime_ns for p in (s.root / "data").rglob("*.parquet")}

    again = store.open(tmp_path / "st")  # a later session (or another process) opens the same folder
    assert [(v.ref, v.parent, v.spec_hash, v.row_counts) for v in again.versions()] == [
        ("demo@1", None, "h1", {"examples": 3, "rejections": 2}), ("demo@2", 1, "h2", {"examples": 4})]
    assert again.tags() == {"demo@prod": 1} and again.resolve("demo@prod").version == 1
    assert [(m["ref"], m["student"], m["metrics"]) for m in again.models()] == [("demo@2", "tiny", {"steps": 3})]
    assert again.read("demo@1", "examples").equals(s.read("demo@1", "examples"))
    assert again.read("demo@2", "examples")["prompt_id"].to_list() == ["p0", "p1", "p2", "p3"]
    assert {p: p.stat().st_mtime_ns for p in (again.root / "data").rglob("*.parquet")} == files  # nothing rewritten
    # And it goes on where it left off: the next commit is demo@3 on top of demo@2.
    assert again.commit("demo", {"examples": examples(5)}, lineage("h3"), parent=2) == store.CommitResult(3, True)


def test_commit_two_versions_and_read_back(s):
    assert s.latest_version("demo") is None and s.datasets() == []
    r1 = s.commit("demo", {"examples": examples(3), "rejections": rejections(1)}, lineage(), parent=None)
    assert r1 == store.CommitResult(version=1, created=True)
    r2 = s.commit("demo", {"examples": examples(5), "rejections": rejections(0)}, lineage("h2", note="x"), parent=1)
    assert r2 == store.CommitResult(version=2, created=True)
    assert s.latest_version("demo") == 2 and s.datasets() == ["demo"]

    v1, v2 = s.versions("demo")
    assert (v1.version, v1.parent, v2.version, v2.parent) == (1, None, 2, 1)
    assert v2.ref == "demo@2" and v2.spec_hash == "h2" and v2.teacher == "smollm2@abc"
    assert v2.code_version == "0.1.0" and v2.stats == {"kept": 3} and v2.spec_text == "name: demo\n"
    assert v2.lineage["note"] == "x"  # extra lineage keys are kept
    assert v1.row_counts == {"examples": 3, "rejections": 1}
    assert v2.row_counts == {"examples": 5, "rejections": 0}
    assert v2.created.endswith("+00:00")
    assert all(p.is_absolute() and p.exists() for ps in v2.files.values() for p in ps)

    df = s.read("demo@1", "examples")
    assert df.height == 3 and df["prompt_id"].to_list() == ["p0", "p1", "p2"]
    assert df.schema["topk_logprobs"] == pl.List(pl.List(pl.Float16))
    assert s.read("demo", "examples").height == 5
    empty = s.read("demo@2", "rejections")
    assert empty.height == 0 and empty.columns == ["prompt_id", "stage", "reason"]
    with pytest.raises(store.StoreError, match=r"demo@2 has no table 'nope' \(tables: examples, rejections\)"):
        s.read("demo@2", "nope")


def test_identical_commit_is_not_a_new_version(s):
    s.commit("demo", {"examples": examples(3)}, lineage(), parent=None)
    # Same content, even chunked differently and with a stale parent: no new version.
    chunked = pa.concat_tables([examples(3).slice(0, 1), examples(3).slice(1)])
    assert s.commit("demo", {"examples": chunked}, lineage(), parent=None) == store.CommitResult(1, False)
    assert len(s.versions("demo")) == 1
    # A different spec_hash or teacher over the same files is a new version.
    assert s.commit("demo", {"examples": examples(3)}, lineage("h2"), parent=1) == store.CommitResult(2, True)
    assert s.commit("demo", {"examples": examples(3)}, {**lineage("h2"), "teacher": "t2"}, parent=2).created
    assert len(s.versions("demo")) == 3


def test_parent_mismatch_raises_parent_moved(s):
    s.commit("demo", {"examples": examples(3)}, lineage(), parent=None)
    s.commit("demo", {"examples": examples(4)}, lineage(), parent=1)
    with pytest.raises(store.ParentMoved, match=r"expected parent demo@1 but the latest is demo@2"):
        s.commit("demo", {"examples": examples(5)}, lineage(), parent=1)
    with pytest.raises(store.ParentMoved, match=r"expected to be the first version but the latest is demo@2"):
        s.commit("demo", {"examples": examples(5)}, lineage(), parent=None)
    with pytest.raises(store.ParentMoved, match=r"'other' has no versions, but this commit expected parent other@1"):
        s.commit("other", {"examples": examples(5)}, lineage(), parent=1)
    assert issubclass(store.ParentMoved, store.StoreError)
    assert [v.version for v in s.versions()] == [1, 2]


def test_resolve_forms_and_errors(s):
    with pytest.raises(store.StoreError, match=r"no dataset 'demo' in store .* \(datasets: none yet\)"):
        s.resolve("demo")
    s.commit("demo", {"examples": examples(3)}, lineage(), parent=None)
    s.commit("demo", {"examples": examples(4)}, lineage(), parent=1)
    s.commit("alpha", {"examples": examples(1)}, lineage(), parent=None)
    assert s.resolve("demo").version == 2
    assert s.resolve("demo@latest").version == 2
    assert s.resolve("demo@1").version == 1
    assert s.resolve("alpha").ref == "alpha@1"
    with pytest.raises(store.StoreError) as e:
        s.resolve("foo")
    assert str(e.value) == f"no dataset 'foo' in store {s.root} (datasets: alpha, demo)"
    with pytest.raises(store.StoreError) as e:
        s.resolve("demo@9")
    assert str(e.value) == "dataset 'demo' has no version 9 (latest is 2)"
    for bad in ("demo@", "@3", "demo@1@2", ""):
        with pytest.raises(store.StoreError) as e:
            s.resolve(bad)
        assert str(e.value) == f"bad version reference {bad!r}: use NAME, NAME@N, NAME@latest or NAME@TAG"
    with pytest.raises(store.StoreError) as e:
        s.resolve("demo@x")
    assert str(e.value) == "dataset 'demo' has no version or tag 'x' (tags: none)"
    with pytest.raises(store.StoreError, match="no dataset 'foo'"):
        s.versions("foo")
    assert [v.ref for v in s.versions()] == ["demo@1", "demo@2", "alpha@1"]


def test_files_are_content_addressed_and_reused(s):
    import hashlib

    s.commit("demo", {"examples": examples(3), "rejections": rejections(2)}, lineage(), parent=None)
    v1 = s.resolve("demo@1")
    for table, paths in v1.files.items():
        (p,) = paths
        assert p.parent == s.root / "data" / "demo" / table
        assert p.name == hashlib.sha256(p.read_bytes()).hexdigest() + ".parquet"
        assert not os.access(p, os.W_OK) or os.geteuid() == 0  # read-only on disk
    before = {p: p.stat().st_mtime_ns for ps in v1.files.values() for p in ps}

    # v2 changes examples only: rejections is the very same file, untouched.
    s.commit("demo", {"examples": examples(4), "rejections": rejections(2)}, lineage(), parent=1)
    v2 = s.resolve("demo@2")
    assert v2.files["rejections"] == v1.files["rejections"]
    assert v2.files["examples"] != v1.files["examples"]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert len(list((s.root / "data" / "demo" / "rejections").iterdir())) == 1
    assert list((s.root / "staging").iterdir()) == []  # staging is cleaned after a commit


def test_sql_views_and_tokens(s):
    ex = examples(5)
    s.commit("demo", {"examples": ex, "rejections": rejections(2)}, lineage(), parent=None)
    assert s.sql("SELECT count(*) AS n FROM examples", at="demo@1")["n"].to_pylist() == [5]
    assert s.sql("SELECT count(*) AS n FROM rejections", at="demo")["n"].to_pylist() == [2]

    generated = sum(len(t) for t in ex["token_ids"].to_pylist())
    assert s.sql("SELECT count(*) AS n FROM tokens", at="demo@1")["n"].to_pylist() == [generated]
    tok = s.sql("SELECT * FROM tokens WHERE prompt_id = 'p2' ORDER BY position", at="demo@1")
    assert tok.column_names == ["prompt_id", "split", "category", "position", "token_id", "topk_ids", "topk_logprobs"]
    assert tok["position"].to_pylist() == [0, 1, 2]
    assert tok["token_id"].to_pylist() == [10, 11, 12]
    assert tok["topk_ids"].to_pylist() == [[10, 11], [11, 12], [12, 13]]
    assert tok["topk_logprobs"].to_pylist()[0] == [-0.25, -1.5]  # float16 read back exactly

    # float16 logprobs are usable in arithmetic (DuckDB reads them as FLOAT).
    p = s.sql("SELECT round(sum(exp(topk_logprobs[1])), 4) AS p FROM tokens", at="demo@1")["p"][0].as_py()
    assert p == pytest.approx(generated * np.exp(-0.25), rel=1e-3)
    assert s.sql("SELECT 1 + 1 AS two")["two"].to_pylist() == [2]  # plain SQL without a version


def test_sql_tokens_view_adapts_to_columns(s):
    t = pa.table({"prompt_id": ["a"], "token_ids": pa.array([[1, 2]], pa.list_(pa.int32()))})
    s.commit("mini", {"examples": t}, lineage(), parent=None)
    tok = s.sql("SELECT * FROM tokens", at="mini")
    assert tok.column_names == ["prompt_id", "position", "token_id"] and tok.num_rows == 2


@pytest.mark.parametrize("query", [
    "COPY (SELECT 1) TO '{out}/x.csv'",
    "COPY examples TO '{file}' (FORMAT parquet, use_tmp_file false)",
    "ATTACH '{out}/x.duckdb' AS x",
    "ATTACH ':memory:' AS m",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO examples SELECT * FROM examples",
    "DROP VIEW examples",
    "SET enable_external_access = true",
    "EXPORT DATABASE '{out}/exp'",
    "INSTALL httpfs",
    "SELECT 1; CREATE TABLE t AS SELECT 1",
    "EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{file}' (FORMAT parquet, use_tmp_file false)",
    "/* plan */ explain (analyse) CREATE TABLE t AS SELECT 1",
])
def test_sql_refuses_writes(s, tmp_path, query):
    s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)
    file = s.resolve("demo").files["examples"][0]
    before = file.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(store.StoreError):
        s.sql(query.format(out=out, file=file), at="demo@1")
    assert list(out.iterdir()) == [] and file.read_bytes() == before


def test_plain_explain_still_shows_a_plan(s):
    s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)
    assert s.sql("EXPLAIN SELECT count(*) FROM examples", at="demo@1").num_rows >= 1


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/*')",
    "SELECT * FROM read_parquet('{other}')",
])
def test_sql_reads_only_the_version(s, query):
    s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)
    s.commit("demo", {"examples": examples(3, offset=10)}, lineage(), parent=1)  # shares no row, so no file
    other = s.resolve("demo@1").files["examples"][0]
    assert other not in s.resolve("demo@2").files["examples"]
    with pytest.raises(store.StoreError, match="Permission Error"):
        s.sql(query.format(other=other), at="demo@2")


def test_sql_errors_are_one_line(s):
    s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)
    with pytest.raises(store.StoreError) as e:
        s.sql("SELEC 1", at="demo")
    assert str(e.value).startswith("Parser Error") and "\n" not in str(e.value)
    with pytest.raises(store.StoreError, match="Catalog Error") as e:
        s.sql("SELECT * FROM nope", at="demo")
    assert "\n" not in str(e.value)
    with pytest.raises(store.StoreError, match="read-only: CREATE statements are refused"):
        s.sql("CREATE TABLE t (a INT)")
    with pytest.raises(store.StoreError, match="no dataset 'nope'"):
        s.sql("SELECT 1", at="nope")


def test_failed_commit_leaves_no_version(s, monkeypatch):
    s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # an interrupt after the version row was inserted

    monkeypatch.setattr(catalog_mod, "insert_files", boom)
    with pytest.raises(KeyboardInterrupt):
        s.commit("demo", {"examples": examples(3)}, lineage(), parent=1)
    with pytest.raises(KeyboardInterrupt):
        s.commit("fresh", {"examples": examples(3)}, lineage(), parent=None)
    monkeypatch.undo()

    assert [v.ref for v in s.versions()] == ["demo@1"]
    assert s.resolve("demo").version == 1
    # The store still works and numbering continues from the last visible version.
    assert s.commit("demo", {"examples": examples(3)}, lineage(), parent=1) == store.CommitResult(2, True)


def test_failed_file_write_leaves_no_version(s, monkeypatch):
    from store import files

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "place", boom)
    with pytest.raises(OSError, match="disk full"):
        s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)
    assert s.versions() == [] and list((s.root / "staging").iterdir()) == []


def test_concurrent_commits_from_two_processes(s):
    # Two processes race to commit on top of nothing: exactly one wins, the other sees ParentMoved.
    code = (
        "import sys, pyarrow as pa, store\n"
        "s = store.open(sys.argv[1])\n"
        "t = pa.table({'prompt_id': [sys.argv[2]]})\n"
        "try:\n"
        "    print(s.commit('demo', {'examples': t}, {'spec_hash': sys.argv[2], 'teacher': 't'}, None).version)\n"
        "except store.ParentMoved:\n"
        "    print('moved')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(store.__file__)))}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(s.root), name], stdout=subprocess.PIPE, text=True, env=env)
             for name in ("a", "b")]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["1", "moved"]
    assert [v.version for v in s.versions("demo")] == [1]


def test_bad_input_is_refused(s):
    with pytest.raises(store.StoreError, match="dataset name 'a/b' is not allowed"):
        s.commit("a/b", {"examples": examples(1)}, lineage(), parent=None)
    with pytest.raises(store.StoreError, match="table name '1x' is not allowed"):
        s.commit("demo", {"1x": examples(1)}, lineage(), parent=None)
    with pytest.raises(store.StoreError, match="not JSON-serialisable"):
        s.commit("demo", {"examples": examples(1)}, {"stats": {"x": object()}}, parent=None)
    with pytest.raises(store.StoreError, match="has no tables"):
        s.commit("demo", {}, lineage(), parent=None)
    assert s.versions() == []


def test_polars_frames_commit_too(s):
    df = pl.DataFrame({"prompt_id": ["a", "b"], "x": [1, 2]})
    assert s.commit("demo", {"examples": df}, lineage(), parent=None).created
    assert s.read("demo", "examples").equals(df)


def test_record_and_list_models(s):
    s.commit("demo", {"examples": examples(2)}, lineage(), parent=None)
    folder = s.root / "models" / "run1" / "tiny"
    folder.mkdir(parents=True)
    s.record_model(dataset="demo", version=1, run_id="run1", student="tiny", path=folder,
                   spec_hash="h1", metrics={"accuracy": 0.5})
    s.record_model(dataset="demo", version=1, run_id="run1", student="drop6", path=folder.parent / "drop6",
                   spec_hash="h1", metrics={"accuracy": 0.7})
    s.record_model(dataset="demo", version=1, run_id="run1", student="tiny", path=folder,
                   spec_hash="h1", metrics={"accuracy": 0.6})  # re-recorded: replaced, not duplicated
    rows = s.models("demo", 1)
    assert [(r["student"], r["metrics"]["accuracy"]) for r in rows] == [("tiny", 0.6), ("drop6", 0.7)]
    assert rows[0]["path"] == folder and rows[0]["ref"] == "demo@1" and rows[0]["run_id"] == "run1"
    assert s.models("demo", 2) == [] and len(s.models()) == 2
    with pytest.raises(store.StoreError, match="dataset 'demo' has no version 5"):
        s.record_model(dataset="demo", version=5, run_id="r", student="s", path=folder, spec_hash="h", metrics={})


def test_store_does_not_import_engine():
    out = subprocess.run([sys.executable, "-c", "import sys, store; print('engine' in sys.modules)"],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(store.__file__)))
    assert out.stdout.strip() == "False"
