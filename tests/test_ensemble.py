"""Ensembles: several teachers in one spec, on tiny random models.

The teacher is the session's tiny model; members are its twin (the same weights in another folder),
a sibling (the same tokenizer, other weights) and a foreigner (a tokenizer with one more token).
"""

import json
import math
import shutil

import numpy as np
import polars as pl
import pytest
import yaml

import store
from engine.curate import pipeline
from engine.curate.plan import make_plan, member_lines
from engine.errors import SpecError, TemplateProblem
from engine.preflight import check_teacher
from engine.spec import load_spec, parse_spec
from engine.stages.ensemble import mix_topk, teacher_agreement
from engine.teachers.answers import normalise_answer

PROMPTS = ["Is the sky blue?", "Is fire cold?", "Do cats bark?", "Is water wet?",
           "Can fish fly?", "Is snow white?", "Do birds sing?", "Is ice hot?"]
TOP_K = 5


# --- the mixture and the agreement, by hand -----------------------------------------------


def lp(*probs):
    return np.log(np.array(probs, dtype=np.float64))


def test_mixture_is_the_weighted_average_over_the_union_of_top_k():
    # Position 0: teacher {5: .6, 7: .3}, member (weight 3) {7: .5, 9: .4}; the chosen token is 5,
    # which the member gives .05. Position 1: the member gave nothing (weight 0 there).
    teacher = (np.array([[5, 7], [5, 7]]), np.stack([lp(.6, .3), lp(.6, .3)]), lp(.6, .6))
    member = (np.array([[7, 9], [0, 0]]), np.stack([lp(.5, .4), [-np.inf, -np.inf]]), lp(.05, 1.0))
    ids, lps, chosen = mix_topk([teacher, member], [np.array([1.0, 1.0]), np.array([3.0, 0.0])], k=2)
    # id 5: .6/4 = .15; id 7: (.3 + 3 * .5)/4 = .45; id 9: 3 * .4/4 = .3 -> top-2 is 7 then 9
    assert ids.tolist() == [[7, 9], [5, 7]]
    assert ids.dtype == np.int32 and lps.dtype == np.float16 and chosen.dtype == np.float32
    np.testing.assert_allclose(np.exp(lps.astype(np.float64)), [[.45, .3], [.6, .3]], rtol=2e-3)
    np.testing.assert_allclose(np.exp(chosen), [(.6 + 3 * .05) / 4, .6], rtol=1e-6)  # .1875: exact, not top-k


def test_mixture_pads_a_position_with_fewer_ids_than_k():
    one = (np.array([[4, 2]]), lp(.7, .2)[None], lp(.7))
    other = (np.array([[2, 4]]), lp(.5, .5)[None], lp(.5))
    ids, lps, _ = mix_topk([one, other], [np.ones(1), np.ones(1)], k=3)
    assert ids.tolist() == [[4, 2, 4]]  # the third slot repeats the top id with log-prob -inf
    np.testing.assert_allclose(np.exp(lps[0, :2].astype(np.float64)), [.6, .35], rtol=2e-3)
    assert lps[0, 2] == -np.inf


def test_agreement_is_the_share_of_teachers_giving_the_teachers_answer():
    labels = {"positive", "negative"}
    assert teacher_agreement(["Positive.", "positive", "The sentiment is negative", None], labels) == 0.5
    assert teacher_agreement(["Paris", "paris!", "Lyon"]) == pytest.approx(2 / 3)
    assert teacher_agreement([None, None]) == 0.0  # a missing answer agrees with nothing, even another
    assert teacher_agreement(["yes"]) == 1.0


# --- spec --------------------------------------------------------------------------------


def spec_of(**extra):
    teacher = {"model": "a", "prompt": "Q: {{ prompt }}", "system": {"inline": "Be brief."}}
    return parse_spec({"name": "x", "teacher": teacher, "sources": [{"inline": ["q"]}], **extra})


@pytest.mark.parametrize("extra, message", [
    ({"mining": {"confidence": "teacher_agreement"}},
     ("<spec>: mining.confidence: teacher_agreement is the share of several teachers giving the teacher's answer: "
      "it needs ensemble.members")),
    ({"mining": {"confidence": "teacher_agreement"}, "ensemble": {"members": [{"model": "b"}]},
      "teach": {"order": "selection"}, "coverage": {"categories": {"c": {}}}},
     ("<spec>: mining.confidence: teacher_agreement is known only once every ensemble member has answered, but "
      "teach.order: selection decides while the teacher answers: use teach.order: all, or another measure")),
    ({"ensemble": {"members": [{"model": "b", "weight": 0}]}},
     "<spec>: ensemble.members[0].weight: Input should be greater than 0"),
    ({"ensemble": {"weight": -1, "members": [{"model": "b"}]}},
     "<spec>: ensemble.weight: Input should be greater than 0"),
    ({"ensemble": {"members": []}},
     "<spec>: ensemble.members: List should have at least 1 item after validation, not 0"),
    ({"ensemble": {"members": [{"model": "b", "colour": "red"}]}}, "<spec>: ensemble.members[0].colour: unknown key"),
])
def test_spec_errors_name_the_field(extra, message):
    with pytest.raises(SpecError) as e:
        spec_of(**extra)
    assert str(e.value) == message


def test_a_member_reading_plain_text_takes_no_system_message():
    with pytest.raises(SpecError, match=r"ensemble\.members\[0\]\.system: the member reads plain text"):
        parse_spec({"name": "x", "teacher": {"model": "a", "chat": False}, "sources": [{"inline": ["q"]}],
                    "ensemble": {"members": [{"model": "b", "system": {"inline": "Be brief."}}]}})


def test_a_member_asks_what_the_teacher_asks_unless_it_says_otherwise():
    spec = spec_of(ensemble={"weight": 2, "members": [{"model": "b"}, {"model": "c", "chat": False},
                                                      {"model": "d", "prompt": "{{ prompt }}?", "system": None}]})
    same, plain, own = spec.ensemble.resolved(spec.teacher)
    assert (same.prompt, same.system, same.chat, same.weight) == ("Q: {{ prompt }}", "Be brief.", True, 1.0)
    assert (plain.prompt, plain.system, plain.chat) == ("Q: {{ prompt }}", None, False)  # no system in plain text
    assert (own.prompt, own.system) == ("{{ prompt }}?", None)
    assert spec.ensemble.weight == 2


# --- models ------------------------------------------------------------------------------


def tiny_model(path, tokenizer, seed: int):
    """A tiny random Llama over `tokenizer`, as conftest's tiny_llm_dir builds it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_llm_dir):
    """{twin, sibling, foreign}: folders of the members' models."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("members")
    twin = shutil.copytree(tiny_llm_dir, root / "twin")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm_dir)
    sibling = tiny_model(root / "sibling", tokenizer, seed=1)
    tokenizer.add_tokens(["<|extra|>"])  # one more token: another vocabulary
    foreign = tiny_model(root / "foreign", tokenizer, seed=2)
    return {"twin": str(twin), "sibling": str(sibling), "foreign": str(foreign)}


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_llm_dir):
    monkeypatch.chdir(tmp_path)
    rows = [{"q": p, "a": "yes" if i % 2 else "no"} for i, p in enumerate(PROMPTS)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def write_spec(project, tiny_llm_dir, ensemble=None, **extra):
    spec = {"name": "ens",
            "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6},
                        "logprobs": {"top_k": TOP_K}, "batch_size": 4},
            "sources": [{"path": "p.jsonl", "text": "q", "label": "a"}],
            "splits": {"train": 0.5, "val": 0.25, "test": 0.25}, **extra}
    if ensemble:
        spec["ensemble"] = ensemble
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    return load_spec(project / "spec.yaml")


def tokens(frame: pl.DataFrame) -> list:
    return frame.sort("prompt_id").select("token_ids", "token_logprobs", "topk_ids", "topk_logprobs").rows()


def test_a_twin_member_leaves_the_targets_as_the_teachers_own(project, tiny_llm_dir, members):
    """A member with the teacher's weights scores its response as the teacher generated it: the mixture
    is the teacher's own top-k (float16 tolerance), and it gives the same answers."""
    st = store.open(project / "store")
    alone = pipeline.run(write_spec(project, tiny_llm_dir), st, progress=False)
    spec = write_spec(project, tiny_llm_dir, {"weight": 1.0, "members": [{"model": members["twin"], "weight": 3}]})
    twinned = pipeline.run(spec, st, progress=False)
    assert twinned.teacher_calls == 2 * len(PROMPTS)  # the twin's answers and scorings; the teacher's are cached
    before, after = (st.read(f"ens@{v}", "examples") for v in (alone.version, twinned.version))
    for (ids, token_lp, top_ids, top_lp), (ids2, token_lp2, top_ids2, top_lp2) in zip(tokens(before), tokens(after)):
        assert ids == ids2
        np.testing.assert_allclose(token_lp2, token_lp, atol=1e-4)
        for pos in range(len(ids)):
            assert set(top_ids2[pos]) == set(top_ids[pos])
            np.testing.assert_allclose(sorted(top_lp2[pos]), sorted(top_lp[pos]), atol=2e-2)
    agree = after["conf_teacher_agreement"].to_list()
    assert agree == [1.0] * len(PROMPTS)
    assert twinned.stage_stats["ensemble"]["logit_members"] == 1


def test_an_ensemble_run_stores_answers_and_agreement_and_pays_once(project, tiny_llm_dir, members):
    ensemble = {"weight": 1.0, "members": [{"model": members["twin"]}, {"model": members["sibling"], "weight": 2},
                                           {"model": members["foreign"]}]}
    spec = write_spec(project, tiny_llm_dir, ensemble, mining={"confidence": "teacher_agreement", "band": [0.0, 1.0]})
    st = store.open(project / "store")
    plan = make_plan(spec, st)
    assert [(m["answers"], m.get("scorings", "-")) for m in plan.members] == [(8, None), (8, None), (8, "-")]
    assert member_lines(plan)[2].startswith(f"ensemble.members[2] (model {members['foreign']}): 8 answers to pay")

    first = pipeline.run(spec, st, progress=False)
    stats = first.stage_stats["ensemble"]
    assert (stats["logit_members"], stats["answer_members"]) == (2, 1)
    assert [(m["answer_calls"], m["scoring_calls"]) for m in stats["members"]] == [(8, 8), (8, 8), (8, 0)]
    assert first.teacher_calls == 8 + 8 * 2 + 8 * 2 + 8  # the teacher, then each member's answers and scorings

    examples = st.read(f"ens@{first.version}", "examples")
    assert examples.height == len(PROMPTS)  # mining's band keeps every row
    labels = {"yes", "no"}
    for answers, answer, agreement in examples.select("ensemble_answers", "answer", "conf_teacher_agreement").rows():
        assert len(answers) == 4 and answers[0] == answer
        assert answers[1] == answer  # the twin answers as the teacher does (greedy, same weights)
        same = sum(a is not None and normalise_answer(a, labels) == normalise_answer(answer, labels) for a in answers)
        assert agreement == same / 4 and agreement >= 0.5

    again = pipeline.run(spec, st, progress=False)  # every stage cached
    assert (again.created, again.teacher_calls) == (False, 0)
    shutil.rmtree(project / "store" / "cache" / "stages")  # the stages run again: every request is cached
    fresh = pipeline.run(spec, st, progress=False)
    assert (fresh.created, fresh.teacher_calls) == (False, 0)
    assert [(m["answer_calls"], m["scoring_calls"]) for m in fresh.stage_stats["ensemble"]["members"]] == [(0, 0)] * 3
    cached = make_plan(spec, st)
    assert [(m["answers"], m.get("scorings", 0)) for m in cached.members] == [(0, 0)] * 3
    assert member_lines(cached)[0] == f"ensemble.members[0] (model {members['twin']}): 0 calls to pay (the ensemble " \
                                      "stage is cached)"


def test_the_mixture_weighs_the_sibling_as_the_spec_says(project, tiny_llm_dir, members):
    """The stored top-k of a teacher + sibling ensemble against the sibling's own scoring, mixed by hand."""
    import torch

    from engine.models import load_causal_lm
    from engine.prompts import prompt_ids

    st = store.open(project / "store")
    alone = st.read(f"ens@{pipeline.run(write_spec(project, tiny_llm_dir), st, progress=False).version}", "examples")
    spec = write_spec(project, tiny_llm_dir, {"weight": 1.0, "members": [{"model": members["sibling"], "weight": 3}]})
    mixed = st.read(f"ens@{pipeline.run(spec, st, progress=False).version}", "examples").sort("prompt_id")
    model, tokenizer = load_causal_lm(members["sibling"])
    row = alone.sort("prompt_id").row(0, named=True)
    ids = prompt_ids(tokenizer, row["teacher_prompt"]) + row["token_ids"]
    with torch.inference_mode():
        sibling = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(ids) - len(row["token_ids"]) - 1
    got = mixed.row(0, named=True)
    for pos, chosen in enumerate(row["token_ids"]):
        p_sib = sibling[start + pos].exp().double().numpy()
        top_sib = set(np.argsort(-p_sib)[:TOP_K].tolist())
        teacher = dict(zip(row["topk_ids"][pos], np.exp(np.array(row["topk_logprobs"][pos], np.float64))))
        union = set(teacher) | top_sib
        expect = {i: (teacher.get(i, 0.0) + 3 * (p_sib[i] if i in top_sib else 0.0)) / 4 for i in union}
        best = sorted(expect.items(), key=lambda item: -item[1])[:TOP_K]
        stored = dict(zip(got["topk_ids"][pos], np.exp(np.array(got["topk_logprobs"][pos], np.float64))))
        assert set(stored) == {i for i, _ in best}
        for i, p in best:
            assert stored[i] == pytest.approx(p, rel=2e-2)  # float16 log-probs, stored and mixed
        exact = (math.exp(row["token_logprobs"][pos]) + 3 * p_sib[chosen]) / 4
        assert math.exp(got["token_logprobs"][pos]) == pytest.approx(exact, rel=1e-4)


# --- validate ------------------------------------------------------------------------------


def test_validate_says_what_each_member_gives(project, tiny_llm_dir, members, cli):
    ensemble = {"members": [{"model": members["sibling"], "weight": 2}, {"model": members["foreign"]},
                            {"model": "served", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                             "tokenizer": str(tiny_llm_dir)}]}
    write_spec(project, tiny_llm_dir, ensemble)
    code, out, err = cli("validate", "spec.yaml")
    assert code == 0, err
    lines = out.splitlines()
    assert (f"spec.yaml: ensemble.members[0] (model {members['sibling']}): the teacher's tokenizer — its top-k join "
            "the logit targets (weight 2)") in lines
    assert (f"spec.yaml: ensemble.members[1] (model {members['foreign']}): another tokenizer than the teacher's — "
            "its answers count towards teacher_agreement, not the logit targets") in lines
    assert ("spec.yaml: ensemble.members[2] (model served): backend openai (a server scores no response it did not "
            "write) — its answers count towards teacher_agreement, not the logit targets") in lines


def test_a_members_bad_template_fails_validate_naming_the_member(project, tiny_llm_dir, members):
    spec = write_spec(project, tiny_llm_dir, {"members": [{"model": members["twin"], "prompt": "{{ answer }}!"}]})
    with pytest.raises(TemplateProblem, match=r"ensemble\.members\[0\]\.prompt"):
        check_teacher(spec)


def test_ordered_teaching_is_refused_when_a_member_moves_the_measure(project, tiny_llm_dir, members):
    """teach.order: selection counts in-band answers as the teacher gives them; the sibling's top-k would
    change mean_token_prob afterwards. A member giving answers only changes no token measure."""
    ordered = {"coverage": {"categories": {"c": {}}}, "teach": {"order": "selection"}}
    spec = write_spec(project, tiny_llm_dir, {"members": [{"model": members["sibling"]}]}, **ordered)
    with pytest.raises(SpecError) as e:
        check_teacher(spec)
    assert str(e.value) == (
        f"{project / 'spec.yaml'}: teach.order: selection counts the teacher's in-band answers as it gives them, "
        f"but ensemble.members[0] (model {members['sibling']}) has the teacher's tokenizer: its top-k join the "
        "targets afterwards and move mining.confidence mean_token_prob: use teach.order: all")
    check_teacher(write_spec(project, tiny_llm_dir, {"members": [{"model": members["foreign"]}]}, **ordered))
