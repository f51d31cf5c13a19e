"""Sampled teacher targets (teacher.logprobs.mode: sampled): the draws, the unbiased estimator, capture,
the spec's refusals and a training run on a sampled dataset."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch

from engine.spec import Logprobs, Loss, SpecError
from engine.train import train_students
from engine.train.runs import logprobs_mode
from engine.train.sampled import check_sampled_training, draw, draw_steps, row_generator, sampled_distillation_loss
from tests.conftest import tiny_train_spec

FRESH = {"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}}
P = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])  # the teacher's T=1 distribution over a 5-id vocabulary
Z = torch.tensor([0.3, -0.2, 0.9, 0.0, -1.1])  # the student's logits


def test_draw_keeps_distinct_ids_most_drawn_first_with_count_over_k():
    g = torch.Generator().manual_seed(0)
    ids, lps = draw(P.log(), 8, g)
    present = torch.isfinite(lps)
    kept = ids[present].tolist()
    assert len(kept) == len(set(kept)) and len(kept) < 8  # 8 draws from 5 ids: some repeat
    counts = (lps[present].exp() * 8).round()
    assert torch.allclose(lps[present].exp() * 8, counts, atol=1e-5)  # each value is log(count / 8)
    assert counts.sum().item() == 8 and lps[present].exp().sum().item() == pytest.approx(1.0)
    assert counts.tolist() == sorted(counts.tolist(), reverse=True)  # most drawn first
    assert (ids[~present] == ids[0]).all()  # pads repeat slot 0 (at -inf), as collate pads a ragged top-k
    again = draw(P.log(), 8, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids) and torch.equal(again[1], lps)


def _draws(m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = row_generator(7, [1, 2, 3])
    return draw_steps(P.log().expand(m, -1), k, g)


def test_the_sampled_gradient_is_unbiased_for_the_full_forward_kl():
    m, k = 20000, 4
    ids, lps = _draws(m, k)
    logits = Z.expand(m, -1).clone().requires_grad_()
    parts = sampled_distillation_loss(logits, ids, lps, torch.zeros(m, dtype=torch.long),
                                      kd_weight=1.0, hard_weight=0.0)
    parts.loss.backward()
    mean_grad = logits.grad.sum(0)  # the loss is a mean over the m draws: the rows' gradients sum to the mean one
    s = Z.softmax(-1)
    assert torch.allclose(mean_grad, s - P, atol=0.01)  # d KL(p || s) / dz = s - p; one draw's noise ~0.25
    # The value: KL(q || s) + H(q) is the cross-entropy -sum q log s, whose mean is KL(p || s) + H(p).
    q = lps.exp()
    entropy_q = -torch.where(q > 0, q * lps, torch.zeros_like(q)).sum(-1)
    kl_full = sum(p * math.log(p / si) for p, si in zip(P.tolist(), s.tolist()))
    entropy_p = -sum(p * math.log(p) for p in P.tolist())
    assert parts.kd.item() + entropy_q.mean().item() == pytest.approx(kl_full + entropy_p, abs=0.01)
    assert parts.kd.item() > kl_full  # the value alone is biased upwards (E[H(q)] < H(p))


def test_one_draw_loss_by_hand():
    # draws gave id 0 three times and id 2 once: q = (3/4, 1/4) on ids (0, 2)
    ids = torch.tensor([[0, 2, 0, 0]])
    lps = torch.tensor([[math.log(0.75), math.log(0.25), -math.inf, -math.inf]])
    logits = torch.tensor([[1.0, 0.0, 2.0]])
    parts = sampled_distillation_loss(logits, ids, lps, torch.tensor([2]), kd_weight=0.5, hard_weight=0.5)
    z = sum(math.exp(v) for v in (1.0, 0.0, 2.0))
    s0, s2 = math.exp(1.0) / z, math.exp(2.0) / z
    kd = 0.75 * math.log(0.75 / s0) + 0.25 * math.log(0.25 / s2)
    ce = -math.log(s2)
    assert parts.kd.item() == pytest.approx(kd, rel=1e-5)
    assert parts.ce.item() == pytest.approx(ce, rel=1e-5)
    assert parts.loss.item() == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-5)


def test_capture_in_sampled_mode_stores_draws_that_sum_to_one(tiny_llm_dir):
    from engine.teachers.transformers_backend import TransformersTeacher

    spec = tiny_train_spec(tiny_llm_dir, [FRESH])
    teacher_spec = spec.teacher.model_copy(update={"logprobs": Logprobs(top_k=8, mode="sampled")})
    teacher = TransformersTeacher(teacher_spec)
    prompts = ["Is the sky blue?", "Do cats bark?", "Is water wet?"]
    outs = teacher.generate(prompts)
    for out in outs:
        assert out.topk_ids.shape == out.topk_logprobs.shape == (len(out.token_ids), 8)
        for ids, lps in zip(out.topk_ids, out.topk_logprobs.astype("float32")):
            present = lps > -math.inf
            assert len(set(ids[present].tolist())) == int(present.sum())  # distinct ids
            assert float(math.fsum(math.exp(v) for v in lps[present])) == pytest.approx(1.0, abs=3e-3)  # fp16
            assert (ids[~present] == ids[0]).all()
    again = TransformersTeacher(teacher_spec).generate(prompts)  # seeded per row: a re-run draws the same
    assert all((a.topk_ids == b.topk_ids).all() and (a.topk_logprobs == b.topk_logprobs).all()
               for a, b in zip(again, outs))
    plain = TransformersTeacher(spec.teacher).generate(prompts[:1])[0]
    assert (plain.token_ids == outs[0].token_ids).all()  # the draws leave generation alone


def test_spec_refuses_sampled_mode_on_a_server(tiny_llm_dir):
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], backend="openai")
    data = spec.model_dump(mode="json", exclude_defaults=True)
    data["teacher"]["logprobs"] = {"top_k": 8, "mode": "sampled"}
    from engine.spec import parse_spec

    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert str(e.value).startswith("<spec>: teacher.logprobs.mode: sampled draws ids from the teacher's full")
    assert "returns top-k, not draws" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("loss, field", [
    ({"divergence": "reverse_kl", "temperature": 1.0}, "training.loss.divergence"),
    ({"temperature": 2.0}, "training.loss.temperature"),
    ({"temperature": 1.0, "temperature_end": 0.5}, "training.loss.temperature_end"),
])
def test_training_on_sampled_targets_refuses_biased_losses(loss, field):
    with pytest.raises(SpecError) as e:
        check_sampled_training(Loss(**loss), "<spec>", [])
    assert str(e.value).startswith(f"<spec>: {field}: the dataset holds sampled targets")
    check_sampled_training(Loss(temperature=1.0), "<spec>", [])  # forward KL at T = 1: fine


def test_training_on_sampled_targets_refuses_a_trimmed_vocabulary(tiny_llm_dir):
    trimmed = {"name": "small", "from_teacher": {"layers": [0, 2], "vocab": {"keep_frequent": 100}}}
    spec = tiny_train_spec(tiny_llm_dir, [FRESH, trimmed], loss={"temperature": 1.0})
    with pytest.raises(SpecError, match="students: 'small' has a trimmed vocabulary"):
        check_sampled_training(spec.training.loss, "<spec>", spec.students)


def test_the_dataset_mode_comes_from_the_teach_stage_lineage():
    assert logprobs_mode({"teach": {"rows": 3, "logprobs_mode": "sampled"}}) == "sampled"
    assert logprobs_mode({"teach": {"rows": 3}}) == "topk"  # committed before the mode was recorded
    assert logprobs_mode({}) == "topk"


def _sampled_examples(frame: pl.DataFrame, k: int = 8) -> pl.DataFrame:
    """tiny_examples with each stored top-k replaced by k draws from its (renormalised) top-k."""
    ids_col, lps_col = [], []
    for row, (ids, lps) in enumerate(zip(frame["topk_ids"].to_list(), frame["topk_logprobs"].to_list())):
        g = row_generator(0, [row])
        drawn_ids, drawn_lps = [], []
        for step_ids, step_lps in zip(ids, lps):
            j, v = draw(torch.tensor(step_lps).float().log_softmax(-1), k, g)
            drawn_ids.append(torch.tensor(step_ids)[j].tolist())
            drawn_lps.append(v.tolist())
        ids_col.append(drawn_ids)
        lps_col.append(drawn_lps)
    return frame.with_columns(topk_ids=pl.Series(ids_col, dtype=pl.List(pl.List(pl.Int32))),
                              topk_logprobs=pl.Series(lps_col, dtype=pl.List(pl.List(pl.Float16))))


def test_training_on_a_sampled_dataset_runs_and_records_it(tiny_llm_dir, tiny_examples, tmp_path):
    spec = tiny_train_spec(tiny_llm_dir, [FRESH], max_steps=3, batch_size=4, loss={"temperature": 1.0})
    metrics = train_students(spec, _sampled_examples(tiny_examples), tmp_path, progress=False,
                             logprobs_mode="sampled")["fresh"]
    saved = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    assert saved["targets"] == "sampled" and saved["teacher_signal"] == "stored"
    assert metrics["steps"] == 3 and all(math.isfinite(v) for _, v in metrics["loss_components"]["kd"])
    hot = tiny_train_spec(tiny_llm_dir, [FRESH], max_steps=3, batch_size=4)  # the default T = 2
    with pytest.raises(SpecError, match="training.loss.temperature: the dataset holds sampled targets"):
        train_students(hot, tiny_examples, tmp_path / "hot", progress=False, logprobs_mode="sampled")


def test_a_sampled_dataset_records_its_mode_and_training_reads_it(tmp_path, tiny_llm_dir, monkeypatch):
    import yaml

    import store
    from engine.curate import pipeline
    from engine.spec import load_spec
    from engine.train.runs import train

    lines = [f'{{"text": "Question number {i}: is {i} even?"}}' for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    spec = {"name": "tiny", "sources": [{"path": "prompts.jsonl", "text": "text"}],
            "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6}, "batch_size": 4,
                        "logprobs": {"top_k": 8, "mode": "sampled"}},
            "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
            "students": [FRESH], "training": {"max_steps": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    st = store.open(tmp_path / "store")
    loaded = load_spec(tmp_path / "spec.yaml")
    pipeline.run(loaded, st, progress=False)
    version = st.resolve("tiny@latest")
    assert version.stats["teach"]["logprobs_mode"] == "sampled" and logprobs_mode(version.stats) == "sampled"
    for lps in st.read("tiny@1", "examples")["topk_logprobs"].to_list()[0]:
        assert math.fsum(math.exp(v) for v in lps if v is not None and v > -math.inf) == pytest.approx(1, abs=3e-3)
    with pytest.raises(SpecError, match="training.loss.temperature: the dataset holds sampled targets"):
        train(loaded, st, progress=False)  # the default T = 2, refused from the dataset's own lineage
    # Margin and entropy from the draws' counts would be noise and biased low: null; the chosen-token measures
    # are exact in both modes.
    examples = st.read("tiny@1", "examples")
    assert examples["conf_margin"].null_count() == examples["conf_entropy"].null_count() == examples.height
    assert examples["conf_mean_token_prob"].null_count() == 0
    # Evaluation reports no token KL against the draws' counts (it would be biased upward), for any model,
    # and its progress bar still ends full.
    import importlib

    from engine.train.runs import evaluate

    evaluation = importlib.import_module("engine.train.evaluate")  # the module, not the function of that name

    bars = []

    class RecordedProgress(evaluation.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(evaluation, "Progress", RecordedProgress)

    spec["training"]["loss"] = {"temperature": 1.0}
    spec["eval"] = {"split": "train", "speed_prompts": 1, "speed_tokens": 2}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    at_t1 = load_spec(tmp_path / "spec.yaml")
    train(at_t1, st, progress=False)
    report, _ = evaluate(at_t1, st, progress=False)
    rows = [row for entry in report["sets"] for row in entry["models"]]
    assert len({row["kind"] for row in rows}) == 2 and all(row["token_kl"] is None for row in rows)
    (task,) = bars[-1].tasks
    assert task.total and task.completed == task.total


@pytest.mark.parametrize("measure", ["margin", "entropy"])
def test_spec_refuses_mining_sampled_targets_on_a_top_k_measure(tiny_llm_dir, measure):
    from engine.spec import parse_spec

    data = tiny_train_spec(tiny_llm_dir, [FRESH]).model_dump(mode="json", exclude_defaults=True)
    data["teacher"]["logprobs"] = {"top_k": 8, "mode": "sampled"}
    data["mining"] = {"confidence": measure, "band": [0.1, 0.9]}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert str(e.value).startswith(f"<spec>: mining.confidence: {measure} needs the teacher's top-k")
    assert "\n" not in str(e.value)
