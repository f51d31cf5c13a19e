"""The run pipeline on a tiny random teacher: stage caching, re-selection, resume, plan."""

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import edit_spec, interrupt_teacher_at

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
    # The band decides over train and val; the test split keeps every row, whatever its score.
    test = int((store.open(project / "store").read("tiny@2", "examples")["split"] == "test").sum())
    assert N_PROMPTS // 2 - 2 <= second.rows - test // 2 <= N_PROMPTS // 2 + 2


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


def test_an_interrupt_loses_only_the_batch_in_flight(project, monkeypatch):
    """Every answered batch is committed at once, not only at the end of a chunk of batches."""
    from engine.errors import Interrupted
    monkeypatch.chdir(project)
    restore = interrupt_teacher_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        run(project)
    assert cached_answers(project) == 2 * 2  # two answered batches of batch_size 2
    restore()
    assert run(project).teacher_calls == N_PROMPTS - 4


def test_summary_table_counts_drops_by_kind_with_a_readable_example(project, monkeypatch):
    monkeypatch.chdir(project)
    with (project / "prompts.jsonl").open("a") as f:  # two copies of the first prompt that differ only in case
        f.write('{"text": "QUESTION NUMBER 0: IS 0 AN EVEN NUMBER?", "gold": "yes"}\n')
        f.write('{"text": "question number 0: is 0 an even number?", "gold": "yes"}\n')
    result = run(project)
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(pipeline.summary_table(result))
    line = next(row for row in console.export_text().splitlines() if row.strip("│ ").startswith("dedup"))
    cells = [c.strip() for c in line.split("│")]
    assert cells[1:5] == ["dedup", str(N_PROMPTS + 2), str(N_PROMPTS), "2"]
    first = store.open(project / "store").read("tiny@1", "examples").filter(
        pl.col("prompt") == "Question number 0: is 0 an even number?")["prompt_id"][0]
    assert cells[5] == f"2× e.g. exact duplicate of {first[:8]}"  # the kind, by a real reason, not "… of …"


def test_a_row_whose_teacher_prompt_cannot_render_is_a_bad_row_not_a_stopped_run(project, monkeypatch):
    """teacher.prompt written inline; one row makes it exceed the render limits: that row is rejected."""
    monkeypatch.chdir(project)
    with (project / "prompts.jsonl").open("a") as f:
        f.write('{"text": "explode this one", "gold": "no"}\n')
    edit_spec(project, **{"teacher.prompt": {"inline": "Answer: {{ prompt * (10**6 if 'explode' in prompt else 1) }}"}})
    result = run(project)
    assert result.stage_stats["teach"]["render_limit"] == 1 and result.rows == N_PROMPTS
    dropped = store.open(project / "store").read("tiny@1", "rejections").filter(stage="teach")
    assert dropped["prompt"].to_list() == ["explode this one"]
    assert "teacher.prompt: line 1:" in dropped["reason"][0]
    examples = store.open(project / "store").read("tiny@1", "examples")
    assert examples["teacher_prompt"].str.starts_with("Answer: Question number").all()


def test_plan_says_at_most_when_a_skipped_stage_would_drop_rows(project, monkeypatch):
    """Semantic dedup without cached embeddings is too costly for plan: the count is an upper bound."""
    monkeypatch.chdir(project)
    edit_spec(project, **{"dedup": {"exact": True, "semantic": {"threshold": 0.99}}})
    plan = make_plan(load_spec(project / "spec.yaml"), store.open(project / "store"))
    assert plan.bound == "at most " and plan.teacher_calls == N_PROMPTS
    assert dict(plan.stages)["embed"] == "to run"


def test_plan_estimates_time_from_the_teachers_measured_speed(project, monkeypatch):
    monkeypatch.chdir(project)
    st = store.open(project / "store")
    guess = make_plan(load_spec(project / "spec.yaml"), st)
    assert guess.seconds == N_PROMPTS * 24 / 100.0  # max_new_tokens 24 at the assumed 100 tokens/s
    assert guess.speed_source.startswith("not measured yet")
    run(project)
    with (project / "prompts.jsonl").open("a") as f:
        f.write('{"text": "One more question?", "gold": "yes"}\n')
    from engine.teachers.request_cache import TeacherCache

    cache = TeacherCache(project / "store" / "cache" / "teacher.sqlite")
    from engine.teachers import teacher_fingerprint

    per_row, _ = cache.speed(teacher_fingerprint(load_spec(project / "spec.yaml").teacher))
    cache.close()
    measured = make_plan(load_spec(project / "spec.yaml"), st)
    assert measured.teacher_calls == 1 and measured.seconds == pytest.approx(per_row)
    assert measured.speed_source == f"measured here: {1 / per_row:.2f} rows/s"


def test_plan_command_prints_stages_and_the_count(project, monkeypatch):
    from typer.testing import CliRunner

    from engine.cli import app

    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["plan", "spec.yaml", "--store", "store"])
    assert result.exit_code == 0
    assert f"teacher calls to pay: {N_PROMPTS} of {N_PROMPTS} prompts" in result.output
    assert all(name in result.output for name in ("sources", "dedup", "teach", "confidence", "mine", "split"))
    missing = CliRunner().invoke(app, ["plan", "nope.yaml", "--store", "store"])
    assert missing.exit_code != 0
