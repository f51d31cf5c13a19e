"""Stages describe themselves, and the stage cache covers the code a stage really runs."""

import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

import store
from engine.curate import pipeline, stage_cache
from engine.curate.plan import make_plan
from engine.spec import load_spec
from engine.stages import stages_for
from engine.stages.base import Stage, no_rejections

ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS = 12


@pytest.fixture
def project(tmp_path, tiny_llm_dir, monkeypatch):
    lines = [f'{{"text": "Is {i} an even number?", "gold": "{"yes" if i % 2 == 0 else "no"}"}}' for i in range(N_PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "name": "contract",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6}, "batch_size": 4},
        "sources": [{"path": "prompts.jsonl", "text": "text", "label": "gold"}],
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(project: Path):
    return pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)


def test_the_spec_decides_which_stages_run_and_the_classes_their_order(project, monkeypatch):
    spec = load_spec(project / "spec.yaml")
    assert [s.name for s in stages_for(spec)] == ["sources", "dedup", "split", "teach", "confidence", "mine"]  # exact dedup is on by default
    monkeypatch.chdir(ROOT)  # the demo names its templates from the project's root
    demo = load_spec(ROOT / "specs/demo.yaml")
    assert [s.name for s in stages_for(demo)] == [
        "sources", "assign", "augment", "embed", "dedup", "split", "teach", "confidence", "mine", "diversity", "select"]


@pytest.fixture
def shout_registered():
    class Shout(Stage):
        """A stage written by a user in one class: upper-cases every answer."""

        name = "shout"
        order = 75  # after confidence, before mine
        cached = True

        @classmethod
        def wanted(cls, spec) -> bool:
            return spec.name == "contract"

        def cache_slice(self, spec, store):
            return None

        def run(self, frame, ctx):
            return frame.with_columns(answer=pl.col("answer").str.to_uppercase()), no_rejections(), {"rows": frame.height}

    yield Shout
    Stage._registry.pop("shout")


def test_a_new_stage_joins_the_pipeline_from_its_class_alone(project, shout_registered):
    spec = load_spec(project / "spec.yaml")
    assert [s.name for s in stages_for(spec)] == ["sources", "dedup", "split", "teach", "confidence", "shout", "mine"]
    result = run(project)
    assert list(result.stage_stats) == ["sources", "dedup", "split", "teach", "confidence", "shout", "mine"]
    answers = store.open(project / "store").read("contract@1", "examples")["answer"]
    assert (answers == answers.str.to_uppercase()).all()
    # Declared cached: plan finds its output, and a re-run starts from there.
    planned = dict(make_plan(spec, store.open(project / "store")).stages)
    assert planned["shout"] == "cached" and planned["mine"] == "to run"  # mine keeps no output: it re-runs, cheaply
    again = run(project)
    assert not again.created and again.stage_stats["shout"].get("from_stage_cache")


def copy_of_the_code(tmp_path: Path) -> Path:
    root = tmp_path / "code"
    for package in stage_cache.PROJECT_PACKAGES:
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def read_code_from(monkeypatch, root: Path) -> None:
    monkeypatch.setattr(stage_cache, "PROJECT_ROOT", root)
    for cached in (stage_cache.code_version, stage_cache._imports, stage_cache._syntax):
        cached.cache_clear()


@pytest.fixture(autouse=True)
def fresh_code_caches():
    yield
    for cached in (stage_cache.code_version, stage_cache._imports, stage_cache._syntax):
        cached.cache_clear()


def versions(spec) -> dict:
    return {s.name: stage_cache.code_version(type(s)) for s in stages_for(spec)}


def test_editing_a_helper_changes_the_key_of_every_stage_that_imports_it(project, tmp_path, monkeypatch):
    spec = load_spec(project / "spec.yaml")
    code = copy_of_the_code(tmp_path)
    read_code_from(monkeypatch, code)
    before = versions(spec)

    helper = code / "engine/teachers/answers.py"  # imported by teach, not by mine or split
    helper.write_text(helper.read_text() + "\n# a comment changes nothing\n")
    read_code_from(monkeypatch, code)
    assert versions(spec) == before

    helper.write_text(helper.read_text() + "\nMARKER = 'answers changed'\n")
    read_code_from(monkeypatch, code)
    after = versions(spec)
    assert after["teach"] != before["teach"]
    assert after["mine"] == before["mine"] and after["split"] == before["split"]


def test_a_run_after_a_helper_edit_re_runs_the_stage_without_paying_the_teacher_again(project, tmp_path, monkeypatch):
    first = run(project)
    assert first.teacher_calls == N_PROMPTS
    code = copy_of_the_code(tmp_path)
    helper = code / "engine/teachers/answers.py"  # how answers are split: teach's output depends on it
    helper.write_text(helper.read_text() + "\nMARKER = 'answers changed'\n")
    read_code_from(monkeypatch, code)
    second = run(project)
    assert not second.stage_stats["teach"].get("from_stage_cache")  # the stage ran again...
    assert second.teacher_calls == 0  # ...over the raw answers kept in the per-request cache
    assert second.stage_stats["dedup"].get("from_stage_cache")  # dedup does not use the helper: served from its cache
