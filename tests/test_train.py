"""The trainer: top-k + tail loss, student construction, the multi-student loop, eval."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch
from conftest import tiny_train_spec as _spec
from rich.console import Console
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.models import ModelError, chat_prompt_ids, load_causal_lm
from engine.spec import Loss, SpecError
from engine.train import evaluate, format_table, train_students
from engine.train.data import Encoded, collate, encode, student_texts
from engine.train.loop import Trainee, hard_weight_at, lr_schedule, temperature_at
from engine.train.losses import distillation_loss, token_kl
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


def test_cosine_and_constant_lr_at_known_steps():
    cosine = lr_schedule(total_steps=10, warmup_steps=2, schedule="cosine")
    # warm-up 0.5, 1; then 0.5 (1 + cos(pi (s - 2) / 8)): 1 at s=2, cos(pi/4) at s=4, 0 at s=6, cos(7pi/8) at s=9
    want = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 9: 0.5 * (1 + math.cos(7 * math.pi / 8))}
    assert {s: cosine(s) for s in want} == pytest.approx(want)
    assert cosine(9) > 0  # the last step still learns
    assert [lr_schedule(5, 2, "constant")(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_schedule(6, 2) is not None and lr_schedule(6, 2, "linear")(3) == lr_schedule(6, 2)(3) == 0.75


def test_hard_weight_warms_up_and_temperature_anneals_linearly():
    warm = Loss(hard_weight=0.4, hard_warmup_steps=4)
    assert [hard_weight_at(warm, s) for s in (0, 2, 4, 10)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    anneal = Loss(temperature=4.0, temperature_end=1.0)  # 11 steps: the last is step 10
    assert [temperature_at(anneal, s, 11) for s in (0, 5, 10)] == pytest.approx([4.0, 2.5, 1.0])
    default = Loss()  # today's: both constant
    assert {hard_weight_at(default, s) for s in (0, 5, 99)} == {default.hard_weight}
    assert {temperature_at(default, s, 11) for s in (0, 5, 10)} == {default.temperature}


FRESH = {"name": "fresh", "config": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}}


def _trainee(spec, tiny_llm_dir, total_steps=10):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    return Trainee.create(spec, spec.students[0], teacher, tokenizer, total_steps), tokenizer  # seeded: same each call


def test_grad_accumulation_of_two_batches_of_b_is_one_batch_of_2b(tiny_llm_dir, tiny_examples):
    spec = _spec(tiny_llm_dir, [FRESH], batch_size=2, grad_accum=2, loss={"hard_weight": 0.5})
    one, tokenizer = _trainee(spec, tiny_llm_dir)
    two, _ = _trainee(spec, tiny_llm_dir)
    rows = tiny_examples.head(4)
    encoded = encode(rows, tokenizer, student_texts(rows, None))
    e = encoded[0]  # unequal response lengths, so the micro-batches must be weighted by their tokens
    encoded[0] = Encoded(e.prompt_ids, e.token_ids[:3], e.topk_ids[:3], e.topk_logprobs[:3])
    whole = one.accumulate([collate(encoded, tokenizer.pad_token_id)], spec, 0, 10)
    parts = two.accumulate([collate(encoded[:2], tokenizer.pad_token_id), collate(encoded[2:], tokenizer.pad_token_id)],
                           spec, 0, 10)
    assert parts == pytest.approx(whole, rel=1e-5) and one.tokens == two.tokens
    for (name, a), b in zip(one.model.named_parameters(), two.model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name


def test_grad_accumulation_trains_like_the_bigger_batch(tiny_llm_dir, tiny_examples, tmp_path):
    big = _spec(tiny_llm_dir, [FRESH], epochs=3, batch_size=10, seed=1, optimizer={"lr": 3e-3})
    small = _spec(tiny_llm_dir, [FRESH], epochs=3, batch_size=5, grad_accum=2, seed=1, optimizer={"lr": 3e-3})
    a = train_students(big, tiny_examples, tmp_path / "big", progress=False)["fresh"]
    b = train_students(small, tiny_examples, tmp_path / "small", progress=False)["fresh"]
    assert a["steps"] == b["steps"] == 3 and b["grad_accum"] == 2 and a["train_tokens"] == b["train_tokens"]
    assert [x for p in b["loss_curve"] for x in p] == pytest.approx([x for p in a["loss_curve"] for x in p], rel=1e-4)


@pytest.mark.parametrize("clip", [1e-3, None])
def test_clipping_bounds_the_gradient_norm(tiny_llm_dir, tiny_examples, clip):
    spec = _spec(tiny_llm_dir, [FRESH], optimizer={"clip_grad_norm": clip})
    trainee, tokenizer = _trainee(spec, tiny_llm_dir)
    seen = []  # the gradient norm the optimizer steps with
    trainee.optimizer.register_step_pre_hook(lambda *_: seen.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainee.model.parameters()])))))
    rows = tiny_examples.head(4)
    trainee.step([collate(encode(rows, tokenizer, student_texts(rows, None)), tokenizer.pad_token_id)], spec, 0, 10)
    before = trainee.grad_norms[0]  # recorded before clipping
    if clip:
        assert before > 10 * clip and seen[0] == pytest.approx(clip, rel=1e-3)
    else:
        assert seen[0] == pytest.approx(before, rel=1e-5)


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best_weights(tiny_llm_dir, tiny_examples, tmp_path,
                                                                              monkeypatch):
    """Scripted val losses 3, 2, 2.5, 2.4, ...: the best is epoch 2; with patience 2 it stops after epoch 4,
    and the saved weights are those it had at the end of epoch 2."""
    script = iter([3.0, 2.0, 2.5, 2.4, 1.0, 1.0])
    snapshots = {}
    real = Trainee.validate

    def scripted(self, batches, spec, total_steps):
        real(self, batches, spec, total_steps)  # still runs, eval mode and no grad
        snapshots[len(self.losses)] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return next(script)

    monkeypatch.setattr(Trainee, "validate", scripted)
    spec = _spec(tiny_llm_dir, [FRESH], epochs=10, batch_size=10, seed=2, early_stopping={"patience": 2},
                 optimizer={"lr": 1e-2})
    m = train_students(spec, tiny_examples, tmp_path, progress=False)["fresh"]
    assert m["steps"] == 4 and m["epochs"] == 4.0 and m["stopped_early"] and m["kept"] == "best"
    assert m["val_losses"] == [[1.0, 1, 3.0], [2.0, 2, 2.0], [3.0, 3, 2.5], [4.0, 4, 2.4]]
    assert m["best_val"] == [2.0, 2, 2.0]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh").state_dict()
    for key, value in snapshots[2].items():
        assert torch.equal(saved[key], value), key
    assert not torch.equal(snapshots[2]["model.norm.weight"], snapshots[4]["model.norm.weight"])  # it did move on


def test_keep_best_and_early_stopping_need_a_val_split(tiny_llm_dir, tiny_examples, tmp_path):
    no_val = tiny_examples.with_columns(split=pl.when(pl.col("split") == "val").then(pl.lit("test"))
                                        .otherwise(pl.col("split")))
    for training in ({"early_stopping": {"patience": 1}}, {"keep": "best"}):
        spec = _spec(tiny_llm_dir, [FRESH], **training)
        with pytest.raises(SpecError, match="needs the val loss"):
            train_students(spec, no_val, tmp_path, progress=False)


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
        # The schedules as they ran, and the val loss after every epoch; the last weights are the ones saved.
        factor = lr_schedule(8, 2)
        assert m["schedules"]["lr"] == [[s, pytest.approx(3e-3 * factor(s))] for s in range(8)]
        assert m["schedules"]["temperature"] == [[s, 2.0] for s in range(8)]
        assert [v[:2] for v in m["val_losses"]] == [[float(e), e] for e in range(1, 9)] and m["kept"] == "last"
        assert not m["stopped_early"] and len(m["grad_norm_curve"]) == 8


def test_val_loss_is_the_training_loss_of_the_saved_weights_on_the_val_split(trained, tiny_examples):
    spec, out, metrics = trained
    val = tiny_examples.filter(pl.col("split") == "val")
    model, tokenizer = load_causal_lm(str(out / "fresh"))
    batch = collate(encode(val, tokenizer, student_texts(val, None)), tokenizer.pad_token_id)
    loss = spec.training.loss
    with torch.no_grad():
        from engine.train.data import response_logits
        want = distillation_loss(response_logits(model, batch), batch["topk_ids"], batch["topk_logprobs"],
                                 batch["targets"], kd_weight=loss.kd_weight, hard_weight=loss.hard_weight,
                                 temperature=loss.temperature).loss.item()
    assert metrics["fresh"]["val_losses"][-1][2] == pytest.approx(want, rel=1e-4)


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


def _llama_params(c) -> int:
    """Parameters of a Llama with tied embeddings, by hand: the shared embedding counts once."""
    head_dim = c.hidden_size // c.num_attention_heads
    attention = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.num_key_value_heads * head_dim
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size


def _scored_by_hand(spec, examples, folder) -> tuple[float, float]:
    """(accuracy, agreement) of a model's own greedy answers on the eval split, counted in plain Python."""
    from engine.teachers.answers import normalise_answer, split_answer
    from engine.train.evaluate import generate_texts

    rows = examples.filter(examples["split"] == spec.eval.split)
    labels = set(examples["label"].to_list())
    model, tokenizer = load_causal_lm(str(folder))
    prompts = [chat_prompt_ids(tokenizer, t) for t in rows["teacher_prompt"]]
    replies = generate_texts(model, tokenizer, prompts, spec.teacher.generation.max_new_tokens, spec.teacher.batch_size)
    marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
    answers = [normalise_answer(split_answer(r, marker)[1], labels) for r in replies]
    gold = [normalise_answer(g, labels) for g in rows["label"]]
    teacher = [normalise_answer(a, labels) for a in rows["answer"]]
    right = sum(a == g for a, g in zip(answers, gold))
    same = sum(a == t for a, t in zip(answers, teacher))
    return right / len(answers), same / len(answers)


def test_accuracy_counts_labelled_rows_only_and_maps_answers_onto_labels():
    from engine.train.evaluate import accuracy

    labels = {"positive", "negative"}
    answers = ["positive", "negative", "positive", "neutral", "negative"]
    gold = ["Positive.", "positive", None, "negative", "NEGATIVE"]  # normalised before comparing
    assert accuracy(answers, gold, labels) == pytest.approx(2 / 4)  # the unlabelled row is not counted
    assert accuracy(answers, [None] * 5, labels) is None  # no gold: no accuracy, not 0%


def test_evaluate_reports_teacher_then_students(trained, tiny_examples, tiny_llm_dir, other_llm_dir):
    spec, out, _ = trained
    dirs = {s.name: out / s.name for s in spec.students}
    # Two reference points beside the trained students: the teacher's own weights, and an
    # untrained random model with the same vocabulary.
    dirs.update(itself=tiny_llm_dir, untrained=other_llm_dir)
    rows = evaluate(spec, tiny_examples, dirs, progress=False)
    assert [r["name"] for r in rows] == [str(tiny_llm_dir), "halves", "fresh", "other", "itself", "untrained"]
    by_name = {r["name"]: r for r in rows}
    teacher = rows[0]
    assert teacher["kind"] == "teacher" and teacher["examples"] == 4
    assert teacher["accuracy"] == 0.5  # right on its own-answer labels, wrong on "no"
    assert teacher["token_kl"] < 1e-3  # its own stored top-k: only fp16 rounding remains
    assert teacher["params"] == _llama_params(load_causal_lm(str(tiny_llm_dir))[0].config)
    assert teacher["disk_bytes"] == (tiny_llm_dir / "model.safetensors").stat().st_size

    # The teacher's weights scored as a student: they answer as the stored teacher did.
    itself = by_name["itself"]
    assert (itself["accuracy"], itself["agreement"], itself["retention"]) == (0.5, 1.0, 1.0)
    assert itself["token_kl"] < 1e-3
    assert (itself["params"], itself["disk_bytes"]) == (teacher["params"], teacher["disk_bytes"])
    # Another random model: other answers, and token distributions far from the teacher's.
    untrained = by_name["untrained"]
    assert (untrained["accuracy"], untrained["agreement"], untrained["retention"]) == (0.0, 0.0, 0.0)
    assert untrained["token_kl"] > 1.0

    assert by_name["halves"]["params"] < teacher["params"]  # 2 of the teacher's 4 layers
    from engine.train.evaluate import wilson

    for r in rows:  # every accuracy with n, its Wilson interval and the majority baseline of the same rows
        assert r["n"] == 4 and r["accuracy_ci"] == pytest.approx(wilson(r["correct"], 4))
        assert r["baseline"] == {"label": "no", "n": 4, "correct": 2, "accuracy": 0.5, "ci": wilson(2, 4)}
        assert sum(sum(row.values()) for row in r["confusion"].values()) == 4
        assert "correct_rows" not in r and len(r["correct_by_row"]) == 4 and r["correct_by_row"].count("1") == r["correct"]
    assert teacher["confusion"]["no"] == {"no answer": 2}  # the teacher never says "no"
    assert itself["retention_ci"] == [1.0, 1.0]  # the same answers on every resample
    for r in rows[1:]:
        assert r["kind"] == {"halves": "from_teacher", "fresh": "config", "other": "model"}.get(r["name"], "student")
        assert (r["accuracy"], r["agreement"]) == pytest.approx(_scored_by_hand(spec, tiny_examples, dirs[r["name"]]))
        assert r["retention"] == pytest.approx(r["accuracy"] / teacher["accuracy"])
        assert r["token_kl"] > teacher["token_kl"] or r["name"] == "itself"
        assert r["decode_tok_s"] > 0 and r["disk_bytes"] > 0
    console = Console(record=True, width=200)
    console.print(format_table(rows))
    text = console.export_text()
    assert "teacher" in text and "halves" in text and "50.0%" in text
    teacher_line = next(line for line in text.splitlines() if "teacher" in line and "│" in line)
    cells = [c.strip() for c in teacher_line.split("│")[1:-1]]
    assert cells[2] == f"{teacher['params'] / 1e6:.1f}M" and cells[3].endswith("MB")  # each value under its header


def test_a_trained_student_agrees_with_the_teacher_and_an_untrained_one_does_not(tiny_llm_dir, tiny_examples, tmp_path):
    """A teacher that answers every prompt "Yes": after training, a fresh student answers the unseen
    test prompts "Yes" too (agreement 100%, the teacher's accuracy), while the same student before
    training agrees on nothing; its token KL to the teacher falls with training."""
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    yes = tokenizer.encode("Yes", add_special_tokens=False) + [tokenizer.eos_token_id]
    n = tiny_examples.height
    examples = tiny_examples.with_columns(  # the same prompts and splits, the "Yes" teacher's answers
        label=pl.Series(["Yes" if i % 2 == 0 else "No" for i in range(n)]), response=pl.lit("Yes"), answer=pl.lit("Yes"),
        token_ids=pl.Series([yes] * n, dtype=pl.List(pl.Int32)),
        topk_ids=pl.Series([[[t, 100, 200] for t in yes]] * n, dtype=pl.List(pl.List(pl.Int32))),
        topk_logprobs=pl.Series([[[math.log(0.9), math.log(0.05), math.log(0.02)]] * len(yes)] * n,
                                dtype=pl.List(pl.List(pl.Float16))))
    fresh = {"name": "fresh", "config": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}}
    spec = _spec(tiny_llm_dir, [fresh], epochs=30, batch_size=10, seed=3, optimizer={"lr": 2e-2, "warmup_steps": 0})
    untrained = build_student(spec, spec.students[0], teacher, tokenizer)  # seeded: the trained one's start
    untrained.save_pretrained(tmp_path / "untrained")
    tokenizer.save_pretrained(tmp_path / "untrained")
    train_students(spec, examples, tmp_path / "trained", progress=False)

    rows = evaluate(spec, examples, {"before": tmp_path / "untrained", "after": tmp_path / "trained" / "fresh"},
                    progress=False)
    teacher_row, before, after = rows
    assert teacher_row["accuracy"] == 0.5  # "Yes" is right on half of the test rows
    assert (before["agreement"], before["accuracy"]) == (0.0, 0.0)
    assert (after["agreement"], after["accuracy"], after["retention"]) == (1.0, 0.5, 1.0)
    # It learned to say "Yes" to everything, as its teacher does: both are flagged, at the majority baseline.
    assert after["one_answer"] and after["top_answer"] == {"answer": "yes", "share": 1.0, "count": 4}
    assert teacher_row["one_answer"] and after["accuracy"] == after["baseline"]["accuracy"]
    assert not before["one_answer"] or before["top_answer"]["answer"] == "no answer"
    assert after["token_kl"] < 0.5 * before["token_kl"]
