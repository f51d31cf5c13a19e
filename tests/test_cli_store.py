"""The store's CLI verbs: versions, show, sql (and its prompt), diff, export, tag, gc, verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import store
from engine.cli import app

SPEC = "name: demo\nmining: {confidence: answer_prob, band: [0.5, 1.0]}\n"


def frame(ids, response="r"):
    ids = list(ids)
    return pl.DataFrame({
        "prompt_id": [f"p{i:03d}" for i in ids], "category": ["a" if i % 2 else "b" for i in ids],
        "split": ["train" if i % 4 else "test" for i in ids], "prompt": [f"prompt {i}" for i in ids],
        "label": ["yes"] * len(ids), "response": [f"{response} {i}" for i in ids],
        "conf_answer_prob": [i / 20 for i in ids], "conf_mean_token_prob": [0.5] * len(ids),
    })


@pytest.fixture
def st(tmp_path):
    s = store.open(tmp_path / "st")
    lineage = {"spec_text": SPEC, "spec_hash": "abc123", "teacher": "smollm2@1", "code_version": "0.1.0",
               "stats": {"mine": {"kept": 10}}}
    rej = pl.DataFrame({"prompt_id": ["x"], "stage": ["mine"], "reason": ["below band"]})
    s.commit("demo", {"examples": frame(range(10)), "rejections": rej}, lineage, parent=None)
    s.commit("demo", {"examples": frame(range(2, 12)), "rejections": rej}, {**lineage, "spec_hash": "def456"}, parent=1)
    return s


def run(st, *args, input=None):
    result = CliRunner().invoke(app, [*args, "--store", str(st.root)], input=input)
    return result


def test_versions_and_show(st):
    r = run(st, "tag", "demo@1", "prod")
    assert r.exit_code == 0 and "tagged demo@1 as demo@prod" in r.output
    r = run(st, "versions")
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if "demo@1 " in x)
    for cell in ("demo@1", "10", "abc123", "smollm2@1", "prod"):
        assert cell in line
    assert "demo@2" in r.output and "def456" in r.output
    r = run(st, "show", "demo@prod")
    assert r.exit_code == 0, r.output
    for text in ("demo@1  tags: prod", "total", "conf_answer_prob (10 examples)", "below band", "parent           -",
                 "teacher          smollm2@1", "mining: {confidence: answer_prob", "table examples   10 rows in 1 files"):
        assert text in r.output
    r = run(st, "show", "demo@2", "--measure", "mean_token_prob")
    assert "conf_mean_token_prob (10 examples)" in r.output and "shared with the parent" in r.output


def test_sql_one_shot_and_prompt(st):
    r = run(st, "sql", "SELECT count(*) AS n FROM demo_v1_examples JOIN demo_v2_examples USING (prompt_id)",
            "--format", "json")
    assert r.exit_code == 0 and json.loads(r.output) == [{"n": 8}]
    script = "SELECT count(*) AS n\nFROM examples;\n.tables\nSELECT * FROM nope;\nDELETE FROM examples;\nSELECT 2 AS two;\n.quit\nSELECT 3;\n"
    r = run(st, "sql", "--at", "demo@1", "--format", "csv", input=script)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[:2] == ["n", "10"]
    assert "examples  rejections  tokens" in r.output
    assert "Catalog Error" in r.output and "read-only: DELETE statements are refused" in r.output
    assert "two\n2\n" in r.output and "3" not in r.output.split("two\n2\n")[1]
    assert store.open(st.root).read("demo@1", "examples").height == 10


def test_diff_and_its_sql(st):
    r = run(st, "diff", "demo@1", "demo@2")
    assert r.exit_code == 0, r.output
    assert "demo@1 -> demo@2: 2 added, 2 removed, 0 changed" in r.output
    r = run(st, "diff", "demo@1", "demo@2", "--sql")
    assert r.output.startswith("SELECT") and '"demo_v1_examples"' in r.output
    again = run(st, "sql", r.output, "--format", "json")
    assert sorted(row["change"] for row in json.loads(again.output)) == ["added", "added", "removed", "removed"]


def test_export_tag_gc_verify(st, tmp_path):
    r = run(st, "export", "demo@2", "--format", "jsonl", "--out", str(tmp_path / "x.jsonl"), "--split", "train")
    assert r.exit_code == 0 and "exported demo@2: 8 examples as jsonl" in r.output
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[0])["messages"][1]["role"] == "assistant"
    assert run(st, "tag", "demo@2", "prod").exit_code == 0
    r = run(st, "tag", "demo@1", "prod")
    assert r.exit_code == 1 and "use --force" in str(r.exception)
    r = run(st, "tag", "demo@1", "prod", "--force")
    assert "moved demo@prod: demo@2 -> demo@1" in r.output
    (st.root / "data" / "demo" / "examples" / ("f" * 64 + ".parquet")).write_bytes(b"junk")
    r = run(st, "gc", "--dry-run")
    assert "would remove data/demo/examples/ffff" in r.output and "would remove 1 item(s)" in r.output
    assert "removed 1 item(s)" in run(st, "gc").output
    assert "nothing to remove" in run(st, "gc").output
    r = run(st, "verify")
    assert r.exit_code == 0 and r.output.startswith("ok: 3 files")


def test_verify_failure_is_a_one_line_error_with_exit_1(st):
    path = st.resolve("demo@2").files["examples"][-1]
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    env = {**os.environ, "SYLLABUS_STORE": str(st.root)}
    exe = str(Path(sys.executable).parent / "syllabus")
    result = subprocess.run([exe, "verify"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert f"bad: {path}: sha256 mismatch (used by demo@2)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: verify found 1 bad file(s)"
    result = subprocess.run([exe, "sql", "SELECT count(*) FROM examples", "--at", "demo@2"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: data file {path} of demo@2 is corrupt: its sha256 no longer matches its name; run `syllabus verify`"
