"""Hidden-state distillation (training.loss.hidden): the term by hand, the layer map, the projections, the
teacher's states over the student's own ids, and training runs that lower the term."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_train_spec as _spec
from transformers import AutoModelForCausalLM

from engine.models import load_causal_lm
from engine.spec import SpecError
from engine.train import train_students
from engine.train.data import collate, encode, student_texts
from engine.train.hidden import HiddenDistill, capture, default_layer_map, resolve_layer_map, with_teacher_hidden
from engine.train.loop import Trainee
from engine.train.losses import hidden_state_loss

FRESH = {"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}}
HALVES = {"name": "halves", "from_teacher": {"layers": [0, 2]}}


# --- the term ----------------------------------------------------------------------------------


def test_the_term_matches_a_hand_computed_value():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    # cosines 0, 1, -1 -> distances 1, 0, 2: mean 1
    assert hidden_state_loss(s, t, "cosine").item() == pytest.approx(1.0)
    # squared differences (1+4)/2, (1+1)/2, (36+64)/2 -> 2.5, 1, 50: mean 53.5 / 3
    assert hidden_state_loss(s, t, "mse").item() == pytest.approx(53.5 / 3)
    s2 = torch.tensor([[0.6, 0.8]])
    t2 = torch.tensor([[1.0, 0.0]])
    assert hidden_state_loss(s2, t2, "cosine").item() == pytest.approx(1 - 0.6)
    empty = torch.zeros(0, 2, requires_grad=True)
    zero = hidden_state_loss(empty, torch.zeros(0, 2))
    assert zero.item() == 0.0
    zero.backward()  # nothing selected still backpropagates
    with pytest.raises(ValueError, match="unknown distance"):
        hidden_state_loss(s, t, "l1")


def test_the_projection_and_the_student_states_get_gradients_and_layers_are_averaged():
    torch.manual_seed(0)
    term = HiddenDistill({0: 1, 1: 3}, student_width=3, teacher_width=5, distance="mse")
    assert set(term.projections) == {"0", "1"} and term.projections["0"].weight.shape == (5, 3)
    states = {0: torch.randn(4, 3, requires_grad=True), 1: torch.randn(4, 3, requires_grad=True)}
    teacher = {1: torch.randn(4, 5), 3: torch.randn(4, 5)}
    value = term(states, teacher)
    by_hand = sum(((term.projections[str(s)](states[s]) - teacher[t]) ** 2).mean() for s, t in {0: 1, 1: 3}.items()) / 2
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-6)
    value.backward()
    for p in term.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert states[0].grad.abs().sum() > 0 and states[1].grad.abs().sum() > 0
    same = HiddenDistill({0: 0}, student_width=5, teacher_width=5, distance="cosine")
    assert same.projections is None and list(same.parameters()) == []  # equal widths: the identity


def test_the_default_layer_map_spreads_the_student_evenly_and_ends_on_the_last_layer():
    assert default_layer_map(2, 4) == {0: 1, 1: 3}
    assert default_layer_map(6, 30) == {0: 4, 1: 9, 2: 14, 3: 19, 4: 24, 5: 29}
    assert default_layer_map(4, 4) == {0: 0, 1: 1, 2: 2, 3: 3}
    assert default_layer_map(4, 2) == {0: 0, 1: 0, 2: 0, 3: 1}  # deeper than its teacher: still in range
    assert resolve_layer_map({1: 3, 0: 0}, "s", 2, 4, "x.yaml") == {0: 0, 1: 3}


@pytest.mark.parametrize("layer_map, message", [
    ({0: 1, 2: 3}, "student layer 2 is out of range for student 'fresh': it has 2 layers (0 to 1)"),
    ({0: 4}, "teacher layer 4 is out of range: the teacher has 4 layers (0 to 3)"),
])
def test_a_layer_map_out_of_range_is_a_one_line_spec_error_before_training(tiny_llm_dir, tiny_examples, tmp_path,
                                                                          monkeypatch, layer_map, message):
    stepped = []
    monkeypatch.setattr(Trainee, "step", lambda *a, **k: stepped.append(1))
    spec = _spec(tiny_llm_dir, [FRESH], loss={"hidden": {"weight": 1.0, "layer_map": layer_map}})
    with pytest.raises(SpecError) as e:
        train_students(spec, tiny_examples, tmp_path, progress=False)
    assert str(e.value) == f"<spec>: training.loss.hidden.layer_map: {message}"
    assert stepped == []


def test_the_openai_backend_cannot_have_a_hidden_term(tiny_llm_dir):
    with pytest.raises(SpecError) as e:
        _spec(tiny_llm_dir, [FRESH], backend="openai", loss={"hidden": {"weight": 0.5}})
    assert str(e.value).startswith("<spec>: training.loss.hidden: hidden-state distillation needs the teacher's "
                                   "weights (teacher.backend: transformers)")
    assert "\n" not in str(e.value)
    assert _spec(tiny_llm_dir, [FRESH], backend="openai").training.loss.hidden is None


def test_hidden_spec_fields_are_validated(tiny_llm_dir):
    for hidden, message in [({"weight": 0}, "training.loss.hidden.weight: Input should be greater than 0"),
                            ({"weight": 1, "distance": "l1"}, "training.loss.hidden.distance: Input should be"),
                            ({"weight": 1, "layer_map": {0: -1}}, "layer_map: layers are 0-based, never negative"),
                            ({"weight": 1, "layer_map": {"last": 1}}, "layer_map: key 'last': Input should be a valid"),
                            ({"weight": 1, "layers": [1]}, "training.loss.hidden.layers: unknown key")]:
        with pytest.raises(SpecError, match=message):
            _spec(tiny_llm_dir, [FRESH], loss={"hidden": hidden})


# --- the states --------------------------------------------------------------------------------


def test_the_teacher_reads_the_students_ids_and_layer_i_is_decoder_layer_i(tiny_llm_dir, tiny_examples):
    """A student prompt unlike the teacher's: the teacher's states are taken over the student's batch (its
    context + the response), at the mask's positions; layer i is what HF calls hidden_states[i + 1]."""
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    rows = tiny_examples.head(3)
    batch = collate(encode(rows, tokenizer, student_texts(rows, "Answer yes or no. {{ prompt }}")),
                    tokenizer.pad_token_id)
    got = with_teacher_hidden(teacher, batch, [0, 2])["teacher_hidden"]
    with torch.no_grad():
        full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states
    n = int(batch["mask"].sum())
    for layer in (0, 2):
        assert got[layer].shape == (n, teacher.config.hidden_size) and got[layer].dtype == torch.float32
        assert torch.allclose(got[layer], full[layer + 1][batch["mask"]], atol=1e-5)
    hooks = dict(teacher.model.layers[1]._forward_hooks)  # transformers' own, for output_hidden_states
    with capture(teacher, [1], batch["mask"]) as states:
        assert len(teacher.model.layers[1]._forward_hooks) == len(hooks) + 1
    assert states == {} and dict(teacher.model.layers[1]._forward_hooks) == hooks  # ours goes with the block


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hidden_run(tiny_llm_dir, tiny_examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("hidden")
    spec = _spec(tiny_llm_dir, [FRESH, HALVES], epochs=12, batch_size=10, seed=1, optimizer={"lr": 5e-3},
                 loss={"hidden": {"weight": 1.0}})
    return spec, out, train_students(spec, tiny_examples, out, progress=False)


def test_training_lowers_the_hidden_term_and_records_it_as_a_component(hidden_run):
    spec, out, metrics = hidden_run
    for name, m in metrics.items():
        curves = m["loss_components"]
        assert set(curves) == {"kd", "hard", "hidden"} and len(curves["hidden"]) == m["steps"] == 12
        first, last = curves["hidden"][0][1], curves["hidden"][-1][1]
        assert 0 < last < 0.8 * first, name
        assert m["hidden_layer_map"] == [[0, 1], [1, 3]]  # 2 student layers over the teacher's 4
        # Each step's total is the weighted sum of its terms.
        kd, hard, hidden = (curves[k][0][1] for k in ("kd", "hard", "hidden"))
        assert m["loss_curve"][0][1] == pytest.approx(0.7 * kd + 0.3 * hard + 1.0 * hidden, rel=1e-5)
        assert m["loss"]["hidden"] == {"weight": 1.0, "layer_map": None, "distance": "cosine"}


def test_projections_are_not_saved_with_the_student(hidden_run, tiny_llm_dir):
    _, out, _ = hidden_run
    saved = AutoModelForCausalLM.from_pretrained(out / "fresh")
    assert saved.config.hidden_size == 16
    assert not any("proj" in k and "layers" not in k for k in saved.state_dict())
    from safetensors.torch import load_file
    keys = set(load_file(str(out / "fresh" / "model.safetensors")))
    assert not any(k.startswith("projections") or "hidden" in k for k in keys)


def test_mse_with_an_explicit_map_trains_and_accumulates_like_one_batch(tiny_llm_dir, tiny_examples):
    """grad_accum with the hidden term: two micro-batches of 2 give the gradients of one batch of 4."""
    spec = _spec(tiny_llm_dir, [FRESH], batch_size=2, grad_accum=2,
                 loss={"hidden": {"weight": 0.5, "layer_map": {1: 2}, "distance": "mse"}})
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    one = Trainee.create(spec, spec.students[0], teacher, tokenizer, 10)
    two = Trainee.create(spec, spec.students[0], teacher, tokenizer, 10)
    rows = tiny_examples.head(4)
    encoded = encode(rows, tokenizer, student_texts(rows, None))
    whole = [with_teacher_hidden(teacher, collate(encoded, tokenizer.pad_token_id), [2])]
    parts = [with_teacher_hidden(teacher, collate(encoded[i:i + 2], tokenizer.pad_token_id), [2]) for i in (0, 2)]
    assert one.accumulate(whole, spec, 0, 10) == pytest.approx(two.accumulate(parts, spec, 0, 10), rel=1e-5)
    assert one.components["hidden"][0] == pytest.approx(two.components["hidden"][0], rel=1e-5)
    assert math.isfinite(one.components["hidden"][0]) and one.components["hidden"][0] > 0
    for a, b in zip(one.parameters(), two.parameters()):  # the projection's gradients too
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert one.hidden.projections["1"].weight.grad.abs().sum() > 0


def test_a_student_with_a_trimmed_vocabulary_trains_with_the_hidden_term(tiny_llm_dir, tiny_examples, tmp_path):
    student = {"name": "trim", "from_teacher": {"layers": [0, 2], "vocab": {"keep_frequent": 100}}}
    spec = _spec(tiny_llm_dir, [student], epochs=8, batch_size=10, optimizer={"lr": 5e-3},
                 loss={"hidden": {"weight": 1.0}})
    m = train_students(spec, tiny_examples, tmp_path, progress=False)["trim"]
    hidden = m["loss_components"]["hidden"]
    assert 0 < hidden[-1][1] < hidden[0][1]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "trim")
    assert saved.config.vocab_size < 49152  # it did trim


def test_forwards_under_bf16_autocast_keep_the_losses_in_float32(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch):
    """The CUDA path's autocast, on the CPU (no GPU here): bf16 logits and hidden states, float32 losses,
    projections in float32; the run trains and every term stays finite."""
    import engine.train.hidden as hidden_module
    import engine.train.loop as loop
    from engine.train.losses import LossParts

    bf16 = lambda device: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(loop, "autocast", bf16)
    monkeypatch.setattr(hidden_module, "autocast", bf16)
    seen = []
    real = loop.distillation_loss

    def spy(logits, *args, **kwargs):
        seen.append(logits.dtype)
        parts = real(logits, *args, **kwargs)
        assert isinstance(parts, LossParts) and parts.loss.dtype == torch.float32
        return parts

    monkeypatch.setattr(loop, "distillation_loss", spy)
    spec = _spec(tiny_llm_dir, [FRESH], epochs=4, batch_size=10, optimizer={"lr": 5e-3},
                 loss={"hidden": {"weight": 1.0, "distance": "mse"}})
    m = train_students(spec, tiny_examples, tmp_path, progress=False)["fresh"]
    assert torch.bfloat16 in seen  # the forwards did run under autocast
    assert all(math.isfinite(v) for curve in m["loss_components"].values() for _, v in curve)
    assert m["loss_components"]["hidden"][-1][1] < m["loss_components"]["hidden"][0][1]
