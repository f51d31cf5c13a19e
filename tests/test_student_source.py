"""On-policy rows as data: `from: students:RUN_ID/STUDENT` — a trained student answers the prompts of the
version it was trained on, and the teacher scores exactly its tokens into a new version.

All on the tiny random teacher of conftest, through the console script's entry point, in-process: a student
is trained into a tmp store first, then a second spec reads its answers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import store
from engine.models import chat_prompt_ids, fingerprint, load_causal_lm
from engine.spec import parse_spec
from engine.errors import SpecError

LINEAGE = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}
MAX_NEW_TOKENS = 6
TOP_K = 4


def write(folder, name: str, data: dict) -> str:
    (folder / name).write_text(yaml.safe_dump(data, sort_keys=False))
    return name


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def teacher_block(teacher: str) -> dict:
    # batch_size 1: the student and the teacher each see one prompt at a time, as the checks below do
    return {"model": teacher, "generation": {"max_new_tokens": MAX_NEW_TOKENS}, "logprobs": {"top_k": TOP_K},
            "batch_size": 1}


def on_policy_spec(teacher: str, source: str, **more) -> dict:
    return {"name": "onpolicy", "teacher": teacher_block(teacher),
            "sources": [{"from": source, "where": "split = 'train'", **more}],
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llm_dir, tiny_examples):
    """A store holding tiny@1 (the tiny teacher's answers) and a student trained on it: (root, run_id)."""
    from engine.train.runs import train

    root = tmp_path_factory.mktemp("student-source") / "store"
    st = store.open(root)
    st.commit("tiny", {"examples": tiny_examples}, LINEAGE, parent=None)
    spec = parse_spec({"name": "tiny", "teacher": teacher_block(str(tiny_llm_dir)),
                       "sources": [{"path": "unused.jsonl"}],
                       "students": [{"name": "halves", "from_teacher": {"layers": [0, 2]}}],
                       "training": {"epochs": 1, "batch_size": 8, "max_steps": 1}})
    return root, train(spec, st, "tiny@1", progress=False).run_id


@pytest.fixture
def project(tmp_path, monkeypatch, trained):
    """Working directory with a copy of the trained store ($SYLLABUS_STORE): (folder, run_id)."""
    root, run_id = trained
    shutil.copytree(root, tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    return tmp_path, run_id


def greedy(folder, prompt: str) -> list[int]:
    """What the model in `folder` says to `prompt`, alone in its batch, up to and including eos."""
    model, tokenizer = load_causal_lm(str(folder))
    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def forced_topk(folder, prompt: str, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's top-k (log-probs, ids) at each of `tokens` after `prompt`: one plain forward pass."""
    model, tokenizer = load_causal_lm(str(folder))
    context = chat_prompt_ids(tokenizer, prompt)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([context + tokens[:-1]])).logits[0, len(context) - 1:]
    return logits.float().log_softmax(-1).topk(TOP_K, -1)


def test_a_students_answers_scored_by_the_teacher_become_a_version(project, cli, tiny_llm_dir, tiny_examples,
                                                                   monkeypatch):
    folder, run_id = project
    source = f"students:{run_id}/halves"
    student_dir = folder / "store" / "models" / run_id / "halves"
    write(folder, "onpolicy.yaml", on_policy_spec(str(tiny_llm_dir), source))
    code, out, err = cli("validate", "onpolicy.yaml")
    assert code == 0, err
    train_rows = tiny_examples.filter(tiny_examples["split"] == "train")
    n = train_rows.height
    # plan: the teacher generates nothing here; it scores each student answer (a teacher call each).
    code, out, err = cli("plan", "onpolicy.yaml")
    assert code == 0, err
    assert f"teacher calls to pay: {n} of {n} prompts" in out
    assert f"student sources: {n} rows, answered by their students ({n} answers to generate) and scored by the " \
           f"teacher ({n} scorings to pay, counted above)" in " ".join(out.split())

    code, out, err = cli("run", "onpolicy.yaml", "-q")
    assert code == 0, err
    # One scoring by the teacher per row; the student's generations are not teacher calls.
    assert out.strip() == f"committed onpolicy@1: {train_rows.height} examples, {train_rows.height} teacher calls"

    st = store.open(folder / "store")
    examples = st.read("onpolicy@1", "examples")
    assert sorted(examples["prompt"].to_list()) == sorted(train_rows["prompt"].to_list())
    assert set(examples["origin"]) == {"student"} and set(examples["source"]) == {source}
    assert not {"student_source", "student_row"} & set(examples.columns)  # what teach needed, never committed
    for row in examples.iter_rows(named=True):
        tokens = greedy(student_dir, row["prompt"])
        assert list(row["token_ids"]) == tokens  # the student's own greedy answer ...
        values, ids = forced_topk(tiny_llm_dir, row["teacher_prompt"], tokens)  # ... scored by the teacher
        assert [list(k) for k in row["topk_ids"]] == ids.tolist()
        assert torch.allclose(torch.tensor([list(v) for v in row["topk_logprobs"]], dtype=torch.float32),
                              values, atol=2e-2)
        assert row["conf_mean_token_prob"] is not None and row["finish_reason"] in ("stop", "length")
    teachers = dict(zip(tiny_examples["prompt"], tiny_examples["token_ids"].to_list()))
    assert any(list(r["token_ids"]) != teachers[r["prompt"]] for r in examples.iter_rows(named=True))  # not the teacher's
    _, tokenizer = load_causal_lm(str(student_dir))
    first = examples.row(0, named=True)
    assert first["response"] == tokenizer.decode(first["token_ids"], skip_special_tokens=True).strip()

    info = st.resolve("onpolicy@1")
    (record,) = info.stats["sources"]["students"]
    assert record == {"source": "sources[0]", "run_id": run_id, "student": "halves", "model": f"models:{run_id}/halves",
                      "fingerprint": fingerprint(f"models:{run_id}/halves"), "dataset": "tiny@1",
                      "spec_hash": st.models()[0]["spec_hash"], "teacher": str(tiny_llm_dir)}
    scored = info.stats["teach"]["students"]
    assert scored["scored_by"] == info.teacher and info.teacher.startswith("transformers:")
    assert scored["student_calls"] == scored["teacher_scorings"] == scored["rows"] == train_rows.height
    code, out, err = cli("show", "onpolicy@1")
    assert code == 0, err
    assert f"'run_id': '{run_id}'" in out and "'student': 'halves'" in out and "'dataset': 'tiny@1'" in out

    # A re-run commits nothing new and pays nothing; nor does one whose stage cache is gone (the request
    # cache holds the student's answers and the teacher's scorings): no model is even loaded.
    code, out, err = cli("run", "onpolicy.yaml", "-q")
    assert code == 0, err
    assert out.strip() == f"nothing new: onpolicy@1 already holds this data ({train_rows.height} examples, 0 teacher calls)"
    shutil.rmtree(folder / "store" / "cache" / "stages")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("engine.teachers.transformers_backend.load_causal_lm", no_model)
    code, out, err = cli("plan", "onpolicy.yaml")  # from the request cache alone: nothing left to pay
    assert code == 0, err
    assert "teacher calls to pay: 0" in out and "(0 answers to generate)" in out and "(0 scorings to pay" in \
        " ".join(out.split())
    code, out, err = cli("run", "onpolicy.yaml", "-q")
    assert code == 0, err
    assert out.strip().startswith("nothing new: onpolicy@1") and out.strip().endswith("0 teacher calls)")


def test_the_student_reads_its_context_as_it_was_trained(project, cli, tiny_llm_dir, tiny_examples):
    """training.student_prompt of the spec the version was made from: the student answers what it read."""
    folder, run_id = project
    root = folder / "store"
    trained_on = {"name": "tiny", "teacher": {"model": str(tiny_llm_dir)}, "sources": [{"path": "unused.jsonl"}],
                  "training": {"student_prompt": "Q: {{ prompt }}"}}
    st = store.open(root)
    lineage = {**LINEAGE, "spec_text": yaml.safe_dump(trained_on), "spec_hash": "h2"}
    st.commit("tiny", {"examples": tiny_examples}, lineage, parent=1)
    shutil.copytree(root / "models" / run_id, root / "models" / "context-run")
    st.record_model(dataset="tiny", version=2, run_id="context-run", student="halves",
                    path=root / "models" / "context-run" / "halves", spec_hash="h2", metrics={})
    write(folder, "ctx.yaml", on_policy_spec(str(tiny_llm_dir), "students:context-run/halves"))
    code, out, err = cli("run", "ctx.yaml", "-q")
    assert code == 0, err
    examples = st.read("onpolicy@1", "examples")
    student = root / "models" / "context-run" / "halves"
    for row in examples.head(3).iter_rows(named=True):
        assert list(row["token_ids"]) == greedy(student, f"Q: {row['prompt']}")
        assert row["teacher_prompt"] == row["prompt"]  # the teacher reads its own context
    (record,) = st.resolve("onpolicy@1").stats["sources"]["students"]
    assert record["dataset"] == "tiny@2" and record["teacher"] == "tiny"  # no lineage recorded: the version's teacher


def test_sampled_answers_follow_the_sources_seed(project, cli, tiny_llm_dir):
    folder, run_id = project
    source = f"students:{run_id}/halves"
    firsts = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        spec = {**on_policy_spec(str(tiny_llm_dir), source, temperature=1.5, seed=seed, max_new_tokens=4),
                "name": name}
        write(folder, f"{name}.yaml", spec)
        code, out, err = cli("run", f"{name}.yaml", "-q")
        assert code == 0, err
        examples = store.open(folder / "store").read(f"{name}@1", "examples").sort("prompt_id")
        assert examples["token_ids"].list.len().max() <= 4
        firsts.append(examples["token_ids"].to_list())
    assert firsts[0] == firsts[1] and firsts[0] != firsts[2]


def test_a_bad_run_or_student_is_one_line_naming_the_field(project, cli, tiny_llm_dir):
    folder, run_id = project
    root = folder / "store"
    cases = {
        "students:no-such-run/halves": "(no run no-such-run there;",
        f"students:{run_id}/nobody": f"(run {run_id} has halves;",
    }
    for source, says in cases.items():
        write(folder, "bad.yaml", on_policy_spec(str(tiny_llm_dir), source))
        for verb in (("validate",), ("plan",), ("run", "-q")):
            code, out, err = cli(verb[0], "bad.yaml", *verb[1:])
            assert code == 1, (verb, out)
            line = one_line_error(err)
            assert line.startswith(f"error: bad.yaml: sources[0].from: {source}: ") and says in line, (verb, line)

    write(folder, "bad.yaml", on_policy_spec(str(tiny_llm_dir), "students:just-a-run"))
    code, _, err = cli("validate", "bad.yaml")
    assert one_line_error(err) == ("error: bad.yaml: sources[0].from: 'students:just-a-run': a trained student is "
                                   "named students:RUN_ID/STUDENT (`syllabus models` lists them as "
                                   "models:RUN_ID/STUDENT)")

    # A run folder the catalog does not know (copied from another store): which version it learnt is unknown.
    shutil.copytree(root / "models" / run_id, root / "models" / "elsewhere-run")
    write(folder, "bad.yaml", on_policy_spec(str(tiny_llm_dir), "students:elsewhere-run/halves"))
    code, out, err = cli("run", "bad.yaml", "-q")
    assert code == 1
    assert one_line_error(err).startswith("error: bad.yaml: sources[0].from: students:elsewhere-run/halves: run "
                                          f"elsewhere-run is not recorded in the catalog of store {root}")
    assert [v.dataset for v in store.open(root).versions()] == ["tiny"]  # nothing committed


def test_a_student_with_other_token_ids_is_refused(project, cli, tiny_llm_dir):
    """A trimmed vocabulary (from_teacher.vocab) gives the student its own ids: here two ids swapped."""
    folder, run_id = project
    student = folder / "store" / "models" / run_id / "halves"
    tokenizer_json = json.loads((student / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    a, b = "yes", "no"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (student / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    write(folder, "bad.yaml", on_policy_spec(str(tiny_llm_dir), f"students:{run_id}/halves"))
    code, _, err = cli("validate", "bad.yaml")
    assert code == 1
    assert one_line_error(err).startswith(f"error: bad.yaml: sources[0].from: students:{run_id}/halves: the "
                                          "student's tokenizer is not the teacher's")


def test_the_spec_says_which_fields_and_teachers_a_student_source_takes():
    def problem(teacher: dict, source: dict) -> str:
        with pytest.raises(SpecError) as e:
            parse_spec({"name": "x", "teacher": teacher, "sources": [source]})
        return str(e.value)

    local = {"model": "tiny"}
    assert problem(local, {"inline": ["a"], "temperature": 0.5}) == (
        "<spec>: sources[0]: temperature: only for a `from: students:RUN_ID/STUDENT` source (how the student answers)")
    server = {"model": "m", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "tokenizer": "tiny"}
    assert problem(server, {"from": "students:r/s"}).startswith(
        "<spec>: sources[0].from: the teacher scores the student's own tokens teacher-forced: it needs "
        "teacher.backend: transformers")
    spec = parse_spec({"name": "x", "teacher": local, "sources": [{"from": "students:r/s", "where": "split = 'train'",
                                                                   "max_new_tokens": 9}]})
    assert spec.sources[0].student == ("r", "s") and spec.sources[0].origin == "students:r/s"
    assert parse_spec({"name": "x", "teacher": local, "sources": [{"from": "demo@1"}]}).sources[0].student is None
