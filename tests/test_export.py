"""`syllabus export` gives what the students learned from: read back with the teacher's chat template,
each example is exactly the context and targets `syllabus train` used for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

import store
from engine.cli import app
from engine.curate import pipeline
from engine.models import load_tokenizer
from engine.spec import load_spec
from engine.train.data import collate, encode, student_texts
from engine.train.losses import teacher_log_probs

ROOT = Path(__file__).resolve().parent.parent
TEACHER_PROMPT = "Answer yes or no. {{ prompt }}"
STUDENT_PROMPT = "Student, answer briefly: {{ prompt }}"  # differs from the teacher's: the test tells them apart


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_llm_dir):
    """One version curated by the tiny random teacher, whose spec has a student prompt in a template file
    named relative to the spec (so it resolves beside the spec from any working directory)."""
    work = tmp_path_factory.mktemp("export")
    lines = [json.dumps({"text": f"Question number {i}: is {i} an even number?", "gold": "yes" if i % 2 == 0 else "no"})
             for i in range(12)]
    (work / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (work / "student.j2").write_text(STUDENT_PROMPT)
    spec = {
        "name": "tiny",
        "teacher": {"model": str(tiny_llm_dir), "prompt": TEACHER_PROMPT, "generation": {"max_new_tokens": 8},
                    "batch_size": 4},
        "sources": [{"path": str(work / "prompts.jsonl"), "text": "text", "label": "gold"}],
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "splits": {"train": 0.75, "val": 0.0, "test": 0.25},
        "training": {"student_prompt": "student.j2"},
    }
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    st = store.open(work / "store")
    pipeline.run(load_spec(work / "spec.yaml"), st, progress=False)
    return {"work": work, "store": st, "spec": load_spec(work / "spec.yaml")}


def trainer_view(made, tiny_llm_dir):
    """What `syllabus train` feeds the students from tiny@1: (train rows, their Encoded, the tokenizer)."""
    train = made["store"].read("tiny@1", "examples").filter(pl.col("split") == "train")
    tokenizer = load_tokenizer(str(tiny_llm_dir))  # the trainer's: the teacher's own tokenizer
    return train, encode(train, tokenizer, student_texts(train, made["spec"].training.student_prompt)), tokenizer


def cli(st, *args):
    return CliRunner().invoke(app, [*args, "--store", str(st.root)])


def chat_ids(tokenizer, messages, **kw) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, return_dict=True, **kw)["input_ids"])


def test_jsonl_is_the_context_and_targets_the_trainer_used(made, tiny_llm_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    r = cli(made["store"], "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "train.jsonl"),
            "--split", "train")
    assert r.exit_code == 0, r.output
    lines = datasets.load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train",
                                  cache_dir=str(tmp_path / "hf-cache"))
    train, encoded, _ = trainer_view(made, tiny_llm_dir)
    # The bundled teacher's tokenizer, as another trainer would load it (the tiny teacher has the same).
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert lines.num_rows == len(encoded) == train.height > 0
    for line, e, row in zip(lines, encoded, train.iter_rows(named=True)):
        messages = line["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[0]["content"].startswith("Student, answer briefly: Question number")
        # Context: exactly the trainer's prompt ids (the template's default system prompt included).
        assert chat_ids(tokenizer, messages[:-1], add_generation_prompt=True) == e.prompt_ids
        # Targets: the assistant text is the teacher's tokens decoded, and the whole chat is the context,
        # that text and the turn's end. Re-tokenizing gives the tokens back only where they are the
        # tokenizer's own encoding (not so for a random teacher): exact tokens are in the Parquet.
        assert e.token_ids == row["token_ids"]
        assert messages[1]["content"] == tokenizer.decode(e.token_ids, skip_special_tokens=True).strip()
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        assert full == tokenizer.decode(e.prompt_ids) + messages[1]["content"] + "<|im_end|>\n"


def test_prompt_choices_meta_and_hf(made, tmp_path):
    datasets = pytest.importorskip("datasets")
    st = made["store"]
    rows = st.read("tiny@1", "examples")

    def users(path: Path) -> list[str]:
        return [json.loads(x)["messages"][0]["content"] for x in path.read_text().splitlines()]

    for choice, column in (("teacher", "teacher_prompt"), ("source", "prompt")):
        r = cli(st, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / f"{choice}.jsonl"),
                "--prompt", choice)
        assert r.exit_code == 0, r.output
        assert users(tmp_path / f"{choice}.jsonl") == rows[column].to_list()
    assert rows["teacher_prompt"][0].startswith("Answer yes or no. Question number")

    # --with-meta: the filtering columns beside messages, in jsonl and hf alike; finish_reason where the
    # version has it.
    meta = ["prompt_id", "category", "split", "label", *(c for c in rows.columns if c.startswith("conf_")),
            *(["finish_reason"] if "finish_reason" in rows.columns else [])]
    r = cli(st, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "m.jsonl"), "--with-meta")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert list(lines[0]) == ["messages", *meta] and [x["prompt_id"] for x in lines] == rows["prompt_id"].to_list()
    r = cli(st, "export", "tiny@1", "--format", "hf", "--out", str(tmp_path / "hf"), "--with-meta", "--split", "test")
    assert r.exit_code == 0, r.output
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    test = [x for x in lines if x["split"] == "test"]
    assert ds.column_names == ["messages", *meta] and ds.num_rows == len(test) > 0
    assert [d["messages"] for d in ds] == [x["messages"] for x in test]
    assert ds[0]["messages"][0]["content"].startswith("Student, answer briefly:")


def test_parquet_readme_snippet_gives_the_trainers_kd_targets(made, tiny_llm_dir, tmp_path, monkeypatch):
    r = cli(made["store"], "export", "tiny@1", "--format", "parquet", "--out", str(tmp_path / "demo.parquet"),
            "--split", "train")
    assert r.exit_code == 0, r.output
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- parquet-kd-example:start -->\n```python\n(.*?)```\n<!-- parquet-kd-example:end -->",
                        readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(snippet, "README.md", "exec"), ns)

    train, encoded, tokenizer = trainer_view(made, tiny_llm_dir)
    assert ns["row"]["prompt_id"] == train["prompt_id"][0]
    batch = collate([encoded[0]], tokenizer.pad_token_id)  # the trainer's tensors for that row
    assert ns["context"] == encoded[0].prompt_ids and ns["input_ids"] == batch["input_ids"][0].tolist()
    n = len(ns["row"]["token_ids"])
    assert batch["mask"][0].nonzero().flatten().tolist() == list(range(len(ns["context"]) - 1, len(ns["context"]) - 1 + n))
    assert torch.equal(ns["topk_ids"], batch["topk_ids"])
    T = ns["T"]
    expected = (teacher_log_probs(batch["topk_logprobs"]) / T).log_softmax(-1).exp()  # losses.kl_per_token's q
    torch.testing.assert_close(ns["p_teacher_T"], expected)
    assert ns["p_teacher_T"].shape == (n, batch["topk_ids"].shape[1] + 1)


def hand_made(made, tmp_path, spec_text: str, spec_path: Path | None = None) -> store.Store:
    """tiny@1's examples committed to another store under a lineage spec of the test's choosing."""
    st = store.open(tmp_path / "st")
    lineage = {"spec_text": spec_text, "spec_hash": "h", "teacher": "t", "code_version": "0", "stats": {},
               "spec_path": str(spec_path) if spec_path else None}
    st.commit("tiny", {"examples": made["store"].read("tiny@1", "examples").to_arrow()}, lineage, parent=None)
    return st


def base_spec(made, **training) -> str:
    spec = yaml.safe_load((made["work"] / "spec.yaml").read_text())
    spec.pop("training")
    if training:
        spec["training"] = training
    return yaml.safe_dump(spec)


def test_student_without_a_student_prompt_says_it_used_the_teachers(made, tmp_path):
    st = hand_made(made, tmp_path, base_spec(made))
    r = cli(st, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "s.jsonl"), "--prompt", "student")
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == ("note: tiny@1: its spec has no training.student_prompt: the user turn is the "
                                "teacher's prompt, as `syllabus train` used")
    users = [json.loads(x)["messages"][0]["content"] for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert users == st.read("tiny@1", "examples")["teacher_prompt"].to_list()
    r = cli(st, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "d.jsonl"))  # the default: no note
    assert r.exit_code == 0 and r.stderr == ""
    assert (tmp_path / "d.jsonl").read_text() == (tmp_path / "s.jsonl").read_text()


def test_spec_problems_are_one_line_errors(made, tmp_path):
    elsewhere = tmp_path / "moved" / "spec.yaml"  # student.j2 is neither here nor beside it
    st = hand_made(made, tmp_path, base_spec(made, student_prompt="student.j2"), elsewhere)
    r = cli(st, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "x.jsonl"))
    assert r.exit_code == 1 and str(r.exception) == (
        f"tiny@1: training.student_prompt: template file student.j2 no longer resolves (from here or beside "
        f"{elsewhere}): restore it, or export with --prompt teacher")
    assert not (tmp_path / "x.jsonl").exists()
    r = cli(st, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "x.jsonl"), "--prompt", "teacher")
    assert r.exit_code == 0, r.output  # the teacher's prompt needs no spec

    st2 = hand_made(made, tmp_path / "b", "name: tiny\ntraining: {student_prompt: '{{ prompt }}'}\n")
    r = cli(st2, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "y.jsonl"))
    assert r.exit_code == 1 and "\n" not in str(r.exception)
    assert str(r.exception).startswith("tiny@1: the spec it was made from no longer parses (<spec>: teacher: Field required")
    r = cli(st2, "export", "tiny@1", "--format", "jsonl", "--out", str(tmp_path / "y.jsonl"), "--prompt", "best")
    assert r.exit_code == 1 and str(r.exception) == "unknown --prompt 'best': use student, teacher, source"


@pytest.mark.e2e
def test_jsonl_tokens_round_trip_on_the_bundled_teacher(tmp_path):
    """With the real teacher, whose answers are its tokenizer's own encoding, the JSONL line through the
    chat template is token for token the trainer's context + the teacher's tokens (+ the eos a cut-off
    answer lacked) + the template's closing newline."""
    datasets = pytest.importorskip("datasets")
    reviews = (ROOT / "specs/data/demo.jsonl").read_text().splitlines()[::9][:6]
    (tmp_path / "reviews.jsonl").write_text("\n".join(reviews) + "\n")
    spec = {
        "name": "demo",
        "teacher": {"model": "smollm2-135m-instruct", "prompt": str(ROOT / "templates/sentiment_teacher.j2"),
                    "generation": {"max_new_tokens": 12}, "batch_size": 6},
        "sources": [{"path": str(tmp_path / "reviews.jsonl"), "text": "review", "label": "answer"}],
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
        "training": {"student_prompt": "Review: {{ prompt }}\nSentiment:"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    st = store.open(tmp_path / "store")
    pipeline.run(load_spec(tmp_path / "spec.yaml"), st, progress=False)
    r = cli(st, "export", "demo@1", "--format", "jsonl", "--out", str(tmp_path / "train.jsonl"), "--split", "train")
    assert r.exit_code == 0, r.output
    lines = datasets.load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train",
                                  cache_dir=str(tmp_path / "hf-cache"))
    train = st.read("demo@1", "examples").filter(pl.col("split") == "train")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    encoded = encode(train, tokenizer, student_texts(train, load_spec(tmp_path / "spec.yaml").training.student_prompt))
    eos, newline = tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(encoded) == lines.num_rows == len(reviews)
    assert {e.token_ids[-1] == eos for e in encoded} == {True, False}  # answers that stopped, and cut-off ones
    for line, e in zip(lines, encoded):
        assert line["messages"][0]["content"].startswith("Review: ")
        ending = [] if e.token_ids[-1] == eos else [eos]  # a cut-off answer (finish_reason length) gains one
        assert chat_ids(tokenizer, line["messages"]) == e.prompt_ids + e.token_ids + ending + newline
