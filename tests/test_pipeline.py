"""The run pipeline on a tiny random teacher: stage caching, re-selection, resume, plan."""

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import store
from engine.curate import pipeline
from engine.curate.plan import make_plan
from engine.spec import load_spec

N_PROMPTS = 48


@pytest.fixture
def project(tmp_path, tiny_llm_dir):
    lines = [f'{{"text": "Question number {i}: is {i} an even number?", "gold": "{"yes" if i % 2 == 0 else "no"}"}}'
             for i in range(N_PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "name": "tiny",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 24}, "batch_size": 2},
        "sources": [{"path": "prompts.jsonl", "text": "text", "label": "gold"}],
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def edit_spec(project: Path, **changes) -> None:
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))


def run(project: Path):
    return pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)


def test_changing_the_band_reuses_every_teacher_answer(project, monkeypatch):
    monkeypatch.chdir(project)
    first = run(project)
    assert first.created and first.teacher_calls == N_PROMPTS
    scores = sorted(store.open(project / "store").read("tiny@1", "examples")["conf_mean_token_prob"])
    edit_spec(project, **{"mining.band": [scores[N_PROMPTS // 2], 1.0]})
    second = run(project)
    assert second.created and second.version == 2 and second.teacher_calls == 0
    assert second.stage_stats["teach"].get("from_stage_cache") and second.stage_stats["confidence"].get("from_stage_cache")
    assert not second.stage_stats["mine"].get("from_stage_cache")
    assert N_PROMPTS // 2 - 2 <= second.rows <= N_PROMPTS // 2 + 2


def test_plan_counts_calls_before_and_after(project, monkeypatch):
    monkeypatch.chdir(project)
    st = store.open(project / "store")
    before = make_plan(load_spec(project / "spec.yaml"), st)
    assert before.teacher_calls == N_PROMPTS and before.bound == ""
    assert dict(before.stages)["teach"] == "to run"
    run(project)
    after = make_plan(load_spec(project / "spec.yaml"), st)
    assert after.teacher_calls == 0
    assert dict(after.stages)["confidence"] == "cached"
    edit_spec(project, **{"splits.seed": 5})
    moved = make_plan(load_spec(project / "spec.yaml"), st)
    assert moved.teacher_calls == 0 and dict(moved.stages)["split"] == "to run"


def cached_answers(project: Path) -> int:
    path = project / "store" / "cache" / "teacher.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=1) as db:
            return db.execute("SELECT count(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_sigkill_mid_run_then_resume_repeats_no_completed_call(project, monkeypatch):
    monkeypatch.chdir(project)
    syllabus = str(Path(sys.executable).parent / "syllabus")
    proc = subprocess.Popen([syllabus, "run", "spec.yaml", "-q", "--store", "store"], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while cached_answers(project) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = cached_answers(project)
    assert 8 <= done < N_PROMPTS, f"killed too late or too early ({done} answers cached)"
    assert store.open(project / "store").versions() == []  # no partial version
    resumed = run(project)
    assert resumed.created and resumed.teacher_calls == N_PROMPTS - done


def test_a_commit_that_lost_the_race_is_retried_on_the_new_parent(project, monkeypatch):
    """Another run committed between our start and our commit: we build on its version."""
    monkeypatch.chdir(project)
    st = store.open(project / "store")
    real_commit = type(st).commit
    raced = []

    def commit_after_a_rival(self, dataset, tables, lineage, parent):
        if not raced:
            raced.append(real_commit(self, dataset, tables, {**lineage, "spec_hash": "rival"}, parent))
        return real_commit(self, dataset, tables, lineage, parent)

    monkeypatch.setattr(type(st), "commit", commit_after_a_rival)
    result = run(project)
    assert raced[0].version == 1 and result.version == 2 and result.created
    assert [v.parent for v in st.versions("tiny")] == [None, 1]


def test_dedup_against_an_earlier_version_adds_only_new_material(project, monkeypatch):
    monkeypatch.chdir(project)
    run(project)
    with (project / "prompts.jsonl").open("a") as f:
        f.write('{"text": "A brand new question: what is seven times six?", "gold": "42"}\n')
    edit_spec(project, **{"dedup": {"exact": True, "against": "tiny@1"}})
    second = run(project)
    examples = store.open(project / "store").read("tiny@2", "examples")
    assert examples["prompt"].to_list() == ["A brand new question: what is seven times six?"]
    assert second.teacher_calls == 1
    dropped = store.open(project / "store").read("tiny@2", "rejections").filter(stage="dedup")
    assert dropped.height == N_PROMPTS and dropped["reason"].str.starts_with("already in tiny@1").all()
    assert (dropped["similarity"] == 1.0).all()


def test_plan_is_exact_when_embeddings_are_cached(project, monkeypatch):
    """Semantic dedup over cached embeddings is cheap: plan runs it and counts calls exactly."""
    monkeypatch.chdir(project)
    edit_spec(project, **{"dedup": {"exact": True, "semantic": {"threshold": 0.99}}})
    run(project)
    edit_spec(project, **{"dedup": {"exact": True, "semantic": {"threshold": 0.995}}})  # dedup must re-run
    plan = make_plan(load_spec(project / "spec.yaml"), store.open(project / "store"))
    assert dict(plan.stages)["dedup"] == "to run"
    assert plan.teacher_calls == 0 and plan.bound == ""
