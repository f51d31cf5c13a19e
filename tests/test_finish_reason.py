"""finish_reason: whether the teacher ended its answer or hit max_new_tokens, end to end."""

import sqlite3

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

import store
from engine.cli import app
from engine.curate import pipeline
from engine.spec import Teacher, load_spec
from engine.teachers import TeacherOutput, load_teacher
from engine.teachers.request_cache import TeacherCache

N_PROMPTS = 10


@pytest.fixture
def project(tmp_path, tiny_llm_dir, monkeypatch):
    lines = [f'{{"text": "Is {i} even?", "c": "{"a" if i < 4 else "b"}"}}' for i in range(N_PROMPTS)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "name": "cut",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 3}, "batch_size": 4},
        "sources": [{"path": "p.jsonl", "text": "text", "category": "c"}],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stops_after(monkeypatch, ended: set[str]):
    """The tiny random model never says eos: make the answers to prompts in `ended` end by themselves."""
    from engine.teachers.transformers_backend import TransformersTeacher

    real = TransformersTeacher.generate

    def generate(self, prompts, on_batch=None, max_new_tokens=None):
        outs = real(self, prompts, on_batch=None, max_new_tokens=max_new_tokens)
        for p, o in zip(prompts, outs):
            if any(e in p for e in ended):
                o.token_ids = np.append(o.token_ids[:1], self.tokenizer.eos_token_id).astype(np.int32)
                o.token_logprobs, o.topk_ids, o.topk_logprobs = o.token_logprobs[:2], o.topk_ids[:2], o.topk_logprobs[:2]
                o.finish_reason = "stop"
        if on_batch:
            on_batch(list(range(len(prompts))), outs)
        return outs

    monkeypatch.setattr(TransformersTeacher, "generate", generate)


def test_the_backend_says_length_when_it_hits_max_new_tokens(tiny_llm_dir):
    teacher = load_teacher(Teacher(model=str(tiny_llm_dir), generation={"max_new_tokens": 3}))
    out = teacher.generate(["Is the sky blue?"])[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    eos = teacher.tokenizer.eos_token_id
    ended = teacher._row(torch.tensor([5, eos, eos]), torch.zeros(3), torch.tensor([[5, 6], [eos, 6], [eos, 6]]),
                         torch.full((3, 2), -0.5), eos)
    assert ended.finish_reason == "stop" and ended.token_ids.tolist() == [5, eos]  # eos kept, padding after it not


def test_finish_reason_is_a_column_of_examples_and_tokens_and_shown(project, monkeypatch):
    stops_after(monkeypatch, {"Is 0 even", "Is 1 even", "Is 4 even"})
    result = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    examples = store.open(project / "store").read("cut@1", "examples")
    by_prompt = dict(zip(examples["prompt"], examples["finish_reason"]))
    assert {p for p, r in by_prompt.items() if r == "stop"} == {"Is 0 even?", "Is 1 even?", "Is 4 even?"}
    assert set(by_prompt.values()) == {"stop", "length"}
    shares = {row["category"]: (row["cut_off"], row["examples"]) for row in result.cut_off.iter_rows(named=True)}
    assert shares == {"a": (2, 4), "b": (5, 6), "all": (7, 10)}
    tokens = store.open(project / "store").sql(
        "SELECT DISTINCT prompt_id, finish_reason FROM tokens", at="cut@1").to_pylist()
    assert len(tokens) == N_PROMPTS and {t["finish_reason"] for t in tokens} == {"stop", "length"}
    shown = CliRunner().invoke(app, ["show", "cut@1", "--store", "store"])
    assert shown.exit_code == 0
    assert "answers cut off at max_new_tokens: a 50% (2/4); b 83% (5/6); all 70% (7/10)" in shown.output
    assert "warning: 70% of answers were cut off" in " ".join(shown.output.split())


def test_mining_can_drop_truncated_answers_with_a_reason(project, monkeypatch):
    stops_after(monkeypatch, {"Is 0 even", "Is 5 even"})
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["mining"] = {"truncated": "drop"}
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    examples = store.open(project / "store").read("cut@1", "examples")
    test = examples.filter(split="test")  # drawn before the teacher answered: never filtered by its answers
    assert sorted(examples.filter(pl.col("split") != "test")["prompt"]) == sorted(
        {"Is 0 even?", "Is 5 even?"} - set(test["prompt"]))
    assert result.stage_stats["mine"]["cut_off"] == 8 - test.filter(finish_reason="length").height
    dropped = store.open(project / "store").read("cut@1", "rejections").filter(stage="mine")
    assert dropped.height == result.stage_stats["mine"]["cut_off"] > 0
    assert set(dropped["reason"]) == {"answer cut off at max_new_tokens 3 (mining.truncated: drop)"}


def test_answers_cached_before_finish_reason_was_kept_get_it_from_their_last_token(project, tiny_llm_dir):
    """A request cache written by an earlier version (no finish_reason column) still yields the column."""
    cache_dir = project / "store" / "cache"
    cache_dir.mkdir(parents=True)
    db = sqlite3.connect(cache_dir / "teacher.sqlite")
    db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, text TEXT, k INTEGER, token_ids BLOB,"
               " token_logprobs BLOB, topk_ids BLOB, topk_logprobs BLOB)")
    db.commit()
    db.close()
    first = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    assert first.teacher_calls == N_PROMPTS
    with sqlite3.connect(cache_dir / "teacher.sqlite") as db:  # forget finish_reason, as an old cache would
        db.execute("UPDATE answers SET finish_reason = NULL")
    cache = TeacherCache(cache_dir / "teacher.sqlite")
    old = cache.get_many([r[0] for r in cache.db.execute("SELECT key FROM answers")])
    cache.close()
    assert {o.finish_reason for o in old.values()} == {None}
    from engine.stages.teach import finish_reasons

    spec = load_spec(project / "spec.yaml")
    eos = load_teacher(spec.teacher).tokenizer.eos_token_id
    ended = TeacherOutput("x", np.array([7, eos], np.int32), np.zeros(2, np.float32),
                          np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float16))
    assert finish_reasons(list(old.values()) + [ended], spec) == ["length"] * N_PROMPTS + ["stop"]
