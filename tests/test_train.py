"""The trainer: top-k + tail loss, student construction, the multi-student loop, eval."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.models import ModelError, chat_prompt_ids, load_causal_lm
from engine.spec import SpecError, parse_spec
from engine.train import evaluate, format_table, train_students
from engine.train.data import collate, encode, student_texts
from engine.train.losses import distillation_loss, token_kl
from engine.train.loop import lr_schedule
from engine.train.students import build_student, lr_depths

# --- the loss ------------------------------------------------------------------------


def _stored_topk(full_logits: torch.Tensor, k: int):
    """What the teacher backend stores: top-k ids and T=1 log-probs, as float16."""
    top = full_logits.log_softmax(-1).topk(k, -1)
    return top.indices, top.values.half()


def _reference(student_logits, topk_ids, topk_lps, targets, mask, kd_weight, hard_weight, temperature):
    """The documented loss with plain Python loops and math, token by token."""
    total, n = 0.0, 0
    for pos in range(student_logits.shape[0]):
        if not mask[pos]:
            continue
        z = [float(x) for x in student_logits[pos]]
        zmax = max(z)
        s_all = [math.exp(x - zmax) for x in z]
        s_all = [x / sum(s_all) for x in s_all]
        ids = [int(i) for i, lp in zip(topk_ids[pos], topk_lps[pos]) if lp != float("-inf")]
        p = [math.exp(float(lp)) for lp in topk_lps[pos] if lp != float("-inf")]
        p.append(max(0.0, 1.0 - sum(p)))
        s = [s_all[i] for i in ids]
        s.append(sum(x for i, x in enumerate(s_all) if i not in ids))
        q = [x ** (1 / temperature) for x in p]
        q = [x / sum(q) for x in q]
        r = [x ** (1 / temperature) for x in s]
        r = [x / sum(r) for x in r]
        kl = sum(qi * math.log(qi / ri) for qi, ri in zip(q, r) if qi > 0)
        ce = -math.log(s_all[int(targets[pos])])
        total += kd_weight * temperature**2 * kl + hard_weight * ce
        n += 1
    return total / n


def _case(n=7, vocab=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=g) * 3
    ids, lps = _stored_topk(teacher, k)
    targets = ids[:, 0].clone()
    return teacher, ids, lps, targets


def test_kl_is_zero_when_the_student_is_the_teacher():
    teacher, ids, lps, targets = _case()
    mask = torch.ones(len(ids), dtype=torch.bool)
    # fp16 storage rounds the log-probs; the student gets exactly what was stored.
    exact = teacher.log_softmax(-1).scatter(-1, ids, lps.float())
    for temperature in (1.0, 2.0, 4.0):
        parts = distillation_loss(exact, ids, lps, targets, mask, kd_weight=1.0, hard_weight=0.0, temperature=temperature)
        assert parts.kd.item() == pytest.approx(0.0, abs=2e-5)
    assert token_kl(exact, ids, lps, mask).abs().max().item() < 2e-5


def test_kl_is_positive_otherwise_and_gradients_flow():
    teacher, ids, lps, targets = _case()
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(len(ids), dtype=torch.bool)
    parts = distillation_loss(student, ids, lps, targets, mask, kd_weight=1.0, hard_weight=1.0, temperature=2.0)
    assert parts.kd.item() > 0.01 and parts.ce.item() > 0
    parts.loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_loss_matches_a_brute_force_reference():
    teacher, ids, lps, targets = _case()
    lps[2, 3:] = float("-inf")  # a ragged row: only 3 stored ids
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([True, False, True, True, False, True, True])
    for temperature in (1.0, 2.0):
        got = distillation_loss(student, ids, lps, targets, mask, kd_weight=0.7, hard_weight=0.3, temperature=temperature)
        want = _reference(student, ids, lps.float(), targets, mask, 0.7, 0.3, temperature)
        assert got.loss.item() == pytest.approx(want, rel=1e-5)
        assert got.tokens == 5


def test_masked_positions_do_not_count():
    teacher, ids, lps, targets = _case()
    mask = torch.tensor([True, True, False, True, False, False, True])
    student = torch.randn(teacher.shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
    parts = distillation_loss(student, ids, lps, targets, mask, kd_weight=0.5, hard_weight=0.5, temperature=2.0)
    only = distillation_loss(student[mask], ids[mask], lps[mask], targets[mask], torch.ones(4, dtype=torch.bool),
                             kd_weight=0.5, hard_weight=0.5, temperature=2.0)
    assert parts.loss.item() == pytest.approx(only.loss.item(), rel=1e-6)
    parts.loss.backward()
    assert student.grad[~mask].abs().sum() == 0 and student.grad[mask].abs().sum() > 0
    # Nothing selected: a zero loss that still backpropagates.
    empty = distillation_loss(student, ids, lps, targets, torch.zeros_like(mask), kd_weight=1, hard_weight=1, temperature=1)
    assert empty.loss.item() == 0 and empty.tokens == 0
    empty.loss.backward()


def test_a_teacher_with_no_tail_mass_stays_finite():
    ids = torch.tensor([[0, 1, 2]])
    lps = torch.tensor([[0.5, 0.3, 0.2]]).log()  # the top-3 hold all the mass: the tail is empty
    student = torch.randn(1, 10, requires_grad=True)
    parts = distillation_loss(student, ids, lps, ids[:, 0], torch.tensor([True]), kd_weight=1, hard_weight=0, temperature=2)
    parts.loss.backward()
    assert math.isfinite(parts.loss.item()) and torch.isfinite(student.grad).all()


# --- data ----------------------------------------------------------------------------


def test_collate_aligns_targets_one_position_before_each_token(tiny_llm_dir, tiny_examples):
    _, tokenizer = load_causal_lm(str(tiny_llm_dir))
    rows = tiny_examples.head(3)
    encoded = encode(rows, tokenizer, student_texts(rows, None))
    batch = collate(encoded, tokenizer.pad_token_id)
    flat = 0
    for i, e in enumerate(encoded):
        positions = batch["mask"][i].nonzero().flatten()
        assert positions[0] == len(chat_prompt_ids(tokenizer, rows["teacher_prompt"][i])) - 1
        assert batch["input_ids"][i, positions + 1].tolist() == e.token_ids  # each position predicts the next input
        span = slice(flat, flat + len(e.token_ids))  # flat targets follow the mask's row-major order
        assert batch["targets"][span].tolist() == e.token_ids
        assert batch["topk_ids"][span].tolist() == e.topk_ids
        flat += len(e.token_ids)
    assert flat == len(batch["targets"]) == int(batch["mask"].sum())
    assert student_texts(rows, "Q: {{ prompt }} ({{ category }})")[0] == f"Q: {rows['prompt'][0]} (yesno)"


# --- students ------------------------------------------------------------------------


def _spec(teacher_dir, students, **training):
    return parse_spec({
        "name": "tiny",
        "teacher": {"model": str(teacher_dir), "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 8},
                    "reasoning": {"answer_marker": "Answer:"}, "batch_size": 4},
        "sources": [{"path": "unused.jsonl"}],
        "students": students,
        "training": training,
        "eval": {"speed_prompts": 2, "speed_tokens": 4},
    })


def test_from_teacher_keeps_the_chosen_layers_exactly(tiny_llm_dir):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = _spec(tiny_llm_dir, [{"name": "pick", "from_teacher": {"layers": [3, 1]}}])
    student = build_student(spec, spec.students[0], teacher, tokenizer)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([3, 1]):
        for key, value in t_state.items():
            if key.startswith(f"model.layers.{old}."):
                assert torch.equal(s_state[key.replace(f".{old}.", f".{new}.", 1)], value)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s_state[key], t_state[key])
    ids = torch.tensor([chat_prompt_ids(tokenizer, "hello")])
    assert student.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3

    bad = _spec(tiny_llm_dir, [{"name": "deep", "from_teacher": {"layers": [0, 4]}}])
    with pytest.raises(SpecError, match="'deep'.*layer 4 is out of range.*4 layers"):
        build_student(bad, bad.students[0], teacher, tokenizer)


def test_config_student_has_the_requested_shape(tiny_llm_dir):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    shape = {"hidden_size": 16, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 24}
    spec = _spec(tiny_llm_dir, [{"name": "fresh", "config": shape}])
    student = build_student(spec, spec.students[0], teacher, tokenizer)
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (16, 3, 4, 2, 24)
    assert c.vocab_size == teacher.config.vocab_size and c.eos_token_id == teacher.config.eos_token_id
    assert c.rope_parameters == teacher.config.rope_parameters and c.tie_word_embeddings
    again = build_student(spec, spec.students[0], teacher, tokenizer)
    assert torch.equal(again.model.embed_tokens.weight, student.model.embed_tokens.weight)  # seeded init


def test_model_student_must_share_the_vocabulary(tiny_llm_dir, tmp_path):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    small = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16))
    small.save_pretrained(tmp_path / "small")
    spec = _spec(tiny_llm_dir, [{"name": "other", "model": str(tmp_path / "small")},
                                {"name": "same", "model": str(tiny_llm_dir)}])
    with pytest.raises(ModelError, match="'other'.*100 ids.*49152"):
        build_student(spec, spec.students[0], teacher, tokenizer)
    same = build_student(spec, spec.students[1], teacher, tokenizer)
    assert torch.equal(same.lm_head.weight, teacher.lm_head.weight)


def test_layerwise_lr_depths(tiny_llm_dir):
    model, _ = load_causal_lm(str(tiny_llm_dir))
    depth_of = {id(p): d for d, params in lr_depths(model, "from_teacher") for p in params}
    layers = model.model.layers
    assert depth_of[id(model.model.embed_tokens.weight)] == 4  # lowest lr
    assert depth_of[id(layers[0].mlp.up_proj.weight)] == 3
    assert depth_of[id(layers[3].mlp.up_proj.weight)] == 0
    assert depth_of[id(model.model.norm.weight)] == 0
    assert {d for d, _ in lr_depths(model, "config")} == {0}


def test_lr_warms_up_linearly_then_decays_without_a_zero_step():
    factor = lr_schedule(total_steps=6, warmup_steps=2)
    assert [round(factor(s), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_schedule(total_steps=4, warmup_steps=0)(0) == 1.0


# --- training and evaluation -----------------------------------------------------------

STUDENTS = [
    {"name": "halves", "from_teacher": {"layers": [0, 2]}},
    {"name": "fresh", "config": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}},
]


@pytest.fixture(scope="module")
def other_llm_dir(tiny_llm_dir, tmp_path_factory):
    """Another tiny model with the teacher's tokenizer: a `model:` student unlike the teacher."""
    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    torch.manual_seed(1)
    other = LlamaForCausalLM(model.config)
    path = tmp_path_factory.mktemp("other-llm")
    other.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_llm_dir, other_llm_dir, tiny_examples, tmp_path_factory):
    students = STUDENTS + [{"name": "other", "model": str(other_llm_dir)}]
    # One batch holds all 10 train rows, so successive losses are comparable.
    spec = _spec(tiny_llm_dir, students, epochs=20, batch_size=10, max_steps=8, seed=3,
                 optimizer={"lr": 3e-3, "warmup_steps": 2, "layerwise_lr_decay": 0.8, "weight_decay": 0.01})
    out = tmp_path_factory.mktemp("students")
    metrics = train_students(spec, tiny_examples, out, progress=False)
    return spec, out, metrics


def test_training_lowers_the_loss_of_every_student(trained):
    spec, out, metrics = trained
    assert list(metrics) == ["halves", "fresh", "other"]
    for name, m in metrics.items():
        assert m["last_loss"] < m["first_loss"], name
        assert m["steps"] == 8 and m["epochs"] == 8.0 and m["train_examples"] == 10
        assert m["kind"] == {"halves": "from_teacher", "fresh": "config", "other": "model"}[name]
        assert m["loss_curve"][-1][0] == 8 and m["params"] > 0 and m["wall_seconds"] > 0
        assert json.loads((out / name / "metrics.json").read_text()) == m


def test_saved_students_reload_and_generate(trained):
    _, out, _ = trained
    model = AutoModelForCausalLM.from_pretrained(out / "halves")
    _, tokenizer = load_causal_lm(str(out / "halves"))
    ids = torch.tensor([chat_prompt_ids(tokenizer, "Is the sky blue?")])
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_training_is_reproducible(trained, tiny_examples, tmp_path):
    spec, _, metrics = trained
    one = spec.model_copy(update={"students": spec.students[1:2]})  # the fresh student alone, same seed
    again = train_students(one, tiny_examples, tmp_path, progress=False)
    flat = lambda m: [x for point in m["fresh"]["loss_curve"] for x in point]  # noqa: E731
    assert flat(again) == pytest.approx(flat(metrics), rel=1e-5)


def test_evaluate_reports_teacher_then_students(trained, tiny_examples, tiny_llm_dir):
    spec, out, _ = trained
    rows = evaluate(spec, tiny_examples, {s.name: out / s.name for s in spec.students}, progress=False)
    assert [r["name"] for r in rows] == [str(tiny_llm_dir), "halves", "fresh", "other"]
    teacher = rows[0]
    assert teacher["kind"] == "teacher" and teacher["examples"] == 4
    assert teacher["accuracy"] == 0.5  # right on its own-answer labels, wrong on "no"
    assert teacher["token_kl"] < 1e-3  # its own stored top-k: only fp16 rounding remains
    for r in rows:
        assert r["params"] > 0 and r["disk_bytes"] > 0 and r["decode_tok_s"] > 0
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1 and r["token_kl"] >= 0
        assert r["retention"] == pytest.approx(r["accuracy"] / 0.5)
    for r in rows[1:]:
        assert r["token_kl"] > teacher["token_kl"]
    console = Console(record=True, width=200)
    console.print(format_table(rows))
    text = console.export_text()
    assert "teacher" in text and "halves" in text and "50.0%" in text
    teacher_line = next(line for line in text.splitlines() if "teacher" in line and "│" in line)
    cells = [c.strip() for c in teacher_line.split("│")[1:-1]]
    assert cells[2] == f"{teacher['params'] / 1e6:.1f}M" and cells[3].endswith("MB")  # each value under its header
