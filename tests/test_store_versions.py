"""Sharing rows with the parent, tags, multi-version SQL, diff, export, gc and the notebook API."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

import store
from store import layout

LINEAGE = {"spec_text": "name: demo\nmining: {confidence: answer_prob}\n", "spec_hash": "h1", "teacher": "t",
           "code_version": "0", "stats": {"split": {"train": 1}}}


def examples(ids, response="r", label="positive") -> pl.DataFrame:
    ids = list(ids)
    return pl.DataFrame({
        "prompt_id": [f"p{i:05d}" for i in ids],
        "category": ["a" if i % 2 else "b" for i in ids],
        "split": ["train" if i % 4 else "test" for i in ids],
        "prompt": [f"prompt {i}" for i in ids],
        "label": [label] * len(ids),
        "response": [f"{response} {i}" for i in ids],
        "conf_answer_prob": [((i * 37) % 100) / 100 for i in ids],
        "token_ids": [[i, i + 1, i + 2] for i in ids],
        "topk_logprobs": [[[-0.5, -1.0]] * 3 for _ in ids],
    }, schema_overrides={"token_ids": pl.List(pl.Int32), "topk_logprobs": pl.List(pl.List(pl.Float16))})


def rejections() -> pl.DataFrame:
    return pl.DataFrame({"prompt_id": ["x", "y", "x"], "stage": ["mine", "mine", "dedup"],
                         "reason": ["below band", "below band", "exact duplicate"]})


@pytest.fixture
def s(tmp_path):
    return store.open(tmp_path / "st")


def data_bytes(st) -> int:
    return sum(p.stat().st_size for p in (st.root / "data").rglob("*.parquet"))


def test_child_shares_parent_files_and_reads_back_exactly(s, monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_ROWS", (64, 1 << 20))
    monkeypatch.setattr(layout, "CHUNK_BYTES", 200_000)  # several files per version

    def examples(ids, **kw):  # with 64 random token logprobs per row: bytes like real rows have
        frame = globals()["examples"](ids, **kw)
        noise = [np.random.default_rng(i).normal(size=64).astype(np.float32).tolist() for i in ids]
        return frame.with_columns(token_logprobs=pl.Series(noise, dtype=pl.List(pl.Float32)))

    parent = examples(range(2000))
    s.commit("demo", {"examples": parent, "rejections": rejections()}, LINEAGE, parent=None)
    v1 = s.resolve("demo@1")
    assert len(v1.files["examples"]) > 3
    before = data_bytes(s)

    # 1% changed answers, 0.5% removed, 0.5% new, scattered over the whole key range.
    rng = np.random.default_rng(0)
    changed = set(rng.choice(2000, 20, replace=False).tolist())
    removed = set(rng.choice(sorted(set(range(2000)) - changed), 10, replace=False).tolist())
    kept = [i for i in range(2000) if i not in changed | removed]
    child = pl.concat([examples(kept), examples(sorted(changed), response="new"), examples(range(5000, 5010))])
    child = child.sample(fraction=1.0, shuffle=True, seed=1)  # order does not matter
    r = s.commit("demo", {"examples": child, "rejections": rejections()}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    assert r == store.CommitResult(2, True)
    v2 = s.resolve("demo@2")
    added = data_bytes(s) - before
    assert added < 0.05 * before
    parent_files, child_files = set(v1.files["examples"]), set(v2.files["examples"])
    assert child_files - parent_files, "the changed and new rows are written to at least one new file"
    shared = parent_files & child_files
    assert len(shared) >= len(parent_files) - 1, "all of the parent's files but at most one are reused as they are"
    assert v2.files["rejections"] == v1.files["rejections"]
    assert v2.row_counts == {"examples": 2000, "rejections": 3}

    # What comes back is exactly the child, ordered by prompt_id, through every reader.
    expected = child.sort("prompt_id")
    assert s.read("demo@2", "examples").equals(expected)
    assert s.version("demo@2").to_polars().equals(expected)
    got = s.sql("SELECT prompt_id, response FROM examples ORDER BY prompt_id", at="demo@2")
    assert got["response"].to_pylist() == expected["response"].to_list()
    assert s.sql("SELECT count(*) AS n FROM tokens", at="demo@2")["n"][0].as_py() == 3 * 2000
    assert s.read("demo@1", "examples").equals(parent)  # the parent is untouched

    # Identical data again (any order): nothing new, nothing written.
    before = data_bytes(s)
    assert s.commit("demo", {"examples": child.reverse(), "rejections": rejections()},
                    {**LINEAGE, "spec_hash": "h2"}, parent=2) == store.CommitResult(2, False)
    assert data_bytes(s) == before


def test_repeated_small_changes_stay_compact(s, monkeypatch):
    monkeypatch.setattr(layout, "CHUNK_ROWS", (100, 100))  # 100-row files
    rows = list(range(400))
    s.commit("demo", {"examples": examples(rows)}, LINEAGE, parent=None)
    for g in range(1, 25):
        rows = rows[10:] + list(range(1000 * g, 1000 * g + 10))  # drop the oldest 10, add 10
        s.commit("demo", {"examples": examples(rows)}, {**LINEAGE, "spec_hash": str(g)}, parent=g)
        v = s.resolve("demo")
        assert s.read("demo", "examples")["prompt_id"].to_list() == sorted(f"p{i:05d}" for i in rows)
        segs = v.segments["examples"]
        physical = sum(seg.rows for seg in segs)
        assert physical <= 2 * len(rows) + 200  # dead rows are bounded by compaction
        assert len(segs) <= 4 + 2 + layout.MAX_SMALL  # small files of each commit get merged


def test_schema_change_writes_fresh_files(s):
    s.commit("demo", {"examples": examples(range(50))}, LINEAGE, parent=None)
    wider = examples(range(50)).with_columns(extra=pl.lit(1))
    s.commit("demo", {"examples": wider}, LINEAGE, parent=1)
    v1, v2 = s.resolve("demo@1"), s.resolve("demo@2")
    assert not set(v1.files["examples"]) & set(v2.files["examples"])
    assert s.read("demo@2", "examples").equals(wider)


def test_duplicate_rows_are_kept_as_many_times(s):
    t = pl.DataFrame({"prompt_id": ["a", "a", "b"], "stage": ["x", "x", "y"]})
    s.commit("demo", {"rejections": t}, LINEAGE, parent=None)
    t2 = pl.DataFrame({"prompt_id": ["a", "a", "a", "c"], "stage": ["x", "x", "x", "z"]})
    s.commit("demo", {"rejections": t2}, {**LINEAGE, "spec_hash": "2"}, parent=1)
    assert s.read("demo@2", "rejections").equals(t2)
    assert s.read("demo@1", "rejections").equals(t)


def test_tags(s):
    s.commit("demo", {"examples": examples(range(5))}, LINEAGE, parent=None)
    s.commit("demo", {"examples": examples(range(6))}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    info, before = s.tag("demo@1", "prod")
    assert (info.ref, before) == ("demo@1", None)
    assert s.resolve("demo@prod").version == 1 and s.resolve("demo@1").tags == ["prod"]
    assert s.tag("demo@1", "prod")[1] == 1  # same place: fine
    with pytest.raises(store.StoreError, match=r"tag demo@prod already points at demo@1; use --force to move it"):
        s.tag("demo@2", "prod")
    assert s.tag("demo@latest", "prod", force=True)[1] == 1
    assert s.resolve("demo@prod").version == 2 and s.tags() == {"demo@prod": 2}
    for bad in ("latest", "3", "a b", ""):
        with pytest.raises(store.StoreError, match="is not allowed"):
            s.tag("demo@1", bad)
    with pytest.raises(store.StoreError, match=r"dataset 'demo' has no version or tag 'nope' \(tags: prod\)"):
        s.resolve("demo@nope")
    assert s.untag("demo", "prod") == 2 and s.tags() == {}


def test_sql_sees_every_version_by_name(s):
    s.commit("demo", {"examples": examples(range(10)), "rejections": rejections()}, LINEAGE, parent=None)
    s.commit("demo", {"examples": examples(range(5, 12), response="new")}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    s.commit("my-set", {"examples": examples(range(3))}, LINEAGE, parent=None)
    s.tag("demo@1", "prod")
    q = ("SELECT count(*) AS n FROM demo_v1_examples a JOIN demo_v2_examples b USING (prompt_id)"
         " WHERE a.response <> b.response")
    assert s.sql(q)["n"][0].as_py() == 5
    assert s.sql("SELECT count(*) AS n FROM demo_prod_examples")["n"][0].as_py() == 10
    assert s.sql("SELECT count(*) AS n FROM demo_latest_examples")["n"][0].as_py() == 7
    assert s.sql("SELECT count(*) AS n FROM demo_v2_tokens")["n"][0].as_py() == 21
    assert s.sql('SELECT count(*) AS n FROM "my-set_v1_examples"')["n"][0].as_py() == 3
    # Bound views and named ones together.
    q = "SELECT count(*) AS n FROM examples e JOIN demo_v1_examples o USING (prompt_id)"
    assert s.sql(q, at="demo@2")["n"][0].as_py() == 5
    versions = s.sql("SELECT dataset, version, parent, examples, tags FROM syllabus_versions ORDER BY ALL").to_pylist()
    assert versions[0] == {"dataset": "demo", "version": 1, "parent": None, "examples": 10, "tags": ["prod"]}
    assert len(versions) == 3
    with pytest.raises(store.StoreError, match="Catalog Error"):
        s.sql("SELECT * FROM demo_v9_examples")


@pytest.mark.parametrize("query", [
    "UPDATE demo_v1_examples SET label = 'x'",
    "DELETE FROM demo_v1_examples",
    "COPY demo_v1_examples TO '{file}' (FORMAT parquet, use_tmp_file false)",
    "COPY (SELECT * FROM demo_v2_examples) TO '{out}/x.parquet'",
    "ATTACH '{catalog}' AS c (TYPE sqlite)",
    "ATTACH '{out}/x.duckdb' AS x",
    "CREATE VIEW v AS SELECT * FROM demo_v1_examples",
    "CREATE TABLE t AS SELECT * FROM demo_v1_examples",
    "SELECT * FROM read_text('{catalog}')",
    "SELECT * FROM write_csv((SELECT 1), '{out}/y.csv')",
    "CALL pragma_version(); COPY (SELECT 1) TO '{out}/z.csv'",
    "SELECT * FROM sqlite_scan('{catalog}', 'versions')",
    "SELECT * FROM read_parquet('{out}/../st/data/*/*/*.parquet')",
    "LOAD sqlite",
    "PRAGMA enable_external_access",
])
def test_multi_version_sql_is_read_only(s, tmp_path, query):
    s.commit("demo", {"examples": examples(range(10))}, LINEAGE, parent=None)
    s.commit("demo", {"examples": examples(range(20, 25))}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    file = s.resolve("demo@1").files["examples"][0]
    catalog = s.root / "catalog.sqlite"
    before = {p: p.read_bytes() for p in (file, catalog)}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(store.StoreError):
        s.sql(query.format(file=file, out=out, catalog=catalog), at="demo@2")
    assert list(out.iterdir()) == []
    assert all(p.read_bytes() == b for p, b in before.items())
    assert s.verify().ok and [v.version for v in s.versions()] == [1, 2]


def test_diff(s):
    s.commit("demo", {"examples": examples(range(10))}, LINEAGE, parent=None)
    b = pl.concat([examples([0, 1, 2, 3]), examples([4, 5], response="new"), examples([6], label="negative"),
                   examples(range(20, 23))])
    s.commit("demo", {"examples": b}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    d = s.diff("demo@1", "demo@2", sample=2)
    assert d.totals == {"added": 3, "removed": 3, "changed": 3}
    assert d.counts.columns == ["change", "category", "split", "n"] and d.counts["n"].sum() == 9
    assert d.samples["added"]["prompt_id"].to_list() == ["p00020", "p00021"]
    changed = s.diff("demo@1", "demo@2").samples["changed"]
    assert changed.select("prompt_id", "what").to_dicts() == [
        {"prompt_id": "p00004", "what": ["response"]}, {"prompt_id": "p00005", "what": ["response"]},
        {"prompt_id": "p00006", "what": ["label"]}]
    assert changed["response_a"][0] == "r 4" and changed["response_b"][0] == "new 4"
    # The printed query runs as is and gives the same rows.
    assert s.sql(d.query).num_rows == 9
    assert s.version("demo@2").diff("demo@2").totals == {"added": 0, "removed": 0, "changed": 0}


def test_export_formats(s, tmp_path):
    s.commit("demo", {"examples": examples(range(8))}, LINEAGE, parent=None)
    s.commit("demo", {"examples": examples(range(2, 9))}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    expected = s.read("demo@2", "examples")

    r = s.export("demo@2", "jsonl", tmp_path / "x.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert r.rows == 7 and len(lines) == 7
    assert lines[0] == {"messages": [{"role": "user", "content": "prompt 2"}, {"role": "assistant", "content": "r 2"}]}
    r = s.export("demo@2", "jsonl", tmp_path / "t.jsonl", split="train", system="Be brief.")
    first = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert r.rows == expected.filter(pl.col("split") == "train").height
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}

    # parquet: every column as stored, plus the same messages.
    s.export("demo@2", "parquet", tmp_path / "x.parquet")
    parquet = pl.read_parquet(tmp_path / "x.parquet")
    assert parquet.drop("messages").equals(expected)
    assert parquet["messages"].to_list() == [line["messages"] for line in lines]

    # meta: the columns a filter needs beside the messages, never the token lists.
    s.export("demo@2", "jsonl", tmp_path / "m.jsonl", meta=True, user=lambda rows: [p.upper() for p in rows["prompt"]])
    first = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert list(first) == ["messages", "prompt_id", "category", "split", "label", "conf_answer_prob"]
    assert first["messages"][0] == {"role": "user", "content": "PROMPT 2"} and first["conf_answer_prob"] == 0.74

    datasets = pytest.importorskip("datasets")
    s.export("demo@2", "hf", tmp_path / "hf", meta=True)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert ds.num_rows == 7 and ds.column_names == ["messages", "prompt_id", "category", "split", "label", "conf_answer_prob"]
    assert ds[0]["messages"] == lines[0]["messages"] and ds[0]["prompt_id"] == "p00002"

    with pytest.raises(store.StoreError, match="unknown export format 'csv'"):
        s.export("demo@2", "csv", tmp_path / "x.csv")
    with pytest.raises(store.StoreError, match="exists and is not empty"):
        s.export("demo@2", "hf", tmp_path / "hf")


def test_gc_removes_only_what_no_version_uses(s, tmp_path):
    s.commit("demo", {"examples": examples(range(10))}, LINEAGE, parent=None)
    stray = s.root / "data" / "demo" / "examples" / ("0" * 64 + ".parquet")
    stray.write_bytes(b"x" * 10)
    (s.root / "staging" / "old-folder").mkdir()
    dry = s.gc(dry_run=True, grace_s=0)
    assert sorted((i.path.name, i.why) for i in dry.items) == [
        ("0" * 64 + ".parquet", "unreferenced data file"), ("old-folder", "staging leftover")]
    assert stray.exists() and dry.bytes == 10
    assert s.gc(grace_s=3600).items[0].path == stray  # a fresh foreign staging folder is spared
    assert (s.root / "staging" / "old-folder").exists() and not stray.exists()
    assert len(s.gc(grace_s=0).items) == 1 and s.gc().items == []
    assert s.verify().ok and s.read("demo@1", "examples").height == 10


def test_notebook_api(s):
    s.commit("demo", {"examples": examples(range(6)), "rejections": rejections()}, LINEAGE, parent=None)
    v = store.open(s.root).version("demo@latest")
    assert v.ref == "demo@1" and v.tables == ["examples", "rejections"]
    assert v.to_polars("examples").height == 6 and v.to_arrow("rejections").num_rows == 3
    out = v.sql("SELECT split, count(*) AS n FROM examples GROUP BY ALL ORDER BY ALL")
    assert isinstance(out, pl.DataFrame) and out.to_dicts() == [{"split": "test", "n": 2}, {"split": "train", "n": 4}]
    assert v.lineage["spec_hash"] == "h1" and "demo@1" in repr(v)
    # Pinned: a later commit does not move the handle.
    s.commit("demo", {"examples": examples(range(9))}, {**LINEAGE, "spec_hash": "h2"}, parent=1)
    assert v.to_polars().height == 6


def test_summary_for_show(s):
    s.commit("demo", {"examples": examples(range(20)), "rejections": rejections()}, LINEAGE, parent=None)
    sm = s.summary("demo@1", measure="answer_prob", bins=4)
    assert sm.measure == "conf_answer_prob"
    values = [((i * 37) % 100) / 100 for i in range(20)]
    assert [n for _, _, n in sm.histogram] == [sum(lo <= v < lo + 0.25 for v in values) for lo in (0, 0.25, 0.5, 0.75)]
    assert sm.histogram[0][:2] == (0.0, 0.25)
    assert sm.by_category_split["n"].sum() == 20
    assert sm.rejections.to_dicts()[0] == {"stage": "mine", "reason": "below band", "example": "below band", "n": 2}
    assert sm.files["examples"]["rows"] == 20


def test_v1_catalog_is_migrated(tmp_path):
    import sqlite3

    root = tmp_path / "old"
    s = store.open(root)
    s.commit("demo", {"examples": examples(range(5))}, LINEAGE, parent=None)
    con = sqlite3.connect(root / "catalog.sqlite")
    con.executescript("DROP TABLE tables; DROP TABLE refs; ALTER TABLE files DROP COLUMN deleted;"
                      " ALTER TABLE files DROP COLUMN live_rows; PRAGMA user_version=1;")
    con.close()
    s = store.open(root)
    assert s.read("demo@1", "examples").height == 5
    # A v1 version has no stored digest: the same data is still recognised as nothing new.
    assert s.commit("demo", {"examples": examples(range(5))}, LINEAGE, parent=1) == store.CommitResult(1, False)
    assert s.commit("demo", {"examples": examples(range(7))}, LINEAGE, parent=1).version == 2


def test_staging_folders_of_live_writers_are_spared(s):
    with s.staging("train") as folder:
        (folder / "model.bin").write_bytes(b"x")
        assert s.gc(grace_s=0).items == []  # held by this process
        assert (folder / "model.bin").exists()
    assert list((s.root / "staging").iterdir()) == []


def test_reason_kind_folds_numbers_ids_and_names():
    from store.inspect import reason_kind

    assert reason_kind("near-duplicate of 1a2b3c4d (cos 0.953 ≥ 0.92)") == "near-duplicate of … (cos … ≥ …)"
    assert reason_kind("over quota: category 'books' keeps 30 of 68") == "over quota: category … keeps … of …"
