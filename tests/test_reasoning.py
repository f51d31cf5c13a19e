"""Reasoning capture: a response without the answer marker keeps answer null and is counted; the trainer
weighs reasoning and answer tokens apart (training.loss.reasoning_weight / answer_weight)."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

import store
from engine.cli import app
from engine.curate import pipeline
from engine.errors import SpecError
from engine.scoring import teacher_gold
from engine.spec import Loss, load_spec, parse_spec
from engine.train.data import collate, encode, response_logits
from engine.train.loop import _loss, token_weights
from engine.train.losses import distillation_loss
from engine.train.runs import training_hash

MARKER = "Answer:"
N_PROMPTS = 8
SAYS = {"Is 0 even?": "Zero splits in two. Answer: yes", "Is 1 even?": "One is odd. Answer: no",
        "Is 2 even?": "Two halves. Answer: no"}  # the third is wrong against gold


@pytest.fixture
def project(tmp_path, tiny_llm_dir, monkeypatch):
    rows = [{"q": f"Is {i} even?", "gold": "yes" if i % 2 == 0 else "no"} for i in range(N_PROMPTS)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "think",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6}, "batch_size": 4,
                    "reasoning": {"suffix": " Think, then write 'Answer:' and the answer.", "answer_marker": MARKER}},
        "sources": [{"path": "p.jsonl", "text": "q", "label": "gold"}],
        "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def says(monkeypatch, texts: dict[str, str]) -> None:
    """The tiny random model never writes the marker: the prompts in `texts` answer those texts instead,
    as token ids of the teacher's tokenizer ending in eos."""
    from engine.teachers.transformers_backend import TransformersTeacher

    real = TransformersTeacher.generate

    def generate(self, prompts, on_batch=None, max_new_tokens=None):
        outs = real(self, prompts, on_batch=None, max_new_tokens=max_new_tokens)
        for prompt, out in zip(prompts, outs):
            text = next((t for q, t in texts.items() if str(prompt).startswith(q)), None)
            if text is not None:
                ids = self.tokenizer.encode(text) + [self.tokenizer.eos_token_id]
                out.text, out.finish_reason = text, "stop"
                out.token_ids = np.array(ids, dtype=np.int32)
                out.token_logprobs = np.full(len(ids), -0.1, dtype=np.float32)
                out.topk_ids = np.array([[i, i + 1] for i in ids], dtype=np.int32)
                out.topk_logprobs = np.tile(np.array([-0.1, -3.0], dtype=np.float16), (len(ids), 1))
        if on_batch:
            on_batch(list(range(len(prompts))), outs)
        return outs

    monkeypatch.setattr(TransformersTeacher, "generate", generate)


def test_a_response_without_the_marker_is_kept_with_answer_null_and_counted(project, monkeypatch):
    says(monkeypatch, SAYS)
    result = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    examples = store.open(project / "store").read("think@1", "examples").sort("prompt")
    assert examples.height == N_PROMPTS  # nothing dropped
    marked = examples.filter(pl.col("prompt").is_in(list(SAYS)))
    assert dict(zip(marked["prompt"], marked["answer"])) == {"Is 0 even?": "yes", "Is 1 even?": "no",
                                                             "Is 2 even?": "no"}
    assert marked.filter(prompt="Is 0 even?")["reasoning"][0] == "Zero splits in two."
    broken = examples.filter(~pl.col("prompt").is_in(list(SAYS)))
    assert broken["answer"].null_count() == N_PROMPTS - len(SAYS)
    assert broken["reasoning"].to_list() == broken["response"].str.strip_chars().to_list()  # the text is kept
    assert result.stage_stats["teach"]["answer_format_broken"] == N_PROMPTS - len(SAYS)
    # Against gold a null answer is "no answer": right only where the marked answer matches (0 and 1).
    assert result.gold["n"] == N_PROMPTS and result.gold["correct"] == 2

    shown = CliRunner().invoke(app, ["show", "think@1", "--store", "store"])
    assert shown.exit_code == 0
    line = f"answer format: {N_PROMPTS - len(SAYS)} of {N_PROMPTS} responses lack the answer marker"
    assert line in " ".join(shown.output.split())
    assert f"answer_format_broken={N_PROMPTS - len(SAYS)}" in shown.output  # the teach stage's stats

    # Export: the chat carries the whole response; the parquet rows keep answer null.
    for fmt, out in (("jsonl", "out.jsonl"), ("parquet", "out.parquet")):
        exported = CliRunner().invoke(app, ["export", "think@1", "--format", fmt, "--out", out, "--store", "store"])
        assert exported.exit_code == 0, exported.output
    chats = [json.loads(line) for line in (project / "out.jsonl").read_text().splitlines()]
    assert sorted(c["messages"][-1]["content"] for c in chats) == sorted(examples["response"])
    assert pl.read_parquet(project / "out.parquet")["answer"].null_count() == N_PROMPTS - len(SAYS)


def test_the_run_summary_prints_the_count(project, monkeypatch):
    says(monkeypatch, SAYS)
    ran = CliRunner().invoke(app, ["run", "spec.yaml", "--store", "store"])
    assert ran.exit_code == 0, ran.output
    assert f"answer format: {N_PROMPTS - len(SAYS)} of {N_PROMPTS} responses lack" in " ".join(ran.output.split())


def test_without_a_marker_the_whole_response_is_the_answer(project):
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    del spec["teacher"]["reasoning"]
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    examples = store.open(project / "store").read("think@1", "examples")
    assert examples["answer"].null_count() == 0 and "answer_format_broken" not in result.stage_stats["teach"]
    assert examples["answer"].to_list() == examples["response"].str.strip_chars().to_list()


def test_teacher_gold_counts_a_null_answer_as_no_answer():
    rows = pl.DataFrame({"answer": ["yes", None, None, "no"], "label": ["yes", "yes", "no", "no"]})
    gold = teacher_gold(rows)
    assert gold["n"] == 4 and gold["correct"] == 2 and gold["top_answer"]["answer"] == "no answer"


# --- the trainer's token weights ----------------------------------------------------------------

def two_token_case():
    """Two response tokens, by hand (T = 1, bucket tail). Token 1: teacher stores ids 0, 1 with p = 0.5, 0.3
    (tail 0.2), the student's softmax is (0.2, 0.5, 0.3), the teacher's token id 1. Token 2: teacher stores
    ids 2, 0 with p = 0.6, 0.3 (tail: id 1, 0.1), the student's softmax (0.1, 0.7, 0.2), the token id 2."""
    logits = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.7, 0.2]]).log()
    ids = torch.tensor([[0, 1], [2, 0]])
    lps = torch.tensor([[0.5, 0.3], [0.6, 0.3]]).log()
    targets = torch.tensor([1, 2])
    kl = [0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3),
          0.6 * math.log(0.6 / 0.2) + 0.3 * math.log(0.3 / 0.1) + 0.1 * math.log(0.1 / 0.7)]
    ce = [-math.log(0.5), -math.log(0.2)]
    return logits, ids, lps, targets, kl, ce


def test_weighted_loss_is_the_weighted_sum_over_the_token_count_by_hand():
    logits, ids, lps, targets, kl, ce = two_token_case()
    w = torch.tensor([0.25, 2.0])
    parts = distillation_loss(logits, ids, lps, targets, kd_weight=0.7, hard_weight=0.3, temperature=1.0, weights=w)
    # Normalised by the 2 tokens, not by the weights' sum 2.25.
    kd, hard = (0.25 * kl[0] + 2.0 * kl[1]) / 2, (0.25 * ce[0] + 2.0 * ce[1]) / 2
    assert parts.kd.item() == pytest.approx(kd, rel=1e-5) and parts.ce.item() == pytest.approx(hard, rel=1e-5)
    assert parts.loss.item() == pytest.approx(0.7 * kd + 0.3 * hard, rel=1e-5) and parts.tokens == 2
    renormalised = distillation_loss(logits, ids, lps, targets, kd_weight=0.0, hard_weight=1.0, temperature=1.0,
                                     tail="renormalise", weights=w)  # the hard CE through cross_entropy
    assert renormalised.ce.item() == pytest.approx(hard, rel=1e-5)
    # Weights of 1 give the plain mean.
    ones = distillation_loss(logits, ids, lps, targets, kd_weight=0.7, hard_weight=0.3, temperature=1.0,
                             weights=torch.ones(2))
    assert ones.kd.item() == pytest.approx(sum(kl) / 2, rel=1e-5) and ones.ce.item() == pytest.approx(sum(ce) / 2)


@pytest.fixture(scope="module")
def marked_batch(tiny_llm_dir):
    """Two examples as the trainer encodes them: one whose response holds the marker, one without."""
    from engine.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    eos = tokenizer.eos_token_id
    responses = ["Two halves, so even. Answer: yes", "no marker here"]
    token_ids = [tokenizer.encode(r) + [eos] for r in responses]
    frame = pl.DataFrame({
        "token_ids": token_ids,
        "topk_ids": [[[t, t + 1] for t in ids] for ids in token_ids],
        "topk_logprobs": [[[-0.2, -2.0] for _ in ids] for ids in token_ids],
    }, schema={"token_ids": pl.List(pl.Int32), "topk_ids": pl.List(pl.List(pl.Int32)),
               "topk_logprobs": pl.List(pl.List(pl.Float16))})
    encoded = encode(frame, tokenizer, ["Is 2 even?", "Is 3 even?"], MARKER)
    return model, tokenizer, encoded, collate(encoded, tokenizer.pad_token_id)


def test_answer_tokens_start_after_the_marker_on_the_teachers_ids(marked_batch):
    _, tokenizer, encoded, batch = marked_batch
    first, second = encoded
    assert tokenizer.decode(first.token_ids[: first.answer_from]).endswith(MARKER)
    assert tokenizer.decode(first.token_ids[first.answer_from :], skip_special_tokens=True) == " yes"
    assert second.answer_from == 0  # no marker: every token is an answer token
    expected = [j >= first.answer_from for j in range(len(first.token_ids))] + [True] * len(second.token_ids)
    assert batch["answer_mask"].tolist() == expected


def test_the_trainer_weighs_reasoning_and_answer_tokens(marked_batch):
    model, _, _, batch = marked_batch
    loss = Loss(kd_weight=0.7, hard_weight=0.3, temperature=2.0, reasoning_weight=0.25, answer_weight=2.0)
    with torch.no_grad():
        parts = _loss(model, batch, loss, 0.3, 2.0)
        logits = response_logits(model, batch)
        per_token = [distillation_loss(logits[t : t + 1], batch["topk_ids"][t : t + 1],
                                       batch["topk_logprobs"][t : t + 1], batch["targets"][t : t + 1],
                                       kd_weight=1.0, hard_weight=0.0, temperature=2.0) for t in range(len(logits))]
    w = [2.0 if a else 0.25 for a in batch["answer_mask"].tolist()]
    n = len(w)
    kd = sum(wt * p.kd.item() for wt, p in zip(w, per_token)) / n
    ce = sum(wt * p.ce.item() for wt, p in zip(w, per_token)) / n
    assert parts.kd.item() == pytest.approx(kd, rel=1e-4) and parts.ce.item() == pytest.approx(ce, rel=1e-4)
    assert parts.loss.item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-4)


def test_default_weights_leave_the_loss_bit_identical(marked_batch):
    model, _, _, batch = marked_batch
    for loss in (Loss(), Loss(reasoning_weight=1.0, answer_weight=1.0)):
        assert token_weights(batch, loss) is None
        with torch.no_grad():
            got = _loss(model, batch, loss, loss.hard_weight, loss.temperature)
            plain = distillation_loss(response_logits(model, batch), batch["topk_ids"], batch["topk_logprobs"],
                                      batch["targets"], kd_weight=loss.kd_weight, hard_weight=loss.hard_weight,
                                      temperature=loss.temperature)
        assert torch.equal(got.loss, plain.loss) and torch.equal(got.kd, plain.kd) and torch.equal(got.ce, plain.ce)


def test_the_weights_are_spec_fields_with_one_line_errors(tiny_llm_dir):
    base = {"name": "x", "teacher": {"model": str(tiny_llm_dir), "reasoning": {"answer_marker": MARKER}},
            "sources": [{"inline": ["a"]}]}

    def spec(loss: dict, **teacher):
        return parse_spec({**base, "teacher": {**base["teacher"], **teacher}, "training": {"loss": loss}})

    with pytest.raises(SpecError, match=r"^<spec>: training\.loss\.answer_weight: reasoning_weight and answer_weight "
                                        r"are both 0"):
        spec({"reasoning_weight": 0, "answer_weight": 0})
    with pytest.raises(SpecError, match=r"^<spec>: training\.loss\.reasoning_weight: Input should be greater than "
                                        r"or equal to 0$"):
        spec({"reasoning_weight": -1})
    no_marker = {**base, "teacher": {"model": str(tiny_llm_dir)}, "training": {"loss": {"reasoning_weight": 0.5}}}
    with pytest.raises(SpecError, match=r"training\.loss\.reasoning_weight: without teacher\.reasoning"):
        parse_spec(no_marker)
    assert spec({"reasoning_weight": 0}).training.loss.answer_weight == 1.0  # answers only: allowed
    # The defaults name the same training run as before the weights existed; other weights name another.
    assert training_hash(spec({})) == training_hash(spec({"reasoning_weight": 1.0, "answer_weight": 1.0}))
    assert training_hash(spec({})) != training_hash(spec({"reasoning_weight": 0.5}))
