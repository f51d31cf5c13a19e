"""`syllabus train` and `syllabus eval` as a user runs them: output, files, exit codes.

The verbs run in-process through the console script's entry point (engine.cli.main), so an
interrupt can be simulated by monkeypatching the function a verb calls. Exit codes: 0 on
success, 1 with a one-line error, 130 on Ctrl-C.
"""

from __future__ import annotations

import json
import sys

import pytest
import yaml

import engine.train
import store

LINEAGE = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}
STUDENTS = [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
            {"name": "halves", "from_teacher": {"layers": [0, 2]}}]


def write_spec(folder, teacher_dir, students=STUDENTS, name="spec.yaml"):
    spec = {
        "name": "tiny",
        "teacher": {"model": str(teacher_dir), "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 8},
                    "reasoning": {"answer_marker": "Answer:"}, "batch_size": 4},
        "sources": [{"path": "prompts.jsonl", "text": "prompt"}],
        "students": students,
        "training": {"epochs": 2, "batch_size": 10},
        "eval": {"speed_prompts": 1, "speed_tokens": 2},
    }
    (folder / name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return name


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_llm_dir, tiny_examples):
    """The working directory: spec.yaml (two tiny students) and a store ($SYLLABUS_STORE) holding tiny@1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Is the sky blue?"}\n')
    write_spec(tmp_path, tiny_llm_dir)
    store.open(tmp_path / "store").commit("tiny", {"examples": tiny_examples}, LINEAGE, parent=None)
    return tmp_path


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.strip()


def run_dirs(project) -> list:
    return sorted(p.name for p in (project / "store" / "models").iterdir())


def test_train_then_eval_succeed_with_exit_0(project, syllabus, tiny_llm_dir):
    code, out, err = syllabus("train", "spec.yaml")
    assert code == 0, err
    st = store.open(project / "store")
    (run_id,) = run_dirs(project)
    run_dir = project / "store" / "models" / run_id
    assert run_id.startswith("tiny-v1-")
    assert out.strip() == f"trained: fresh, halves on tiny@1 -> {run_dir}"
    for name in ("fresh", "halves"):
        assert json.loads((run_dir / name / "metrics.json").read_text())["steps"] == 2
        assert (run_dir / name / "config.json").is_file()
    assert sorted((m["student"], m["ref"]) for m in st.models()) == [("fresh", "tiny@1"), ("halves", "tiny@1")]
    assert list((project / "store" / "staging").iterdir()) == []

    code, out, _ = syllabus("train", "spec.yaml")  # the same run again: reused, not retrained
    assert code == 0 and out.strip() == f"already trained: fresh, halves on tiny@1 -> {run_dir}"
    assert run_dirs(project) == [run_id]

    code, out, err = syllabus("eval", "spec.yaml", "--dataset", "tiny@1")
    assert code == 0, err
    assert "teacher vs students: test split" in out and f"saved {run_dir / 'eval.json'}" in out
    assert "majority baseline: no 50.0% [15.0–85.0] (n=4)" in out  # 2 of the 4 test labels are "no"
    main_table = out.split("teacher vs students")[1].split("confusion")[0]
    table_rows = [line for line in main_table.splitlines() if "│" in line]  # the header's bars are ┃
    assert [row.split("│")[1].strip() for row in table_rows] == [tiny_llm_dir.name, "fresh", "halves"]
    assert "50.0% [15.0–85.0]" in table_rows[0]  # the teacher's 2 of 4, with its Wilson interval
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["dataset"] == "tiny@1" and saved["split"] == "test" and saved["seeds"] == [0]
    assert saved["teacher_calls"] == 0  # the test split's answers are stored: the teacher is not asked
    (test,) = saved["sets"]
    assert test["kind"] == "split" and test["rows"] == 4
    assert [m["name"] for m in test["models"]][1:] == ["fresh", "halves"]
    teacher = test["models"][0]
    assert teacher["kind"] == "teacher" and teacher["accuracy"] == 0.5 and teacher["n"] == 4
    assert teacher["accuracy_ci"] == pytest.approx([0.150, 0.850], abs=5e-4)

    code, out, err = syllabus("eval", "spec.yaml", "--json")  # everything eval.json holds, on stdout
    assert code == 0, err
    printed = json.loads(out)
    assert printed == json.loads((run_dir / "eval.json").read_text())
    again = [{k: v for k, v in m.items() if k != "decode_tok_s"} for m in printed["sets"][0]["models"]]
    assert again == [{k: v for k, v in m.items() if k != "decode_tok_s"} for m in test["models"]]  # only speed varies


def test_eval_before_train_is_a_one_line_error_with_exit_1(project, syllabus):
    code, out, err = syllabus("eval", "spec.yaml")
    assert code == 1 and out == ""
    assert one_line_error(err) == ("error: no trained fresh, halves for tiny@1 with this spec: "
                                   "run `syllabus train spec.yaml` first")


@pytest.mark.parametrize("verb", ["train", "eval"])
@pytest.mark.parametrize("ref, message", [
    ("tiny@9", "error: dataset 'tiny' has no version 9 (latest is 1)"),
    ("tiny@prod", "error: dataset 'tiny' has no version or tag 'prod' (tags: none)"),
    ("nope@1", "error: no dataset 'nope' in store "),
    ("tiny@", "error: bad version reference 'tiny@': use NAME, NAME@N, NAME@latest or NAME@TAG"),
])
def test_a_bad_dataset_reference_is_a_one_line_error_with_exit_1(project, syllabus, verb, ref, message):
    code, out, err = syllabus(verb, "spec.yaml", "--dataset", ref)
    assert code == 1 and out == ""
    assert one_line_error(err).startswith(message)
    assert run_dirs(project) == []


def test_nothing_to_train_is_a_one_line_error_with_exit_1(project, syllabus, tiny_llm_dir, tiny_examples):
    write_spec(project, tiny_llm_dir, students=[], name="none.yaml")
    code, _, err = syllabus("train", "none.yaml")
    assert code == 1 and one_line_error(err) == "error: none.yaml: students: the spec names no student to train"

    # A version whose rows are all held out: nothing to learn from.
    st = store.open(project / "store")
    st.commit("tiny", {"examples": tiny_examples.filter(tiny_examples["split"] != "train")},
              {**LINEAGE, "spec_hash": "h2"}, parent=1)
    code, _, err = syllabus("train", "spec.yaml")
    assert code == 1 and one_line_error(err) == "error: tiny@2 has no train rows to learn from"
    assert run_dirs(project) == [] and st.models() == []


def test_ctrl_c_during_train_exits_130_and_saves_nothing(project, syllabus, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.train, "train_students", interrupted)
    code, out, err = syllabus("train", "spec.yaml")
    assert code == 130 and out == ""
    assert err.startswith("interrupted: ") and err.count("\n") == 1 and "Traceback" not in err
    assert run_dirs(project) == [] and store.open(project / "store").models() == []
    assert list((project / "store" / "staging").iterdir()) == []  # the half-trained students are gone

    monkeypatch.undo()  # the next run trains from scratch, as if nothing had happened
    monkeypatch.chdir(project)
    monkeypatch.setenv("SYLLABUS_STORE", str(project / "store"))
    code, out, _ = syllabus("train", "spec.yaml")
    assert code == 0 and out.startswith("trained: fresh, halves on tiny@1")


def test_ctrl_c_during_eval_exits_130_and_writes_no_report(project, syllabus, monkeypatch):
    assert syllabus("train", "spec.yaml")[0] == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["engine.train.evaluate"], "evaluate_sets", interrupted)
    code, out, err = syllabus("eval", "spec.yaml")
    assert code == 130 and out == ""
    assert err.startswith("interrupted: ") and err.count("\n") == 1 and "Traceback" not in err
    (run_id,) = run_dirs(project)
    assert not (project / "store" / "models" / run_id / "eval.json").exists()


def test_a_run_saved_but_not_recorded_is_recorded_by_the_next_train(project, syllabus, monkeypatch):
    real_record = store.Store.record_model
    calls = []

    def record_then_interrupt(self, **kwargs):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C after the first student's catalog row
        calls.append(kwargs["student"])
        real_record(self, **kwargs)

    monkeypatch.setattr(store.Store, "record_model", record_then_interrupt)
    code, _, err = syllabus("train", "spec.yaml")
    assert code == 130 and err.startswith("interrupted: training on tiny@1 finished but not all its students were")
    assert [m["student"] for m in store.open(project / "store").models()] == ["fresh"]

    monkeypatch.setattr(store.Store, "record_model", real_record)
    code, out, _ = syllabus("train", "spec.yaml")
    assert code == 0 and out.startswith("already trained: fresh, halves")  # not trained twice...
    models = store.open(project / "store").models()
    assert sorted(m["student"] for m in models) == ["fresh", "halves"]  # ...and now every student is listed
    assert all(m["metrics"]["steps"] == 2 for m in models)
