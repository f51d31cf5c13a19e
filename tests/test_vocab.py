"""Vocabulary trimming (from_teacher vocab:): the trimmed tokenizer, the sliced model, the id map, training."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import tiny_train_spec as _spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.errors import TrainError
from engine.models import chat_prompt_ids, load_causal_lm, load_tokenizer
from engine.spec import SpecError
from engine.train import vocab as V
from engine.train.data import collate, encode, response_logits, student_texts
from engine.train.losses import student_log_probs, teacher_log_probs
from engine.train.students import build_student, student_shape

PROMPTS = ["Is the sky blue?", "The blender broke after two days. Terrible!", "Do cats bark?"]
ODD_TEXTS = [
    "Zyzzyva quixotically flummoxed the perspicacious ombudsman.",  # unseen words
    "Great phone 📱🎉👍🏽 — would buy again!!",  # emoji, a dash
    "这个产品非常好，我很喜欢。",  # Chinese
    "def f(x):\n\treturn {k: v**2 for k, v in x.items() if v != None}  # code\n",
    "naïve café Ångström Straße ½ ±3°C  \n\n  trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens in text
]


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def trimmed(teacher_tokenizer):
    used = {i for p in PROMPTS for i in chat_prompt_ids(teacher_tokenizer, p)}
    return V.trim(teacher_tokenizer, used, 500)


# --- the tokenizer -----------------------------------------------------------------------------------


def test_the_plan_keeps_used_frequent_specials_and_bytes_closed_under_merges(teacher_tokenizer, trimmed):
    plan, kept = trimmed.plan, set(trimmed.plan.kept)
    assert plan.teacher_size == len(teacher_tokenizer) == 49152
    assert plan.size == plan.used + plan.frequent + plan.base == len(trimmed.vocab_map.tokenizer)
    assert plan.summary() == (f"vocab 49152 -> {plan.size} ({plan.used} used by the dataset + {plan.frequent} "
                              f"frequent + {plan.base} specials/bytes/closure)")
    assert {i for p in PROMPTS for i in chat_prompt_ids(teacher_tokenizer, p)} <= kept
    assert set(range(17)) <= kept  # every added/special token of SmolLM2
    tj = json.loads(teacher_tokenizer.backend_tokenizer.to_str())
    vocab, merges = tj["model"]["vocab"], [tuple(m) for m in tj["model"]["merges"]]
    assert {vocab[c] for c in V._byte_alphabet() if c in vocab} <= kept
    assert {vocab[a + b] for a, b in merges[:500]} <= kept  # keep_frequent: the 500 earliest merges
    for a, b in merges:  # closed: a kept merge result has both parts kept
        if vocab[a + b] in kept:
            assert vocab[a] in kept and vocab[b] in kept, (a, b)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_any_text_encodes_to_kept_ids_and_decodes_back(teacher_tokenizer, trimmed, text):
    student = trimmed.vocab_map.tokenizer
    ids = student(text, add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < trimmed.plan.size and min(ids) >= 0
    assert student.decode(ids) == text == teacher_tokenizer.decode(teacher_tokenizer(text)["input_ids"])
    # Unseen text falls back to shorter tokens: never fewer than the teacher's.
    assert len(ids) >= len(teacher_tokenizer(text, add_special_tokens=False)["input_ids"])


def test_text_made_of_kept_tokens_tokenizes_as_the_teachers(teacher_tokenizer, trimmed):
    student, to_student = trimmed.vocab_map.tokenizer, trimmed.vocab_map.to_student
    for text in PROMPTS:  # used by the "dataset": same tokens, in student ids
        want = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert student(text, add_special_tokens=False)["input_ids"] == to_student[torch.tensor(want)].tolist()
    # Every kept merged token as a word of its own, wherever the teacher reads it as that one token.
    checked = 0
    for old in trimmed.plan.kept:
        text = teacher_tokenizer.decode([old])
        if old < 17 or teacher_tokenizer(text, add_special_tokens=False)["input_ids"] != [old]:
            continue
        assert student(text, add_special_tokens=False)["input_ids"] == [int(to_student[old])], text
        checked += 1
    assert checked > 500
    # And random strings of kept pieces, wherever the teacher's tokens for them happen to be all kept.
    rng = random.Random(0)
    pieces = [teacher_tokenizer.decode([i]) for i in trimmed.plan.kept if i >= 17]
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(2, 6)))
        want = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        if all(to_student[i] >= 0 for i in want):
            assert student(text, add_special_tokens=False)["input_ids"] == to_student[torch.tensor(want)].tolist()
            checked += 1
    assert checked > 100


def test_the_chat_template_and_special_tokens_still_work(teacher_tokenizer, trimmed):
    student, to_student = trimmed.vocab_map.tokenizer, trimmed.vocab_map.to_student
    messages = [{"role": "user", "content": PROMPTS[1]}]
    assert student.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        teacher_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_prompt_ids(student, PROMPTS[1]) == to_student[torch.tensor(chat_prompt_ids(teacher_tokenizer,
                                                                                            PROMPTS[1]))].tolist()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(student, name) == getattr(teacher_tokenizer, name)
        assert getattr(student, name + "_id") == to_student[getattr(teacher_tokenizer, name + "_id")]
    ids = student("a<|im_end|>b", add_special_tokens=False)["input_ids"]
    assert student.eos_token_id in ids and student.decode(ids, skip_special_tokens=True) == "ab"


def test_a_tokenizer_that_is_not_byte_level_bpe_cannot_be_trimmed(teacher_tokenizer):
    class Slow:
        pass

    with pytest.raises(V.NotTrimmable, match="not a fast"):
        V.backend_json(Slow())

    class WordLevel:
        class backend_tokenizer:  # noqa: N801 - mimics the attribute
            @staticmethod
            def to_str():
                return json.dumps({"model": {"type": "WordLevel", "vocab": {}}, "pre_tokenizer": None})

    with pytest.raises(V.NotTrimmable, match="WordLevel"):
        V.backend_json(WordLevel())


# --- the id map ---------------------------------------------------------------------------------------


def _batch(input_ids, targets, topk_ids, topk_lps):
    input_ids = torch.tensor(input_ids)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mask": torch.ones_like(input_ids, dtype=torch.bool), "targets": torch.tensor(targets),
            "topk_ids": torch.tensor(topk_ids), "topk_logprobs": torch.tensor(topk_lps).log()}


def test_top_k_ids_the_student_lacks_fold_into_the_tail():
    vm = V.VocabMap.from_kept([0, 2, 5, 7], 10)  # student ids 0..3 are teacher ids 0, 2, 5, 7
    batch = _batch([[0, 5, 7]], [5, 7, 2],
                   [[5, 3, 7, 9], [9, 7, 2, 5], [2, 1, 3, 4]],  # row 1: slot 0 (id 9) is dropped
                   [[0.5, 0.2, 0.1, 0.05], [0.4, 0.3, 0.2, 0.05], [0.9, 0.04, 0.03, 0.02]])
    out = vm.remap(batch)
    assert out["input_ids"].tolist() == [[0, 2, 3]] and out["targets"].tolist() == [2, 3, 1]
    inf = float("-inf")
    # Kept slots first, in order; dropped ones absent (-inf) and pointing at slot 0's id, as collate pads.
    assert out["topk_ids"].tolist() == [[2, 3, 2, 2], [3, 1, 2, 3], [1, 1, 1, 1]]
    lps = out["topk_logprobs"].exp().tolist()
    assert lps[0] == pytest.approx([0.5, 0.1, 0, 0]) and lps[1] == pytest.approx([0.3, 0.2, 0.05, 0])
    assert lps[2] == pytest.approx([0.9, 0, 0, 0]) and out["topk_logprobs"][0, 2] == inf
    # The teacher's tail is 1 - the kept top-k mass: dropped ids' mass joins what was never stored.
    tail = teacher_log_probs(out["topk_logprobs"])[:, -1].exp()
    assert tail.tolist() == pytest.approx([1 - 0.6, 1 - 0.55, 1 - 0.9], abs=1e-6)
    # The student's tail: every student id outside the kept top-k.
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3)
    p = logits.softmax(-1)[0].tolist()
    s = student_log_probs(logits, out["topk_ids"], torch.isfinite(out["topk_logprobs"])).exp()
    assert s[0].tolist() == pytest.approx([p[2], p[3], 0, 0, p[0] + p[1]], abs=1e-6)
    assert s[1].tolist() == pytest.approx([p[3], p[1], p[2], 0, p[0]], abs=1e-6)
    assert s[2].tolist() == pytest.approx([p[1], 0, 0, 0, p[0] + p[2] + p[3]], abs=1e-6)


def test_inputs_and_targets_the_student_lacks_are_an_error():
    vm = V.VocabMap.from_kept([0, 2, 5, 7], 10)
    with pytest.raises(TrainError, match="teacher token 3"):
        vm.remap(_batch([[0, 3]], [5, 5], [[5], [5]], [[0.9], [0.9]]))
    with pytest.raises(TrainError, match="teacher token 9"):
        vm.remap(_batch([[0, 5]], [9, 5], [[5], [5]], [[0.9], [0.9]]))
    padded = _batch([[0, 5, 3]], [5, 5, 5], [[5]] * 3, [[0.9]] * 3)
    padded["attention_mask"][0, 2] = 0  # a pad position may hold any id: it is masked
    assert vm.remap(padded)["input_ids"][0, :2].tolist() == [0, 2]


# --- the model ----------------------------------------------------------------------------------------


def test_a_trimmed_copy_computes_the_teachers_logits_at_the_kept_ids(tiny_llm_dir, tiny_examples):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = _spec(tiny_llm_dir, [{"name": "t", "from_teacher": {"vocab": {"keep_frequent": 100}}}])
    rows = tiny_examples.filter(tiny_examples["split"] != "test")
    encoded = encode(rows, tokenizer, student_texts(rows, None))
    student = build_student(spec, spec.students[0], teacher, tokenizer, None, V.dataset_ids(encoded))
    vm = student.vocab_map
    assert student.config.vocab_size == vm.size == len(vm.tokenizer) < 2000
    assert student.config.eos_token_id == vm.tokenizer.eos_token_id == vm.to_student[tokenizer.eos_token_id]
    assert student.generation_config.eos_token_id == vm.tokenizer.eos_token_id
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        want = response_logits(teacher, batch)[:, vm.kept]
        got = response_logits(student, vm.remap(batch))
    assert torch.allclose(got, want, atol=1e-5)
    report = student.pruning_report
    assert report["vocab"]["kept"] == vm.size and report["params"] == sum(p.numel() for p in student.parameters())
    assert f"vocab 49152 -> {vm.size} (" in report["summary"]


def test_a_pruned_and_trimmed_student_saves_and_loads_plainly(tiny_llm_dir, tiny_examples, tmp_path):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = _spec(tiny_llm_dir, [{"name": "t", "from_teacher": {"keep_layers": 2, "hidden_size": 24, "intermediate_size": 32,
                                                              "vocab": {"keep_frequent": 50}, "calibration": 4}}])
    rows = tiny_examples.filter(tiny_examples["split"] == "train")
    encoded = encode(rows, tokenizer, student_texts(rows, None))
    calibration = [e.prompt_ids + e.token_ids for e in encoded]
    student = build_student(spec, spec.students[0], teacher, tokenizer, calibration)  # dataset ids: calibration's
    student.eval()
    student.save_pretrained(tmp_path)
    student.vocab_map.tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    k = student.vocab_map.size
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().num_embeddings == k
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 24
    ids = torch.tensor([chat_prompt_ids(tok, "Is the sky blue? 🎉")])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, student(ids).logits, atol=1e-5)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1] and int(out.max()) < k
    assert isinstance(tok.decode(out[0]), str)


def test_student_shape_counts_the_vocabulary_floor(tiny_llm_dir, tiny_examples, teacher_tokenizer):
    teacher, tokenizer = load_causal_lm(str(tiny_llm_dir))
    spec = _spec(tiny_llm_dir, [{"name": "t", "from_teacher": {"layers": [0, 1], "vocab": {"keep_frequent": 100}}}])
    floor, _ = student_shape(spec, spec.students[0])  # reads the teacher's config and tokenizer itself
    without, _ = student_shape(spec, spec.students[0], teacher.config)  # no tokenizer: keep_frequent alone
    rows = tiny_examples.filter(tiny_examples["split"] != "test")
    used = V.dataset_ids(encode(rows, tokenizer, student_texts(rows, None)))
    built = sum(p.numel() for p in build_student(spec, spec.students[0], teacher, tokenizer, None, used).parameters())
    hidden = teacher.config.hidden_size
    assert without < floor <= built  # a lower bound: the dataset's ids come on top
    plan = V.plan(teacher_tokenizer, V.backend_json(teacher_tokenizer), (), 100)
    assert floor - without == (plan.size - 100) * hidden


def test_an_untrimmable_tokenizer_is_a_one_line_spec_error_naming_the_field(tiny_llm_dir):
    teacher, _ = load_causal_lm(str(tiny_llm_dir))

    class NotFast:
        pad_token_id = 0

    spec = _spec(tiny_llm_dir, [{"name": "a", "from_teacher": {"layers": [0]}},
                                {"name": "b", "from_teacher": {"keep_layers": 2, "vocab": {"keep_frequent": 10}}}])
    for attempt in (lambda: build_student(spec, spec.students[1], teacher, NotFast(), [[1, 2, 3]]),
                    lambda: student_shape(spec, spec.students[1], teacher.config, NotFast())):
        with pytest.raises(SpecError) as e:
            attempt()
        assert len(str(e.value).splitlines()) == 1
        assert str(e.value).startswith("<spec>: students[1].from_teacher.vocab: student 'b': ")
        assert "not a fast (tokenizers) tokenizer" in str(e.value)


@pytest.mark.parametrize("vocab, message", [
    ({"keep_frequent": -1}, "greater than or equal to 0"),
    ({}, "keep_frequent"),
    ({"keep_frequent": 10, "top": 3}, "unknown key"),
])
def test_bad_vocab_specs_name_the_field(tiny_llm_dir, vocab, message):
    with pytest.raises(SpecError) as e:
        _spec(tiny_llm_dir, [{"name": "a", "from_teacher": {"vocab": vocab}}])
    assert "students[0].from_teacher.vocab" in str(e.value) and message in str(e.value)


# --- end to end ---------------------------------------------------------------------------------------


def test_training_a_trimmed_student_saves_its_own_tokenizer(tiny_llm_dir, tiny_examples, tmp_path, capsys):
    from engine.train import evaluate, train_students

    spec = _spec(tiny_llm_dir, [{"name": "trim", "from_teacher": {"keep_layers": 2, "vocab": {"keep_frequent": 200}}},
                                {"name": "full", "from_teacher": {"layers": [0, 1]}}],
                 max_steps=4, batch_size=5, keep="best")
    metrics = train_students(spec, tiny_examples, tmp_path, progress=True)
    vocab = metrics["trim"]["pruning"]["vocab"]
    k = vocab["kept"]
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("trim: "))
    assert f"vocab 49152 -> {k} ({vocab['used']} used by the dataset + {vocab['frequent']} frequent + " \
           f"{vocab['base']} specials/bytes/closure)" in line
    assert vocab["used"] + vocab["frequent"] + vocab["base"] == k and 200 < k < 2000
    trim = metrics["trim"]
    assert all(math.isfinite(x) for x in (trim["first_loss"], trim["last_loss"])) and trim["val_losses"]
    assert trim["params"] < metrics["full"]["params"] / 10  # the 49152-row embedding was most of it

    tok = AutoTokenizer.from_pretrained(tmp_path / "trim")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "trim")
    assert len(tok) == model.config.vocab_size == k
    assert len(AutoTokenizer.from_pretrained(tmp_path / "full")) == 49152
    # Every train/val prompt reads the same under the student's tokenizer as the trainer fed it.
    _, teacher_tok = load_causal_lm(str(tiny_llm_dir))
    assert json.loads((tmp_path / "trim" / "metrics.json").read_text())["pruning"]["vocab"]["kept"] == k
    in_teacher = {teacher_tok.convert_tokens_to_ids(t) for t in tok.get_vocab()}  # each one a teacher token
    assert len(in_teacher) == k and None not in in_teacher
    for text in tiny_examples.filter(tiny_examples["split"] != "test")["teacher_prompt"]:
        want = [teacher_tok.convert_ids_to_tokens(i) for i in chat_prompt_ids(teacher_tok, text)]
        assert [tok.convert_ids_to_tokens(i) for i in chat_prompt_ids(tok, text)] == want

    rows = evaluate(spec, tiny_examples, {"trim": tmp_path / "trim", "full": tmp_path / "full"}, progress=False)
    by_name = {r["name"]: r for r in rows}
    assert by_name["trim"]["token_kl"] is None and by_name["full"]["token_kl"] is not None
    assert by_name["trim"]["decode_tok_s"] > 0 and by_name["trim"]["params"] == trim["params"]
    assert by_name["trim"]["n"] == by_name["full"]["n"] > 0
