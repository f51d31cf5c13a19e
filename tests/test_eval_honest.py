"""Evaluation that cannot flatter: a test split the teacher's confidence never chose, eval sets
taken as written, and every accuracy with n, an interval and the majority baseline beside it.

Pipeline tests run on the tiny random teacher (tests/conftest.py); eval tests train tiny students.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from rich.console import Console

import store
from engine.curate import pipeline
from engine.spec import load_spec
from engine.stages.base import prompt_id
from engine.stages.split import assign_split
from engine.train.evaluate import (NO_ANSWER, format_table, majority_baseline, one_answer_warnings,
                                   retention_interval, score, wilson)
from store.inspect import describe_test_split

ROOT = Path(__file__).resolve().parent.parent
N_PROMPTS = 40


# --- the test split is drawn before the teacher's confidence decides anything -------------------


@pytest.fixture
def curated(tmp_path, tiny_llm_dir, monkeypatch):
    """A project: 40 labelled prompts in two categories, a narrow band and small quotas."""
    rows = [{"text": f"Question {i}: is {i} an even number?", "gold": "yes" if i % 2 == 0 else "no",
             "cat": "low" if i < N_PROMPTS // 2 else "high"} for i in range(N_PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "honest",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 4}, "batch_size": 8},
        "sources": [{"path": "prompts.jsonl", "text": "text", "label": "gold", "category": "cat"}],
        "coverage": {"categories": {"low": {"max": 3}, "high": {"max": 3}}},
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "splits": {"train": 0.5, "val": 0.2, "test": 0.3, "seed": 11},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edit(project: Path, **sections) -> None:
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec.update(sections)
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))


def curate(project: Path):
    st = store.open(project / "store")
    result = pipeline.run(load_spec(project / "spec.yaml"), st, progress=False)
    v = st.version(f"honest@{result.version}")
    return result, v.to_polars("examples"), v.to_polars("rejections")


def expected_test_ids(project: Path) -> set[str]:
    """The test split by hand: the seeded hash of each prompt's group (its own id: no augmentation here)."""
    spec = load_spec(project / "spec.yaml")
    ids = [prompt_id(json.loads(line)["text"]) for line in (project / "prompts.jsonl").read_text().splitlines()]
    return {pid for pid in ids if assign_split(pid, spec.splits) == "test"}


def test_the_test_split_never_loses_a_row_to_mining_or_selection(curated):
    scores = curate(curated)[1]["conf_mean_token_prob"].sort()
    # A band holding only the top quarter of the teacher's scores, quotas of 3 per category.
    edit(curated, mining={"confidence": "mean_token_prob", "band": [float(scores[int(0.75 * len(scores))]), 1.0]})
    result, examples, rejected = curate(curated)
    expected = expected_test_ids(curated)
    assert len(expected) >= 6  # enough test rows for the check to mean something
    test = examples.filter(pl.col("split") == "test")
    assert set(test["prompt_id"]) == expected  # every test row is in the final examples, and nothing else is test
    decided = rejected.filter(pl.col("stage").is_in(["mine", "select"]))
    assert decided.height > 0 and not set(decided["prompt_id"]) & expected  # they dropped rows, never test rows
    assert result.stage_stats["mine"]["test_untouched"] == result.stage_stats["select"]["test_untouched"] == len(expected)
    # Quotas and the band decide over train and val only.
    trained_on = examples.filter(pl.col("split") != "test")
    assert trained_on.group_by("category").len()["len"].max() <= 3
    assert trained_on.height < N_PROMPTS - len(expected)


def test_test_rows_are_drawn_the_same_whatever_the_band(curated):
    _, wide, _ = curate(curated)
    scores = wide["conf_mean_token_prob"].sort()
    edit(curated, mining={"confidence": "mean_token_prob", "band": [float(scores[len(scores) // 2]), 1.0]},
         coverage={"categories": {"low": {"max": 2}, "high": {"max": 5}}})
    _, narrow, _ = curate(curated)
    test_of = lambda frame: frame.filter(pl.col("split") == "test").sort("prompt_id")  # noqa: E731
    assert test_of(wide)["prompt_id"].to_list() == test_of(narrow)["prompt_id"].to_list()
    assert test_of(wide)["answer"].to_list() == test_of(narrow)["answer"].to_list()
    train_of = lambda frame: set(frame.filter(pl.col("split") != "test")["prompt_id"])  # noqa: E731
    assert train_of(wide) != train_of(narrow)  # the band and quotas did change what is trained on


def test_show_says_how_the_test_split_was_drawn(curated):
    result, _, _ = curate(curated)
    st = store.open(curated / "store")
    note = st.summary(f"honest@{result.version}").test_split
    assert note == ("test split: drawn by hash of parent_id (seed 11) before the teacher answered; mine, select passed "
                    "its rows through untouched (never filtered by the teacher's confidence)")
    # A version curated before the split moved ahead of mining has no `drawn_by`: said as it was.
    assert "the teacher's confidence chose them" in describe_test_split({"split": {"train": 3, "test": 1}})
    assert describe_test_split({"mine": {"rows": 3}}) is None


def test_top_up_variations_get_their_parents_split_and_never_grow_the_test_split(tmp_path, tiny_llm_dir, monkeypatch):
    rows = [{"q": f"Tell me about apples, fact {i}.", "c": "a"} for i in range(12)]
    rows += [{"q": f"Tell me about boats, story {i}.", "c": "b"} for i in range(6)]  # story 5 falls in test
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "quota",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 4}, "batch_size": 4},
        "sources": [{"path": "p.jsonl", "text": "q", "category": "c"}],
        "coverage": {"total": 30, "categories": {"a": {"share": 0.5}, "b": {"share": 0.5}},
                     "augment_until_quota": True, "augment_cap": 4},
        "augment": [{"template": str(ROOT / "templates/rephrase.j2"), "categories": ["b"], "sample": 1, "seed": 3,
                     "vars": {"style": ["briefly", "formally", "casually", "plainly", "kindly", "sternly"]}}],
        "splits": {"train": 0.6, "val": 0.1, "test": 0.3, "seed": 5},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    st = store.open(tmp_path / "store")
    loaded = load_spec(tmp_path / "spec.yaml")
    result = pipeline.run(loaded, st, progress=False)
    examples = st.read(f"quota@{result.version}", "examples")
    rejected = st.read(f"quota@{result.version}", "rejections")
    assert result.stage_stats["top_up"]["rounds"] >= 1 and (examples["origin"] == "template").sum() > 6
    splits = [assign_split(parent, loaded.splits) for parent in examples["parent_id"]]
    assert examples["split"].to_list() == splits  # every row, top-up variations too, in its parent's split
    without, _, _, _ = pipeline.curate(loaded.model_copy(update={"coverage": loaded.coverage.model_copy(
        update={"augment_until_quota": False})}), st, progress=False)
    test_ids = lambda frame: set(frame.filter(pl.col("split") == "test")["prompt_id"])  # noqa: E731
    assert test_ids(examples) == test_ids(without)  # top-up never adds a test row
    kept_out = rejected.filter(pl.col("stage") == "split")  # variations of story 5, made and kept out
    assert kept_out.height > 0 and all("never grown by top-up" in r for r in kept_out["reason"])
    assert all(assign_split(p, loaded.splits) == "test" for p in kept_out["parent_id"])


# --- figures with n, an interval and the baseline -------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson(0, 0) is None


def test_majority_baseline_confusion_and_per_category_on_a_hand_made_case():
    labels = {"positive", "negative"}
    gold = ["Positive", "positive", "positive", "negative", "negative", None]
    answers = ["positive", "negative", "maybe", "negative", "positive", "positive"]
    categories = ["a", "a", "b", "b", "b", "b"]
    base = majority_baseline(gold, labels)
    assert (base["label"], base["n"], base["correct"], base["accuracy"]) == ("positive", 5, 3, 0.6)
    assert base["ci"] == pytest.approx(wilson(3, 5))
    s = score(answers, gold, categories, labels, reference=["positive"] * 6)
    assert (s["n"], s["correct"], s["accuracy"]) == (5, 2, 0.4)
    assert s["accuracy_ci"] == pytest.approx([0.1176, 0.7693], abs=1e-4)
    assert s["confusion"] == {"negative": {"negative": 1, "positive": 1},
                              "positive": {NO_ANSWER: 1, "negative": 1, "positive": 1}}
    assert s["per_category"]["a"] == {"n": 2, "correct": 1, "accuracy": 0.5, "ci": wilson(1, 2)}
    assert s["per_category"]["b"]["n"] == 3 and s["per_category"]["b"]["correct"] == 1
    assert s["answers"] == {"positive": 3, "negative": 2, NO_ANSWER: 1}  # every row, labelled or not
    assert (s["agreement"], s["agreement_n"]) == (0.5, 6)
    assert not s["one_answer"]
    tie = majority_baseline(["b", "a"], {"a", "b"})
    assert tie["label"] == "a" and tie["accuracy"] == 0.5  # ties go to the first label in sorted order


def test_a_student_that_answers_one_label_is_flagged():
    labels = {"positive", "negative"}
    gold = ["positive"] * 9 + ["negative"] * 9
    constant = score(["positive"] * 17 + ["negative"], gold, [None] * 18, labels, reference=["positive"] * 18)
    assert constant["top_answer"] == {"answer": "positive", "share": pytest.approx(17 / 18), "count": 17}
    assert constant["one_answer"] and constant["accuracy"] == pytest.approx(10 / 18)
    honest = score(gold, gold, [None] * 18, labels, reference=gold)
    assert not honest["one_answer"] and honest["top_answer"]["share"] == 0.5

    row = {"name": "tiny", "kind": "config", "seed": None, "params": 1e6, "disk_bytes": 4e6, "decode_tok_s": 10.0,
           "token_kl": 0.5, "retention": 1.0, "retention_ci": [0.8, 1.2], **constant}
    console = Console(record=True, width=250)
    console.print(format_table([row]))
    assert "positive 94.4% ⚠" in console.export_text()
    (warning,) = one_answer_warnings({"name": "test split", "models": [row]})
    assert warning.startswith("tiny answers 'positive' for 94.4% of the rows of test split")


def test_retention_interval_is_a_seeded_paired_bootstrap():
    rng = np.random.default_rng(5)
    teacher = (rng.random(200) < 0.9).astype(float)
    student = teacher * (rng.random(200) < 0.8)  # right only where the teacher is, 80% of the time
    ci = retention_interval(student, teacher)
    point = student.mean() / teacher.mean()
    assert ci[0] < point < ci[1] and ci[1] - ci[0] < 0.2
    assert retention_interval(student, teacher) == ci  # fixed seed: the same interval every time
    assert retention_interval(teacher, teacher) == [1.0, 1.0]  # paired: the same rows for both
    assert retention_interval(student, np.zeros(200)) is None


# --- eval.sources and seeds, through the CLI ---------------------------------------------------

LINEAGE = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}
EVAL_ROWS = [  # a duplicate and a near-duplicate: an eval set is scored as written
    {"q": "Is the moon made of cheese?", "y": "no", "c": "space"},
    {"q": "Is the moon made of cheese?", "y": "no", "c": "space"},
    {"q": "is the moon made of cheese", "y": "no", "c": "space"},
    {"q": "Is a whale a mammal?", "y": "yes", "c": "animals"},
    {"q": "Do spiders have eight legs?", "y": "yes", "c": "animals"},
]


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_llm_dir, tiny_examples):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Is the sky blue?"}\n')
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    spec = {
        "name": "tiny",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 8},
                    "reasoning": {"answer_marker": "Answer:"}, "batch_size": 4},
        "sources": [{"path": "prompts.jsonl", "text": "prompt"}],
        "dedup": {"exact": True},
        "mining": {"band": [0.999, 1.0]},  # would drop nearly everything, had eval rows been mined
        "students": [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                                  "intermediate_size": 32}},
                     {"name": "halves", "from_teacher": {"layers": [0, 2]}}],
        "training": {"epochs": 1, "batch_size": 4},  # 3 steps: the batch order, and so the student, follows the seed
        "eval": {"speed_prompts": 1, "speed_tokens": 2,
                 "sources": [{"path": "eval.jsonl", "text": "q", "label": "y", "category": "c"}]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    store.open(tmp_path / "store").commit("tiny", {"examples": tiny_examples}, LINEAGE, parent=None)
    return tmp_path


def test_eval_sources_are_scored_as_written_and_the_teacher_is_asked_once(project, syllabus, monkeypatch):
    from engine.teachers import transformers_backend

    asked = []
    real = transformers_backend.TransformersTeacher.generate

    def counting(self, prompts, *args, **kwargs):
        asked.extend(prompts)
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(transformers_backend.TransformersTeacher, "generate", counting)
    assert syllabus("train", "spec.yaml")[0] == 0
    code, out, err = syllabus("eval", "spec.yaml", "--json")
    assert code == 0, err
    report = json.loads(out)
    test, source = report["sets"]
    assert test["name"] == "test split" and test["rows"] == 4
    assert source["name"] == "eval.sources[0] (eval.jsonl)" and source["kind"] == "source"
    assert source["rows"] == len(EVAL_ROWS)  # the duplicate and the near-duplicate stay: nothing is deduplicated or mined
    assert source["baseline"]["label"] == "no" and source["baseline"]["accuracy"] == 0.6
    teacher = source["models"][0]
    assert teacher["kind"] == "teacher" and teacher["n"] == 5 and teacher["agreement"] == 1.0
    assert sorted(teacher["per_category"]) == ["animals", "space"]
    assert [m["name"] for m in source["models"][1:]] == ["fresh", "halves"]
    for m in source["models"]:
        assert m["examples"] == 5 and sum(sum(row.values()) for row in m["confusion"].values()) == 5
    unique = len({r["q"] for r in EVAL_ROWS})
    assert report["teacher_calls"] == unique == len(asked) == len(set(asked))  # each distinct prompt asked once

    code, out, _ = syllabus("eval", "spec.yaml", "--json")
    assert code == 0 and json.loads(out)["teacher_calls"] == 0 and len(asked) == unique  # cached: zero calls
    assert json.loads(out)["sets"][1]["models"][0]["accuracy"] == teacher["accuracy"]

    code, out, _ = syllabus("eval", "spec.yaml")
    assert code == 0
    assert "eval.sources[0] (eval.jsonl): 5 rows as written (not deduplicated, mined or selected)" in out
    assert "majority baseline: no 60.0% [23.1–88.2] (n=5)" in out
    assert "accuracy per category" in out and "confusion: gold (rows) x answer (columns)" in out


def test_a_constant_answer_student_is_flagged_in_the_report(project, syllabus, monkeypatch):
    evaluation = sys.modules["engine.train.evaluate"]  # the module: engine.train.evaluate names the function

    assert syllabus("train", "spec.yaml")[0] == 0
    monkeypatch.setattr(evaluation, "generate_texts",  # every student says "yes", whatever it is asked
                        lambda model, tok, prompts, *args, **kwargs: ["Answer: yes"] * len(prompts))
    code, out, err = syllabus("eval", "spec.yaml")
    assert code == 0, err
    assert "yes 100.0% ⚠" in out
    assert "warning: fresh answers 'yes' for 100.0% of the rows of eval.sources[0] (eval.jsonl)" in out
    report = json.loads((project / "store" / "models").glob("*/eval.json").__next__().read_text())
    fresh = report["sets"][1]["models"][1]
    assert fresh["one_answer"] and fresh["top_answer"] == {"answer": "yes", "share": 1.0, "count": 5}
    assert fresh["accuracy"] == 0.4 and fresh["confusion"] == {"no": {"yes": 3}, "yes": {"yes": 2}}
    assert fresh["accuracy"] < fresh["baseline"]["accuracy"]  # below the majority baseline, and visibly so


def test_seeds_train_one_run_per_seed_and_eval_reports_mean_and_spread(project, syllabus):
    code, out, err = syllabus("train", "spec.yaml", "--seeds", "0,1,2")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(" -> ")[0] for line in lines] == [f"trained: fresh, halves on tiny@1 (seed {s})" for s in (0, 1, 2)]
    runs = sorted(p.name for p in (project / "store" / "models").iterdir())
    assert len(runs) == 3
    code, out, _ = syllabus("train", "spec.yaml", "--seeds", "0,1,2")  # cached per seed
    assert out.count("already trained") == 3
    code, out, _ = syllabus("train", "spec.yaml")  # training.seed (0) is the seed-0 run
    assert out.startswith("already trained: fresh, halves on tiny@1 ->")

    code, out, err = syllabus("eval", "spec.yaml", "--seeds", "0,1,2", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["seeds"] == [0, 1, 2] and sorted(report["runs"].values()) == runs
    for entry in report["sets"]:
        per_seed = [m for m in entry["models"] if m["kind"] != "teacher"]
        assert [(m["name"], m["seed"]) for m in per_seed] == [(n, s) for s in (0, 1, 2) for n in ("fresh", "halves")]
        summaries = {s["name"]: s for s in entry["seeds"]}
        assert sorted(summaries) == ["fresh", "halves"]
        for name, summary in summaries.items():
            values = [m["accuracy"] for m in per_seed if m["name"] == name]
            assert summary["seeds"] == [0, 1, 2]
            assert summary["accuracy"]["mean"] == pytest.approx(np.mean(values))
            assert (summary["accuracy"]["min"], summary["accuracy"]["max"]) == (min(values), max(values))
            assert summary["accuracy"]["sd"] == pytest.approx(np.std(values, ddof=1))
            kls = [m["token_kl"] for m in per_seed if m["name"] == name]
            assert len(set(kls)) == 3  # three different students, one per seed

    code, out, _ = syllabus("eval", "spec.yaml", "--seeds", "0,1,2")
    assert code == 0 and "fresh (3 seeds)" in out and "halves (3 seeds)" in out
    assert "students over seeds: mean (min–max)" in out
    saved = next((project / "store" / "models").glob("*-seeds-0-1-2/eval.json"))
    assert json.loads(saved.read_text())["seeds"] == [0, 1, 2]

    code, _, err = syllabus("eval", "spec.yaml", "--seeds", "0,3")
    assert code == 1 and "no trained fresh (seed 3), halves (seed 3) for tiny@1" in err
    assert "--seeds 0,3" in err
    code, _, err = syllabus("train", "spec.yaml", "--seeds", "a,b")
    assert code == 1 and err.startswith("error: --seeds: 'a,b' is not a comma-separated list of seeds")


def test_training_seeds_in_the_spec_is_the_default(project, syllabus):
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["training"]["seeds"] = [4, 5]
    (project / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out, _ = syllabus("train", "spec.yaml")
    assert code == 0 and "(seed 4)" in out and "(seed 5)" in out
    code, out, _ = syllabus("eval", "spec.yaml", "--json")
    assert code == 0 and json.loads(out)["seeds"] == [4, 5]
