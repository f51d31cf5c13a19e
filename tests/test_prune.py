"""Teacher-derived compression: depth by block influence, widths by activation, shapes, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.models import ModelError
from engine.spec import SpecError, parse_spec
from engine.train.prune import calibration_sample
from engine.train.students import build_student, student_shape

VOCAB = 300


class _Tokenizer:
    pad_token_id = 0


def _teacher(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama: 4 layers, hidden 32, 4 heads in 2 kv groups (head_dim 8), 64 neurons."""
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True, initializer_range=0.3,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)
    shape.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**shape)).eval()


def _spec(*from_teacher: dict, teacher: str = "unused-teacher"):
    return parse_spec({"name": "tiny", "teacher": {"model": teacher}, "sources": [{"path": "unused.jsonl"}],
                       "students": [{"name": f"s{i}", "from_teacher": ft} for i, ft in enumerate(from_teacher)]})


def _calibration(n: int = 12, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _build(teacher, from_teacher: dict, calibration=None):
    spec = _spec(from_teacher)
    return build_student(spec, spec.students[0], teacher, _Tokenizer(), _calibration() if calibration is None
                         else calibration)


def _logits(model, ids=None) -> torch.Tensor:
    ids = ids if ids is not None else torch.tensor([s[:4] for s in _calibration(3, seed=7)])
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


# --- nothing pruned: the teacher, exactly ---------------------------------------------------------


@pytest.mark.parametrize("from_teacher", [
    {},
    {"keep_layers": 4, "hidden_size": 32, "intermediate_size": 64, "heads": 4, "kv_heads": 2},  # measured, not cut
    {"layers": [0, 1, 2, 3]},
])
def test_nothing_pruned_keeps_the_teachers_output(from_teacher):
    teacher = _teacher()
    student = _build(teacher, from_teacher)
    assert type(student) is LlamaForCausalLM
    assert torch.allclose(_logits(student), _logits(teacher), atol=1e-5)
    report = student.pruning_report
    assert report["layers"] == [0, 1, 2, 3] and report["ratio"] == 1.0


# --- depth: block influence -------------------------------------------------------------------------


def test_depth_pruning_drops_an_identity_layer_first():
    teacher = _teacher()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its output is its input
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    student = _build(teacher, {"keep_layers": 3})
    report = student.pruning_report
    assert report["layers"] == [0, 1, 3] and report["layers_by"] == "block influence"
    assert report["dropped_layers"][0][0] == 2 and report["dropped_layers"][0][1] == pytest.approx(0, abs=1e-6)
    assert min(report["block_influence"][i] for i in (0, 1, 3)) > 0.01
    assert "kept layers [0, 1, 3] of 4 by block influence (lowest dropped: 2 " in report["summary"]
    # Dropping a layer that did nothing changes nothing.
    assert torch.allclose(_logits(student), _logits(teacher), atol=1e-5)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert torch.equal(s_state["model.layers.2.mlp.up_proj.weight"], t_state["model.layers.3.mlp.up_proj.weight"])


def test_listed_layers_need_no_calibration_and_keep_their_order():
    teacher = _teacher()
    spec = _spec({"layers": [3, 1]})
    student = build_student(spec, spec.students[0], teacher, _Tokenizer())  # calibration=None: fine
    assert student.pruning_report["layers"] == [3, 1] and student.pruning_report["layers_by"] == "as listed"
    assert student.config.num_hidden_layers == 2


# --- width: neurons, heads, kv groups, hidden channels ---------------------------------------------


def test_width_pruning_drops_neurons_that_write_nothing():
    teacher = _teacher()
    dead = [3, 17, 40, 63]
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    student = _build(teacher, {"intermediate_size": 60})
    alive = [i for i in range(64) if i not in dead]
    for t_layer, s_layer in zip(teacher.model.layers, student.model.layers):
        assert torch.equal(s_layer.mlp.gate_proj.weight, t_layer.mlp.gate_proj.weight[alive])
        assert torch.equal(s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight[:, alive])
    assert student.config.intermediate_size == 60
    assert torch.allclose(_logits(student), _logits(teacher), atol=1e-5)
    assert "intermediate 64 -> 60 by activation" in student.pruning_report["summary"]


def test_head_pruning_drops_silent_heads_within_each_kv_group():
    teacher = _teacher()
    with torch.no_grad():  # head 1 (group 0) and head 2 (group 1) write nothing through o_proj
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[:, 8:24] = 0
    student = _build(teacher, {"heads": 2})
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size) == (2, 2, 8, 32)
    assert student.pruning_report["kept_heads"] == {str(i): [0, 3] for i in range(4)}
    t0, s0 = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    assert torch.equal(s0.q_proj.weight, torch.cat([t0.q_proj.weight[0:8], t0.q_proj.weight[24:32]]))
    assert torch.equal(s0.k_proj.weight, t0.k_proj.weight)  # both kv groups stay
    assert torch.allclose(_logits(student), _logits(teacher), atol=1e-5)


def test_kv_group_pruning_drops_a_silent_group_whole():
    teacher = _teacher()
    with torch.no_grad():  # group 1 = heads 2 and 3
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[:, 16:32] = 0
    student = _build(teacher, {"kv_heads": 1})  # heads follow: 2 per group, as in the teacher
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 1)
    assert student.pruning_report["kept_heads"]["0"] == [0, 1]
    t0, s0 = teacher.model.layers[0].self_attn, student.model.layers[0].self_attn
    assert torch.equal(s0.k_proj.weight, t0.k_proj.weight[0:8]) and torch.equal(s0.v_proj.weight, t0.v_proj.weight[0:8])
    assert torch.allclose(_logits(student), _logits(teacher), atol=1e-5)


def test_hidden_pruning_drops_a_dead_residual_channel_everywhere():
    teacher = _teacher()
    dead = 5
    with torch.no_grad():  # nothing ever writes channel 5 of the residual stream
        teacher.model.embed_tokens.weight[:, dead] = 0
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    student = _build(teacher, {"hidden_size": 31})
    keep = [i for i in range(32) if i != dead]
    assert student.config.hidden_size == 31 and student.config.head_dim == 8
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, keep])
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    s0, t0 = student.model.layers[0], teacher.model.layers[0]
    assert torch.equal(s0.self_attn.q_proj.weight, t0.self_attn.q_proj.weight[:, keep])
    assert torch.equal(s0.self_attn.o_proj.weight, t0.self_attn.o_proj.weight[keep])
    assert torch.equal(s0.input_layernorm.weight, t0.input_layernorm.weight[keep])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[keep])
    assert torch.isfinite(_logits(student)).all()


def test_everything_at_once_generates_and_round_trips(tmp_path):
    teacher = _teacher()
    student = _build(teacher, {"keep_layers": 2, "hidden_size": 24, "intermediate_size": 40, "heads": 2,
                                "kv_heads": 1})
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads) == (2, 24, 40, 2, 1)
    ids = torch.tensor([[5, 6, 7]])
    assert student.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == 6
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype="float32").eval()
    assert type(again) is LlamaForCausalLM
    assert torch.allclose(_logits(again), _logits(student.eval()), atol=1e-6)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in student.parameters())


def test_pruning_is_deterministic_and_the_calibration_sample_is_seeded():
    teacher = _teacher()
    a = _build(teacher, {"keep_layers": 2, "intermediate_size": 32})
    b = _build(teacher, {"keep_layers": 2, "intermediate_size": 32})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    seqs = _calibration(20)
    assert calibration_sample(seqs, 5, 0) == calibration_sample(seqs, 5, 0)
    assert len(calibration_sample(seqs, 5, 0)) == 5 and calibration_sample(seqs, 50, 0) == seqs


def test_width_pruning_without_calibration_says_so():
    teacher = _teacher()
    spec = _spec({"keep_layers": 2})
    with pytest.raises(ModelError, match="calibration|train split"):
        build_student(spec, spec.students[0], teacher, _Tokenizer(), None)


# --- shapes before training ----------------------------------------------------------------------


@pytest.mark.parametrize("from_teacher", [
    {}, {"layers": [2, 0]}, {"keep_layers": 3}, {"hidden_size": 20}, {"intermediate_size": 16},
    {"heads": 2}, {"kv_heads": 1}, {"keep_layers": 1, "hidden_size": 16, "intermediate_size": 8, "heads": 1, "kv_heads": 1},
])
def test_student_shape_counts_what_is_built(from_teacher):
    teacher = _teacher()
    spec = _spec(from_teacher)
    params, ratio = student_shape(spec, spec.students[0], teacher.config)
    built = build_student(spec, spec.students[0], teacher, _Tokenizer(), _calibration())
    assert params == sum(p.numel() for p in built.parameters())
    assert ratio == pytest.approx(params / sum(p.numel() for p in teacher.parameters()))
    assert built.pruning_report["params"] == params


def test_student_shape_of_config_and_model_students(tmp_path):
    teacher = _teacher()
    other = _teacher(hidden_size=16, num_hidden_layers=2, intermediate_size=24)
    other.save_pretrained(tmp_path / "other")
    spec = parse_spec({"name": "tiny", "teacher": {"model": "unused"}, "sources": [{"path": "unused.jsonl"}],
                       "students": [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2,
                                                                 "intermediate_size": 24}},
                                    {"name": "other", "model": str(tmp_path / "other")}]})
    fresh = build_student(spec, spec.students[0], teacher, _Tokenizer())
    assert student_shape(spec, spec.students[0], teacher.config)[0] == sum(p.numel() for p in fresh.parameters())
    assert student_shape(spec, spec.students[1], teacher.config)[0] == sum(p.numel() for p in other.parameters())


def test_student_shape_reads_the_teachers_config_itself(tmp_path):
    teacher = _teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    spec = _spec({"keep_layers": 2}, teacher=str(tmp_path / "teacher"))
    params, ratio = student_shape(spec, spec.students[0])
    assert 0.3 < ratio < 1 and params == student_shape(spec, spec.students[0], teacher.config)[0]


# --- bad input: one line naming the field -------------------------------------------------------------


@pytest.mark.parametrize("from_teacher, field, message", [
    ({"heads": 3, "kv_heads": 2}, "students[0].from_teacher.kv_heads", "heads 3 is not divisible by kv_heads 2"),
    ({"layers": [0, 1], "keep_layers": 2}, "students[0].from_teacher.keep_layers", "give layers or keep_layers"),
    ({"layers": [0, 0]}, "students[0].from_teacher.layers", "distinct"),
    ({"keep_layers": 0}, "students[0].from_teacher.keep_layers", "greater than or equal to 1"),
    ({"hidden_size": 0}, "students[0].from_teacher.hidden_size", "greater than or equal to 1"),
    ({"neurons": 3}, "students[0].from_teacher.neurons", "unknown key"),
])
def test_bad_shapes_are_one_line_spec_errors(from_teacher, field, message):
    with pytest.raises(SpecError) as e:
        _spec(from_teacher)
    assert len(str(e.value).splitlines()) == 1
    assert f"<spec>: {field}: " in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("from_teacher, field, message", [
    ({"layers": [0, 4]}, "layers", "layer 4 is out of range, the teacher has 4 layers (0-3)"),
    ({"keep_layers": 5}, "keep_layers", "keep_layers 5 is more than the teacher's 4 layers"),
    ({"hidden_size": 64}, "hidden_size", "hidden_size 64 is larger than the teacher's 32"),
    ({"intermediate_size": 65}, "intermediate_size", "intermediate_size 65 is larger than the teacher's 64"),
    ({"heads": 8}, "heads", "heads 8 is larger than the teacher's 4"),
    ({"kv_heads": 4}, "kv_heads", "kv_heads 4 is larger than the teacher's 2"),
    ({"heads": 3}, "heads", "heads 3 is not divisible by the teacher's 2 kv heads"),
    ({"heads": 4, "kv_heads": 1}, "heads", "puts 4 query heads in each kv group; the teacher's groups have 2"),
])
def test_shapes_the_teacher_cannot_give_fail_before_training(from_teacher, field, message):
    teacher = _teacher()
    spec = _spec({"layers": [0]}, from_teacher)  # the second student: the path names its index
    for attempt in (lambda: student_shape(spec, spec.students[1], teacher.config),
                    lambda: build_student(spec, spec.students[1], teacher, _Tokenizer(), _calibration())):
        with pytest.raises(SpecError) as e:
            attempt()
        text = str(e.value)
        assert len(text.splitlines()) == 1
        assert text.startswith(f"<spec>: students[1].from_teacher.{field}: student 's1': ") and message in text


# --- the loop: it prints what it kept and records it ------------------------------------------------------


def test_train_prints_and_records_what_pruning_kept(tiny_llm_dir, tiny_examples, tmp_path, capsys):
    from engine.train import train_students

    spec = parse_spec({
        "name": "tiny",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 8},
                    "reasoning": {"answer_marker": "Answer:"}, "batch_size": 4},
        "sources": [{"path": "unused.jsonl"}],
        "students": [{"name": "drop2", "from_teacher": {"keep_layers": 2, "intermediate_size": 32, "calibration": 4}}],
        "training": {"max_steps": 1, "batch_size": 10},
    })
    metrics = train_students(spec, tiny_examples, tmp_path, progress=True)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("drop2: kept layers"))
    assert "by block influence" in line and "intermediate 64 -> 32 by activation" in line
    assert "measured on 4 train sequences" in line
    pruning = metrics["drop2"]["pruning"]
    assert len(pruning["layers"]) == 2 and pruning["calibration"]["sequences"] == 4
    saved = json.loads((tmp_path / "drop2" / "metrics.json").read_text())
    assert saved["pruning"]["summary"] == line
    assert saved["params"] == pruning["params"]
