"""On-policy distillation (training.on_policy): batches hold the student's own samples and the teacher's
scores of exactly those tokens, a student identical to the teacher has zero loss, which steps are
on-policy, the refusals, metrics and a resumed run."""

from __future__ import annotations

import copy
import json

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

import engine.train.loop as loop
import store
from engine.errors import Interrupted
from engine.models import load_causal_lm
from engine.prompts import prompt_ids
from engine.spec import SpecError
from engine.stages.teach import teacher_contexts
from engine.train import runs, train_students
from engine.train.data import encode, student_conversations
from engine.train.on_policy import OnPolicyBatches, is_on_policy_step, on_policy_loss, sampling_seed
from engine.train.runs import _training_shaping, training_hash
from tests.conftest import tiny_train_spec

FRESH = {"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}}
HALVES = {"name": "halves", "from_teacher": {"layers": [0, 2]}}
TRIMMED = {"name": "small", "from_teacher": {"layers": [0, 2], "vocab": {"keep_frequent": 100}}}
CPU = torch.device("cpu")


def _examples(spec, frame: pl.DataFrame, tokenizer) -> list:
    train = frame.filter(pl.col("split") == "train").head(4)
    return encode(train, tokenizer, student_conversations(train, spec), teacher_texts=teacher_contexts(train, spec))


def _other(teacher):
    """A student that is not the teacher."""
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.model.norm.weight.mul_(0.5)
    return other


def test_a_batch_holds_the_students_samples_and_the_teachers_scores_of_exactly_them(tiny_llm_dir, tiny_examples):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], student_prompt="Q: {{ prompt }}", seed=4,
                           on_policy={"share": 1.0, "max_new_tokens": 6})
    examples = _examples(spec, tiny_examples, tokenizer)
    student = _other(teacher)
    rng = torch.get_rng_state()
    batch = OnPolicyBatches(spec, teacher, tokenizer, CPU, []).micro_batches(student, "fresh", [examples], step=2)[0]
    assert torch.equal(torch.get_rng_state(), rng)  # the run's own RNG is left alone

    # The same draws, reproduced: the student's contexts padded on the left, sampled at T=1 from the step's seed.
    padded = tokenizer.pad({"input_ids": [e.prompt_ids for e in examples]}, return_tensors="pt")
    torch.manual_seed(sampling_seed(4, 2, "fresh", 0))
    with torch.no_grad():
        out = student.generate(**padded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    eos, width = tokenizer.eos_token_id, padded["input_ids"].shape[1]
    sampled = [row[width:].tolist() for row in out]
    sampled = [s[: s.index(eos) + 1] if eos in s else s for s in sampled]
    assert batch["targets"].tolist() == [t for s in sampled for t in s]
    assert sampled != [list(e.token_ids[:6]) for e in examples]  # not the stored responses

    # The teacher's log-probs: a separate teacher-forced forward over its own context + those ids.
    contexts = teacher_contexts(tiny_examples.filter(pl.col("split") == "train").head(4), spec)
    offset = 0
    for example, context, tokens in zip(examples, contexts, sampled):
        own = prompt_ids(tokenizer, context)
        assert example.teacher_prompt_ids == own != example.prompt_ids  # its own context, not the student's "Q: "
        with torch.no_grad():
            logits = teacher(torch.tensor([own + tokens])).logits[0]
        expected = logits[len(own) - 1 : len(own) - 1 + len(tokens)].float().log_softmax(-1)
        assert torch.allclose(batch["teacher_log_probs"][offset : offset + len(tokens)], expected, atol=1e-5)
        offset += len(tokens)
    assert batch["teacher_log_probs"].shape == (offset, teacher.config.vocab_size)
    assert offset == int(batch["mask"].sum())  # one target per student position


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_a_student_identical_to_the_teacher_has_zero_on_policy_loss(tiny_llm_dir, tiny_examples, divergence):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    on_policy = {"share": 0.5, "max_new_tokens": 6, "divergence": divergence}
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], on_policy=on_policy)
    examples = _examples(spec, tiny_examples, tokenizer)
    same = copy.deepcopy(teacher)
    batch = OnPolicyBatches(spec, teacher, tokenizer, CPU, []).micro_batches(same, "fresh", [examples], 0)[0]
    parts = on_policy_loss(same, batch, 2.0, divergence, 0.5)
    assert parts.tokens == int(batch["mask"].sum()) > 0
    assert abs(parts.loss.item()) < 1e-5 and parts.ce.item() == 0.0  # no hard CE on the student's own tokens
    other = _other(teacher)
    batch = OnPolicyBatches(spec, teacher, tokenizer, CPU, []).micro_batches(other, "fresh", [examples], 0)[0]
    assert on_policy_loss(other, batch, 2.0, divergence, 0.5).loss.item() > 1e-3


def test_the_on_policy_steps_follow_the_seed_and_the_share():
    steps = [is_on_policy_step(7, s, 0.5) for s in range(2000)]
    assert steps == [is_on_policy_step(7, s, 0.5) for s in range(2000)]  # deterministic
    assert 0.45 < sum(steps) / len(steps) < 0.55
    assert steps != [is_on_policy_step(8, s, 0.5) for s in range(2000)]  # another seed, other steps
    assert all(is_on_policy_step(7, s, 1.0) for s in range(2000))


def _train(tiny_llm_dir, tiny_examples, tmp_path, **training):
    spec = tiny_train_spec(tiny_llm_dir, [FRESH, HALVES], **{"max_steps": 3, "batch_size": 4, "seed": 3, **training})
    return train_students(spec, tiny_examples, tmp_path, progress=False)


def test_share_one_makes_every_step_on_policy_and_records_it(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch):
    seen = []
    real = loop.Trainee.step

    def step(self, micro_batches, spec, step, total_steps, on_policy=None):
        seen.append((step, on_policy is not None, all("teacher_log_probs" in b for b in micro_batches)))
        return real(self, micro_batches, spec, step, total_steps, on_policy)

    monkeypatch.setattr(loop.Trainee, "step", step)
    results = _train(tiny_llm_dir, tiny_examples, tmp_path, on_policy={"share": 1.0, "max_new_tokens": 5})
    assert seen == [(s, True, True) for s in range(3) for _ in range(2)]  # 10 train rows: 4, 4, 2
    for name, metrics in results.items():
        saved = json.loads((tmp_path / name / "metrics.json").read_text())
        record = saved["on_policy"]
        assert record["share"] == 1.0 and record["steps"] == saved["steps"] == 3
        assert record["sampled_responses"] == 10 and 1 <= record["mean_sampled_length"] <= 5
        assert record["sampling_seconds"] > 0 and record["scoring_seconds"] > 0
        assert record["divergence"] == "reverse_kl"
        assert all(v == 0.0 for _, v in saved["loss_components"]["hard"])  # no hard CE on-policy
        assert all(v > 0.0 for _, v in saved["loss_components"]["kd"])


def test_without_on_policy_no_step_is_and_the_stored_path_is_unchanged(tiny_llm_dir, tiny_examples, tmp_path,
                                                                      monkeypatch):
    plain = _train(tiny_llm_dir, tiny_examples, tmp_path / "plain")
    assert all(m["on_policy"] is None for m in plain.values())
    # A share so small that no step of three is on-policy: every loss is that of the plain run, bit for bit.
    assert not any(is_on_policy_step(3, s, 1e-9) for s in range(3))
    never = _train(tiny_llm_dir, tiny_examples, tmp_path / "never", on_policy={"share": 1e-9, "max_new_tokens": 4})
    for name in plain:
        assert never[name]["on_policy"]["steps"] == 0 and never[name]["on_policy"]["mean_sampled_length"] is None
        for key in ("loss_curve", "loss_components", "val_losses"):
            assert never[name][key] == plain[name][key]


def test_the_run_id_names_on_policy_and_keeps_the_ids_of_runs_without_it(tiny_llm_dir):
    plain = tiny_train_spec(tiny_llm_dir, [FRESH])
    on = tiny_train_spec(tiny_llm_dir, [FRESH], on_policy={"share": 0.5, "max_new_tokens": 4})
    assert "on_policy" not in _training_shaping(plain.training)
    assert training_hash(plain) != training_hash(on)


def test_on_policy_refuses_a_teacher_behind_a_server(tiny_llm_dir):
    # Refused as the spec is read (validate, plan, run, train), before anything loads: one line.
    with pytest.raises(SpecError) as e:
        tiny_train_spec(tiny_llm_dir, [FRESH], backend="openai", on_policy={"share": 0.5, "max_new_tokens": 4})
    message = str(e.value)
    assert message.startswith("<spec>: training.on_policy has the teacher score the students' own samples")
    assert "teacher.backend: transformers" in message and "\n" not in message


def test_on_policy_refuses_a_trimmed_vocabulary(tiny_llm_dir, tiny_examples, tmp_path):
    spec = tiny_train_spec(tiny_llm_dir, [FRESH, TRIMMED], on_policy={"share": 0.5, "max_new_tokens": 4})
    with pytest.raises(SpecError) as e:
        train_students(spec, tiny_examples, tmp_path, progress=False)
    assert "training.on_policy: " in str(e.value) and "student 'small' has a trimmed vocabulary" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("on_policy, field", [
    ({"max_new_tokens": 4}, "share"), ({"share": 0.0}, "share"), ({"share": 1.5}, "share"),
    ({"share": 0.5, "max_new_tokens": 0}, "max_new_tokens"), ({"share": 0.5, "temperature": 0.0}, "temperature"),
    ({"share": 0.5, "beta": 0.3}, "beta applies to divergence: jsd only"), ({"share": 0.5, "shares": 1}, "shares")])
def test_the_spec_validates_on_policy(tiny_llm_dir, on_policy, field):
    with pytest.raises(SpecError, match=f"training.on_policy.*{field}"):
        tiny_train_spec(tiny_llm_dir, [FRESH], on_policy=on_policy)


def test_an_interrupted_on_policy_run_resumes_to_the_same_weights(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch):
    """Half the steps on-policy, checkpoints every 2 steps, Ctrl-C in step 3: the resumed run takes the same
    on-policy steps and samples, and ends with the weights and records of the uninterrupted one."""
    training = {"epochs": 2, "batch_size": 4, "seed": 5, "checkpoint_every": 2,
                "on_policy": {"share": 0.5, "max_new_tokens": 4}}
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], **training)
    lineage = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}

    def fresh_store(name):
        st = store.open(tmp_path / name)
        st.commit("tiny", {"examples": tiny_examples}, lineage, parent=None)
        return st

    reference = runs.train(spec, fresh_store("whole"), progress=False)
    real = loop.Trainee.step

    def interrupted(self, micro_batches, spec, step, total_steps, on_policy=None):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, micro_batches, spec, step, total_steps, on_policy)

    st = fresh_store("resumed")
    monkeypatch.setattr(loop.Trainee, "step", interrupted)
    with pytest.raises(Interrupted):
        runs.train(spec, st, progress=False)
    monkeypatch.undo()
    result = runs.train(spec, st, progress=False)
    whole = json.loads((reference.run_dir / "fresh" / "metrics.json").read_text())
    resumed = json.loads((result.run_dir / "fresh" / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 2 and 0 < whole["on_policy"]["steps"] < whole["steps"] == 6
    for key in ("steps", "sampled_responses", "mean_sampled_length"):
        assert resumed["on_policy"][key] == whole["on_policy"][key]
    assert resumed["loss_curve"] == whole["loss_curve"]
    a, b = load_file(str(reference.run_dir / "fresh" / "model.safetensors")), \
        load_file(str(result.run_dir / "fresh" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
