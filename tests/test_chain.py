"""Chained distillation (a trained student as the teacher of another spec) and student sizes before training.

A student trained by `syllabus train` is named `models:RUN_ID/STUDENT`; as `teacher.model` it answers
the next spec's prompts, its weights are its fingerprint, and lineage records the chain. `validate` and
`plan` print each student's size against the teacher and refuse a shape the teacher cannot give.
All on the tiny random teacher of conftest, through the console script's entry point, in-process.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
import yaml

import store
from engine.models import chat_prompt_ids, fingerprint, load_causal_lm, store_model_lineage, use_store

LINEAGE = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}
PROMPTS = ["Is the sky blue?", "Is fire cold?", "Do cats bark?", "Is water wet?", "Can fish fly?",
           "Is snow white?", "Do birds sing?", "Is ice hot?"]


def write(folder, name: str, data: dict) -> str:
    (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


def first_spec(teacher: str, students: list[dict]) -> dict:
    return {
        "name": "tiny",
        "teacher": {"model": teacher, "generation": {"max_new_tokens": 6}, "logprobs": {"top_k": 4}, "batch_size": 1},
        "sources": [{"path": "prompts.jsonl", "text": "prompt"}],
        "students": students,
        "training": {"epochs": 1, "batch_size": 8, "max_steps": 1},
    }


def chained_spec(teacher: str) -> dict:
    return {**first_spec(teacher, [{"name": "again", "from_teacher": {"layers": [1]}}]), "name": "chain",
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_llm_dir, tiny_examples):
    """Working directory with a store ($SYLLABUS_STORE) holding tiny@1, answered by the tiny teacher."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    store.open(tmp_path / "store").commit("tiny", {"examples": tiny_examples}, LINEAGE, parent=None)
    return tmp_path


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def greedy(folder, prompt: str, max_new_tokens: int) -> list[int]:
    """What the student in `folder` says to `prompt`, alone in its batch, up to and including eos."""
    model, tokenizer = load_causal_lm(str(folder))
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# --- chained distillation ------------------------------------------------------------------------


def test_a_trained_student_teaches_the_next_spec_and_lineage_records_the_chain(project, cli, tiny_llm_dir):
    write(project, "first.yaml", first_spec(str(tiny_llm_dir), [{"name": "halves", "from_teacher": {"layers": [0, 2]}}]))
    code, out, err = cli("train", "first.yaml", "-q")
    assert code == 0, err
    st = store.open(project / "store")
    (first,) = st.models()
    run_id = first["run_id"]
    name = f"models:{run_id}/halves"
    folder = project / "store" / "models" / run_id / "halves"
    assert first["lineage"]["teacher"] == str(tiny_llm_dir) and "teacher_chain" not in first["lineage"]

    code, out, err = cli("models")
    assert code == 0, err
    assert name in out and "tiny@1" in out

    write(project, "chain.yaml", chained_spec(name))
    code, out, err = cli("validate", "chain.yaml")
    assert code == 0, err
    assert "chain.yaml: ok" in out and name in out  # the student, now the teacher, heads the size table

    code, out, err = cli("run", "chain.yaml", "-q")
    assert code == 0, err
    assert out.strip() == f"committed chain@1: {len(PROMPTS)} examples, {len(PROMPTS)} teacher calls"
    info = st.resolve("chain@1")
    assert info.teacher.startswith(f"transformers:{name}@sha256:")
    assert info.lineage["teacher_chain"] == {"model": name, "run_id": run_id, "student": "halves",
                                             "dataset": "tiny@1", "spec_hash": first["spec_hash"],
                                             "teacher": str(tiny_llm_dir)}
    # The answers are the trained student's own (alone in its batch: batch_size 1).
    examples = st.read("chain@1", "examples")
    row = examples.filter(examples["prompt"] == PROMPTS[0]).row(0, named=True)
    assert list(row["token_ids"]) == greedy(folder, PROMPTS[0], 6)
    assert greedy(folder, PROMPTS[0], 6) != greedy(tiny_llm_dir, PROMPTS[0], 6)  # not the first teacher's

    code, out, err = cli("show", "chain@1")
    assert code == 0, err
    described = f"{name} (halves of tiny@1, itself distilled from {tiny_llm_dir})"
    assert f"teacher chain    {described}" in out

    code, out, err = cli("train", "chain.yaml", "-q")
    assert code == 0, err
    (second,) = st.models("chain")
    assert second["lineage"] == {"dataset": "chain@1", "teacher": name, "teacher_fingerprint": fingerprint(name),
                                 "teacher_chain": info.lineage["teacher_chain"]}
    code, out, err = cli("eval", "chain.yaml", "-q")  # the teacher row is the trained student
    assert code == 0, err
    assert json.loads((second["path"].parent / "eval.json").read_text())["sets"][0]["models"][0]["name"] == name
    code, out, err = cli("models", "chain", "--json")
    assert code == 0, err
    (listed,) = json.loads(out)
    assert listed["name"] == f"models:{second['run_id']}/again" and listed["lineage"]["teacher"] == name

    # Three deep: the second student's lineage holds the first chain inside its own.
    use_store(project / "store")
    deeper = store_model_lineage(st, f"models:{second['run_id']}/again")
    assert deeper["dataset"] == "chain@1" and deeper["teacher"] == name
    assert deeper["teacher_chain"] == info.lineage["teacher_chain"]
    from engine.models import describe_chain

    assert describe_chain(deeper) == f"models:{second['run_id']}/again (again of chain@1, itself distilled from {described})"


def test_a_missing_chained_teacher_is_one_line_before_any_work(project, cli):
    root = project / "store"
    write(project, "chain.yaml", chained_spec("models:tiny-v1-0000000000/halves"))
    expected = (f"error: chain.yaml: teacher.model: model 'models:tiny-v1-0000000000/halves' is not a trained "
                f"student of store {root}: no {root}/models/tiny-v1-0000000000/halves/config.json "
                "(no run tiny-v1-0000000000 there; `syllabus models` lists the trained students)")
    for verb in (("validate",), ("plan",), ("run", "-q"), ("train", "-q")):
        code, out, err = cli(verb[0], "chain.yaml", *verb[1:])
        assert code == 1 and out == "", (verb, out)
        assert one_line_error(err) == expected, verb
    st = store.open(root)
    assert [v.dataset for v in st.versions()] == ["tiny"]  # nothing ran, nothing was committed
    assert list((root / "cache").glob("teacher*")) == []

    # --store names the store; validate never creates it.
    elsewhere = project / "elsewhere"
    code, _, err = cli("validate", "chain.yaml", "--store", str(elsewhere))
    assert code == 1 and f"is not a trained student of store {elsewhere}:" in err
    assert not elsewhere.exists()

    write(project, "bad.yaml", chained_spec("models:just-a-run"))
    code, _, err = cli("validate", "bad.yaml")
    assert one_line_error(err) == ("error: bad.yaml: teacher.model: model 'models:just-a-run': a trained student "
                                   "is named models:RUN_ID/STUDENT (`syllabus models` lists them)")


def test_a_trained_students_fingerprint_is_its_weights_not_its_records(tmp_path, tiny_llm_dir):
    import shutil

    root = tmp_path / "store"
    folder = root / "models" / "run1" / "s"
    shutil.copytree(tiny_llm_dir, folder)
    (folder / "metrics.json").write_text("{}")
    use_store(root)
    before = fingerprint("models:run1/s")
    assert before.startswith("models:run1/s@sha256:")
    (folder / "metrics.json").write_text('{"steps": 9}')  # a record beside the model, not the model
    assert fingerprint("models:run1/s") == before
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert fingerprint("models:run1/s") != before


def test_a_v2_catalog_gains_model_lineage(tmp_path):
    root = tmp_path / "st"
    s = store.open(root)
    s.commit("demo", {"examples": store_examples()}, LINEAGE, parent=None)
    s.record_model(dataset="demo", version=1, run_id="r", student="a", path=root / "models" / "r" / "a",
                   spec_hash="h", metrics={})
    con = sqlite3.connect(root / "catalog.sqlite")
    con.executescript("ALTER TABLE models DROP COLUMN lineage; PRAGMA user_version=2;")
    con.close()
    s = store.open(root)
    assert [m["lineage"] for m in s.models()] == [{}]  # recorded before lineage was kept
    s.record_model(dataset="demo", version=1, run_id="r", student="b", path=root / "models" / "r" / "b",
                   spec_hash="h", metrics={}, lineage={"teacher": "models:x/y"})
    assert [m["lineage"] for m in s.models()] == [{}, {"teacher": "models:x/y"}]


def store_examples():
    import polars as pl

    return pl.DataFrame({"prompt_id": ["a", "b"], "split": ["train", "test"]})


# --- student sizes before training -------------------------------------------------------------


STUDENTS = [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
            {"name": "halves", "from_teacher": {"layers": [0, 2]}}]


def test_validate_and_plan_show_each_students_size(project, cli, tiny_llm_dir):
    from engine.spec import load_spec
    from engine.train.students import student_shape

    write(project, "spec.yaml", first_spec(str(tiny_llm_dir), STUDENTS))
    spec = load_spec(project / "spec.yaml")
    shapes = {s.name: student_shape(spec, s) for s in spec.students}
    teacher = round(shapes["halves"][0] / shapes["halves"][1])
    for verb in ("validate", "plan"):
        code, out, err = cli(verb, "spec.yaml")
        assert code == 0, err
        rows = {cells[0]: cells[1:] for line in out.splitlines() if "│" in line
                for cells in [[c.strip() for c in line.strip("│ ").split("│")]] if len(cells) == 4}
        assert rows[tiny_llm_dir.name] == ["teacher", f"{teacher / 1e6:.2f}", "1.00x"]
        params, ratio = shapes["fresh"]
        assert rows["fresh"] == ["config", f"{params / 1e6:.2f}", f"{ratio:.2f}x ({1 / ratio:.1f}x smaller)"]
        params, ratio = shapes["halves"]  # half the layers of a model that is mostly embeddings
        assert rows["halves"] == ["from_teacher", f"{params / 1e6:.2f}", f"{ratio:.2f}x"]
    assert 0.9 < shapes["halves"][1] < 1 and shapes["fresh"][1] < 0.6


def test_ratio_text():
    from engine.preflight import ratio_text

    assert ratio_text(0.3684) == "0.37x (2.7x smaller)"
    assert ratio_text(0.99) == "0.99x" and ratio_text(1.0) == "1.00x"
    assert ratio_text(1.2) == "1.20x (1.2x larger)"


def test_a_shape_the_teacher_cannot_give_fails_validate_and_plan_naming_the_field(project, cli, tiny_llm_dir):
    # The tiny teacher has 4 heads in 2 kv groups: 3 heads cannot be pruned evenly within them.
    students = [STUDENTS[0], {"name": "odd", "from_teacher": {"heads": 3}}]
    write(project, "spec.yaml", first_spec(str(tiny_llm_dir), students))
    for verb in ("validate", "plan"):
        code, out, err = cli(verb, "spec.yaml")
        assert code == 1 and out == "", verb
        assert one_line_error(err).startswith("error: spec.yaml: students[1].from_teacher.heads: student 'odd': "
                                              "heads 3 is not divisible by the teacher's 2 kv heads")
    write(project, "spec.yaml", first_spec(str(tiny_llm_dir), [{"name": "deep", "from_teacher": {"keep_layers": 9}}]))
    code, _, err = cli("validate", "spec.yaml")
    assert one_line_error(err) == ("error: spec.yaml: students[0].from_teacher.keep_layers: student 'deep': "
                                   "keep_layers 9 is more than the teacher's 4 layers")


def test_validate_without_a_readable_teacher_notes_why_it_shows_no_sizes(project, cli):
    write(project, "spec.yaml", first_spec("no-such-model", STUDENTS))
    code, out, err = cli("validate", "spec.yaml")
    assert code == 0, err
    assert "note: student sizes not computed: teacher.model: model 'no-such-model' is neither" in out


def test_a_trimmed_vocabulary_is_shown_at_its_floor(project, cli, tiny_llm_dir):
    from engine.spec import FromTeacher

    if "vocab" not in FromTeacher.model_fields:
        pytest.skip("from_teacher.vocab is not in this build")
    students = [{"name": "small", "from_teacher": {"layers": [0, 2], "vocab": {"keep_frequent": 500}}}]
    write(project, "spec.yaml", first_spec(str(tiny_llm_dir), students))
    code, out, err = cli("validate", "spec.yaml")
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if "│ small" in line]
    params, ratio = [c.strip() for c in row.strip("│ ").split("│")][2:]
    assert params.startswith("≥ ") and ratio.startswith("≥ ") and "x smaller" in ratio
    assert "trimmed vocabulary (vocab:) at its floor" in " ".join(out.split())
