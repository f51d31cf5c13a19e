"""Several answers per prompt (teacher.samples): N responses stored, each cached by its own seed, and
conf_self_consistency as a mining measure."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml
from conftest import edit_spec as edit
from test_reasoning import says
from typer.testing import CliRunner

import store
from engine.cli import app
from engine.curate import pipeline
from engine.curate.plan import make_plan
from engine.errors import Interrupted, SpecError
from engine.spec import load_spec, parse_spec
from engine.stages.base import RunContext
from engine.stages.confidence import sample_agreement
from engine.stages.teach import generation_params, sample_context, teacher_prompts
from engine.teachers import teacher_fingerprint
from engine.teachers.answers import self_consistency
from engine.teachers.request_cache import TeacherCache, request_key

N_PROMPTS, SAMPLES = 6, 3


@pytest.fixture
def project(tmp_path, tiny_llm_dir, monkeypatch):
    rows = [{"q": f"Is {i} even?", "c": "a" if i < 4 else "b"} for i in range(N_PROMPTS)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "many",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 4, "temperature": 1.0, "seed": 5},
                    "batch_size": 4, "samples": SAMPLES},
        "sources": [{"path": "p.jsonl", "text": "q", "category": "c"}],
        "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(project):
    return pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)


def latest(project) -> pl.DataFrame:
    return store.open(project / "store").read("many@latest", "examples").sort("prompt")


def test_n_responses_are_stored_and_a_second_run_pays_nothing(project):
    spec = load_spec(project / "spec.yaml")
    plan = make_plan(spec, store.open(project / "store"))
    assert (plan.teacher_calls, plan.teacher_rows, plan.samples) == (N_PROMPTS * SAMPLES, N_PROMPTS * SAMPLES, SAMPLES)
    said = CliRunner().invoke(app, ["plan", "spec.yaml", "--store", "store"])
    assert said.exit_code == 0 and "teacher calls to pay: 18 of 18 requests (6 prompts x 3 samples)" in said.output

    first = run(project)
    assert first.teacher_calls == N_PROMPTS * SAMPLES and first.stage_stats["teach"]["samples"] == SAMPLES
    examples = latest(project)
    assert examples.height == N_PROMPTS
    assert (examples["sample_responses"].list.len() == SAMPLES).all()
    assert examples["sample_responses"].list.first().to_list() == examples["response"].to_list()  # sample 0
    assert examples["sample_answers"].to_list() == [[r.strip() for r in rs] for rs in examples["sample_responses"]]
    assert any(len(set(rs)) > 1 for rs in examples["sample_responses"])  # other seeds, other samples
    # conf_self_consistency: the share of the N answers equal to the most common one.
    for answers, share in zip(examples["sample_answers"], examples["conf_self_consistency"]):
        assert share == pytest.approx(max(answers.to_list().count(a) for a in answers) / SAMPLES)

    # Sample i is cached under generation.seed + i: the key a later run looks up.
    ctx = RunContext(spec=spec, cache_dir=project / "store" / "cache", progress=False)
    prompts = teacher_prompts(pl.DataFrame({"prompt": examples["prompt"]}), spec)
    cache = TeacherCache(ctx.cache_dir / "teacher.sqlite")
    for i in range(SAMPLES):
        params = generation_params(sample_context(ctx, i).spec)
        assert params["generation"]["seed"] == 5 + i
        keys = [request_key(teacher_fingerprint(spec.teacher), params, p) for p in prompts]
        answers = cache.get_many(keys)
        assert [answers[k].text for k in keys] == examples["sample_responses"].list.get(i).to_list()
    cache.close()

    assert make_plan(load_spec(project / "spec.yaml"), store.open(project / "store")).teacher_calls == 0
    edit(project, **{"mining.band": [0.0, 0.99]})  # re-runs mining only
    assert run(project).teacher_calls == 0
    edit(project, **{"teacher.samples": SAMPLES + 1})  # the teach stage runs again: only sample 4 is new
    more = run(project)
    assert more.teacher_calls == N_PROMPTS and more.stage_stats["teach"]["cached"] == N_PROMPTS * SAMPLES
    assert latest(project)["sample_responses"].list.head(SAMPLES).to_list() == examples["sample_responses"].to_list()


def test_an_interrupted_run_resumes_without_paying_twice(project, monkeypatch):
    from engine.teachers.transformers_backend import TransformersTeacher

    real, calls = TransformersTeacher.generate, []

    def generate(self, prompts, on_batch=None, max_new_tokens=None):
        calls.append(self.spec.generation.seed)
        if len(calls) == 2:  # Ctrl-C while sample 1 is asked: sample 0 is cached by then
            raise KeyboardInterrupt
        return real(self, prompts, on_batch=on_batch, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(TransformersTeacher, "generate", generate)
    with pytest.raises(Interrupted):
        run(project)
    assert calls == [5, 6]
    resumed = run(project)
    assert resumed.teacher_calls == N_PROMPTS * (SAMPLES - 1) and calls[2:] == [6, 7]


def test_mining_on_self_consistency(project, monkeypatch):
    says(monkeypatch, {"Is 0 even?": "yes", "Is 1 even?": "no"})  # whatever the seed: every sample agrees
    run(project)
    examples = latest(project)
    edit(project, **{"mining.confidence": "self_consistency", "mining.band": [0.99, 1.0]})
    mined = run(project)
    assert mined.teacher_calls == 0
    kept = latest(project)
    assert kept["prompt"].to_list() == ["Is 0 even?", "Is 1 even?"]  # the tiny model's own samples never all agree
    assert kept["prompt"].to_list() == examples.filter(pl.col("conf_self_consistency") == 1.0)["prompt"].to_list()
    dropped = store.open(project / "store").read("many@latest", "rejections").filter(stage="mine")
    assert dropped.height == N_PROMPTS - kept.height
    assert all(r.startswith("conf_self_consistency ") for r in dropped["reason"])


def test_ordered_teaching_asks_every_sample_of_the_rows_it_teaches(project):
    edit(project, **{"teach.order": "selection", "coverage": {"categories": {"a": {"max": 2}, "b": {}}}})
    result = run(project)
    taught = result.stage_stats["teach"]["rows"]
    assert taught < N_PROMPTS and result.teacher_calls == taught * SAMPLES
    assert (latest(project)["sample_responses"].list.len() == SAMPLES).all()


def test_self_consistency_by_hand():
    labels = {"positive", "negative"}
    # "The review is positive." and "positive!" both map onto the label positive: 2 of 3 agree.
    assert self_consistency(["The review is positive.", "positive!", "negative"], labels) == pytest.approx(2 / 3)
    assert self_consistency(["Yes.", "yes", "no", None]) == 0.5  # a missing answer agrees with nothing
    assert self_consistency([None, None]) == 0.0 and self_consistency([]) is None
    assert self_consistency(["The review is positive.", "positive"]) == 0.5  # without labels: the text as it is
    frame = pl.DataFrame({
        "source": ["s", "s", "t"],
        "label": ["positive", "negative", None],
        "sample_answers": [["It is positive.", "positive", "negative"], ["negative", None, "negative"],
                           ["It is positive.", "positive", "positive"]],
    })
    # Rows with a label map onto their source's labels; the unlabelled row compares the texts.
    assert sample_agreement(frame).to_list() == pytest.approx([2 / 3, 2 / 3, 2 / 3])


def test_spec_errors_are_one_line_naming_the_field(tiny_llm_dir):
    teacher = {"model": str(tiny_llm_dir)}
    base = {"name": "x", "sources": [{"inline": ["a"]}]}

    def spec(teacher_fields: dict, **rest):
        return parse_spec({**base, "teacher": {**teacher, **teacher_fields}, **rest})

    with pytest.raises(SpecError, match=r"^<spec>: teacher\.samples: 3 samples need teacher\.generation\.temperature "
                                        r"> 0[^\n]*$"):
        spec({"samples": 3})
    with pytest.raises(SpecError, match=r"^<spec>: teacher\.samples: Input should be less than or equal to 64$"):
        spec({"samples": 65, "generation": {"temperature": 1.0}})
    with pytest.raises(SpecError, match=r"^<spec>: mining\.confidence: self_consistency compares several answers "
                                        r"[^\n]*teacher\.samples to 2 or more"):
        spec({}, mining={"confidence": "self_consistency"})
    sampled = {"samples": 2, "generation": {"temperature": 0.7}}
    with pytest.raises(SpecError, match=r"^<spec>: mining\.confidence: self_consistency cannot go with teach\.order: "
                                        r"selection[^\n]*$"):
        spec(sampled, mining={"confidence": "self_consistency"}, teach={"order": "selection"},
             coverage={"categories": {"a": {"max": 1}}})
    assert spec(sampled, mining={"confidence": "self_consistency"}).teacher.samples == 2
    assert spec(sampled, teach={"order": "selection"}, coverage={"categories": {"a": {"max": 1}}}).teacher.samples == 2
