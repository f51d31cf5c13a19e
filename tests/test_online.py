"""Online distillation (training.teacher_signal: online): the loss by hand, alignment of the teacher's own
context with the student's, a student identical to the teacher, the spec's refusals, a training run."""

from __future__ import annotations

import copy
import json
import math

import polars as pl
import pytest
import torch

from engine.models import load_causal_lm
from engine.prompts import prompt_ids
from engine.spec import Loss, SpecError
from engine.stages.teach import teacher_contexts
from engine.train import train_students
from engine.train.data import collate, encode, student_conversations
from engine.train.loop import _loss
from engine.train.online import check_online, online_distillation_loss, with_teacher_signal
from engine.train.runs import _training_shaping, training_hash
from tests.conftest import tiny_train_spec

FRESH = {"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}}
TRIMMED = {"name": "small", "from_teacher": {"layers": [0, 2], "vocab": {"keep_frequent": 100}}}


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_online_loss_by_hand_over_a_tiny_vocabulary():
    teacher_logits = [2.0, 0.5, -1.0]
    student_logits = [0.0, 1.0, 0.5]
    t = 2.0
    teacher_lp = torch.tensor([teacher_logits]).log_softmax(-1)
    parts = online_distillation_loss(torch.tensor([student_logits]), teacher_lp, torch.tensor([1]), kd_weight=0.7,
                                     hard_weight=0.3, temperature=t)
    q = _softmax([x / t for x in teacher_logits])
    r = _softmax([x / t for x in student_logits])
    kd = t**2 * sum(a * math.log(a / b) for a, b in zip(q, r))
    ce = -math.log(_softmax(student_logits)[1])
    assert parts.kd.item() == pytest.approx(kd, rel=1e-5)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-5)
    assert parts.loss.item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-5)
    reverse = online_distillation_loss(torch.tensor([student_logits]), teacher_lp, torch.tensor([1]), kd_weight=1.0,
                                       hard_weight=0.0, temperature=t, divergence="reverse_kl")
    assert reverse.kd.item() == pytest.approx(t**2 * sum(b * math.log(b / a) for a, b in zip(q, r)), rel=1e-5)


def _batch(spec, examples: pl.DataFrame, tokenizer) -> dict:
    train = examples.filter(pl.col("split") == "train").head(4)
    encoded = encode(train, tokenizer, student_conversations(train, spec),
                     teacher_texts=teacher_contexts(train, spec))
    return collate(encoded, tokenizer.pad_token_id)


def test_a_student_identical_to_the_teacher_has_zero_online_kd(tiny_llm_dir, tiny_examples):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], teacher_signal="online")
    batch = with_teacher_signal(teacher, _batch(spec, tiny_examples, tokenizer), [], online=True)
    loss = Loss(kd_weight=1.0, hard_weight=0.0, temperature=2.0)
    same = _loss(copy.deepcopy(teacher), batch, loss, 0.0, 2.0, "online")
    assert same.tokens == int(batch["mask"].sum()) > 0
    assert abs(same.kd.item()) < 1e-6
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.norm.weight.mul_(0.5)  # a different student
    assert _loss(other, batch, loss, 0.0, 2.0, "online").kd.item() > 1e-3


def test_the_teacher_reads_its_own_prompt_aligned_on_the_response(tiny_llm_dir, tiny_examples):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], teacher_signal="online", student_prompt="Q: {{ prompt }}")
    batch = with_teacher_signal(teacher, _batch(spec, tiny_examples, tokenizer), [], online=True)
    assert batch["input_ids"].shape[1] > batch["teacher_input_ids"].shape[1]  # "Q: " makes the student longer
    row = tiny_examples.row(0, named=True)
    own = prompt_ids(tokenizer, teacher_contexts(tiny_examples.head(1), spec)[0])
    tokens = list(row["token_ids"])
    with torch.no_grad():
        logits = teacher(torch.tensor([own + tokens])).logits[0]
    expected = logits[len(own) - 1 : len(own) - 1 + len(tokens)].float().log_softmax(-1)
    assert torch.allclose(batch["teacher_log_probs"][: len(tokens)], expected, atol=1e-5)
    assert batch["teacher_log_probs"].shape[0] == int(batch["mask"].sum())  # one target per student position


def test_online_needs_a_local_teacher(tiny_llm_dir):
    with pytest.raises(SpecError) as e:
        tiny_train_spec(tiny_llm_dir, [FRESH], backend="openai", teacher_signal="online")
    message = str(e.value)
    assert message.startswith("<spec>: training.teacher_signal: online runs the teacher over every training batch")
    assert "no prompt log-probs" in message and "\n" not in message


def test_online_refuses_a_trimmed_vocabulary(tiny_llm_dir):
    spec = tiny_train_spec(tiny_llm_dir, [TRIMMED], teacher_signal="online")
    with pytest.raises(SpecError, match="training.teacher_signal: online .* student 'small' has a trimmed"):
        check_online(spec.students, "<spec>")


def test_the_run_id_tells_online_from_stored_and_keeps_stored_ids(tiny_llm_dir):
    stored = tiny_train_spec(tiny_llm_dir, [FRESH])
    online = tiny_train_spec(tiny_llm_dir, [FRESH], teacher_signal="online")
    assert "teacher_signal" not in _training_shaping(stored.training)  # the default: as before it existed
    assert _training_shaping(online.training)["teacher_signal"] == "online"
    assert training_hash(stored) != training_hash(online)


@pytest.mark.parametrize("hidden", [None, {"weight": 0.5}])
def test_online_training_writes_its_metrics(tiny_llm_dir, tiny_examples, tmp_path, hidden):
    loss = {"hidden": hidden} if hidden else {}
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], teacher_signal="online", max_steps=3, batch_size=4, loss=loss)
    metrics = train_students(spec, tiny_examples, tmp_path, progress=False)["fresh"]
    saved = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    assert saved["teacher_signal"] == saved["targets"] == "online"
    assert saved["steps"] == 3 and saved["seconds_per_step"] > 0
    assert saved["teacher_forward_seconds"] > 0
    assert saved["peak_memory"]["host_rss_bytes"] > 0 and saved["peak_memory"]["cuda_allocated_bytes"] is None
    assert all(math.isfinite(v) and v > 0 for _, v in metrics["loss_components"]["kd"])
    assert len(saved["val_losses"]) == 1 and math.isfinite(saved["val_losses"][0][2])
    if hidden:
        assert "hidden" in saved["loss_components"]
