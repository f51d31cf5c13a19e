"""The CLI and the run pipeline on a tiny random teacher: commits, bad input, interrupts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import store
from engine.curate import pipeline
from engine.cli import app
from engine.errors import Interrupted
from engine.spec import load_spec
from engine.stages import teach

REVIEWS = [("Great value, works perfectly.", "positive"), ("Broke after a day.", "negative"),
           ("I love it.", "positive"), ("Waste of money.", "negative"), ("Exceeded my hopes.", "positive"),
           ("Arrived damaged and late.", "negative")]


@pytest.fixture
def project(tmp_path, tiny_llm_dir):
    rows = "\n".join(f'{{"text": "{t}", "gold": "{g}"}}' for t, g in REVIEWS)
    (tmp_path / "reviews.jsonl").write_text(rows + "\n")
    spec = {
        "name": "mini",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 4}, "batch_size": 2},
        "sources": [{"path": "reviews.jsonl", "text": "text", "label": "gold"}],
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def cli(project, *args):
    env = {**os.environ, "SYLLABUS_STORE": str(project / "store")}
    # The installed console script, as users run it.
    return subprocess.run([str(Path(sys.executable).parent / "syllabus"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_run_commits_then_says_nothing_new(project):
    first = cli(project, "run", "spec.yaml", "-q")
    assert first.returncode == 0, first.stderr
    assert "committed mini@1: 6 examples, 6 teacher calls" in first.stdout
    again = cli(project, "run", "spec.yaml", "-q")
    assert "nothing new: mini@1" in again.stdout and "0 teacher calls" in again.stdout
    listing = CliRunner().invoke(app, ["sql", "SELECT count(*) AS n FROM tokens", "--at", "mini@1",
                                       "--store", str(project / "store"), "--format", "json"])
    assert listing.exit_code == 0 and '"n":' in listing.output


def test_bad_source_line_is_one_line_error_and_nothing_is_written(project):
    with (project / "reviews.jsonl").open("a") as f:
        f.write('{"text": "fine"}\n{"gold": "positive"}\n')
    result = cli(project, "run", "spec.yaml", "-q")
    assert result.returncode == 1
    assert result.stderr.strip() == "error: reviews.jsonl: 1 bad row (max_bad_rows is 0): line 8: no 'text' field"
    assert store.open(project / "store").versions() == []


def test_spec_error_has_no_traceback(project):
    (project / "spec.yaml").write_text((project / "spec.yaml").read_text().replace("max_new_tokens: 4", "max_new_tokens: 0"))
    result = cli(project, "validate", "spec.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: spec.yaml: teacher.generation.max_new_tokens:")


def test_interrupted_run_leaves_no_version_and_keeps_answers(project, monkeypatch):
    monkeypatch.chdir(project)
    spec, st = load_spec(project / "spec.yaml"), store.open(project / "store")
    real_generate = teach._generate

    def generate_then_interrupt(todo, ctx, cache, label, max_new_tokens=None):
        real_generate(todo[:2], ctx, cache, label, max_new_tokens)  # two answers reach the cache, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(teach, "_generate", generate_then_interrupt)
    with pytest.raises(Interrupted):
        pipeline.run(spec, st, progress=False)
    assert st.versions() == []
    monkeypatch.setattr(teach, "_generate", real_generate)
    resumed = pipeline.run(spec, st, progress=False)
    assert resumed.created and resumed.teacher_calls == len(REVIEWS) - 2
