"""Option scoring (`options:` on a source or category), its mining measures and `kd_target: options`."""

import math

import numpy as np
import polars as pl
import pytest
import torch
import yaml

import store
from engine.curate import pipeline
from engine.errors import SpecError
from engine.models import load_causal_lm
from engine.prompts import Conversation, prompt_ids
from engine.spec import Loss, load_spec, parse_spec
from engine.stages.options import option_measures, row_options
from engine.teachers.openai_backend import _echoed_logprob
from engine.teachers.options import (
    FIRST_TOKEN,
    PROMPT_LOGPROBS,
    continuation,
    first_token_scores,
    option_probs,
    teacher_forced_scores,
)
from engine.train.data import Encoded, collate, response_logits
from engine.train.losses import distillation_loss
from engine.train.options import OptionTarget, option_kd, with_option_kd

# --- scoring ----------------------------------------------------------------------------------


def hand_scores(model, ids: list[int], options: list[list[int]]) -> np.ndarray:
    """Mean log-prob per option token after `ids`, one unpadded forward pass per option."""
    means = []
    for option in options:
        with torch.no_grad():
            logp = model(torch.tensor([ids + option])).logits[0].float().log_softmax(-1)
        means.append(np.mean([float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(option)]))
    return np.array(means)


def test_option_scores_on_a_tiny_model_match_a_hand_computation(tiny_llm_dir):
    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    chat = Conversation("Is the sky blue?")
    plain = Conversation("Review: great fun. Sentiment:", chat=False)
    rows = [(chat, ["yes", "no", "not at all"]), (plain, ["positive", "negative"])]
    prompts = [prompt_ids(tokenizer, c) for c, _ in rows]
    # A chat answer starts the assistant's turn: the option as written; a plain prompt reads " positive".
    options = [[tokenizer(continuation(c, o), add_special_tokens=False)["input_ids"] for o in opts] for c, opts in rows]
    assert options[1][0] == tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert options[0][2] == tokenizer("not at all", add_special_tokens=False)["input_ids"] and len(options[0][2]) > 1
    # The plain row's options are one token each: one pass over its prompt scores both.
    assert all(len(o) == 1 for o in options[1])
    # batch_size 2: options of different rows and lengths share padded batches.
    scores = teacher_forced_scores(model, tokenizer, prompts, options, batch_size=2)
    for got, ids, opts in zip(scores, prompts, options):
        expected = hand_scores(model, ids, opts)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        probs = np.exp(expected) / np.exp(expected).sum()
        np.testing.assert_allclose(option_probs(got), probs, atol=1e-5)
        assert option_probs(got).sum() == pytest.approx(1.0)


def test_measures_on_a_hand_made_distribution():
    probs = np.array([0.5, 0.3, 0.2])
    options = ["positive", "negative", "neutral"]
    m = option_measures(probs, options, "The sentiment is Negative.")
    assert m["conf_option_answer_prob"] == pytest.approx(0.3)
    assert m["conf_option_margin"] == pytest.approx(0.2)
    assert m["conf_option_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)))
    assert option_measures(probs, options, "I cannot tell.")["conf_option_answer_prob"] is None
    assert option_measures(probs, options, "positive or negative")["conf_option_answer_prob"] is None  # names two
    assert option_measures(np.array([1.0, 0.0]), ["yes", "no"], "yes")["conf_option_entropy"] == 0.0


def test_first_token_scores_floor_options_outside_the_top_k(tiny_llm_dir):
    _, tokenizer = load_causal_lm(str(tiny_llm_dir))
    chat = Conversation("Is it?")
    [yes], [no] = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no"))
    maybe = tokenizer("maybe", add_special_tokens=False)["input_ids"][0]
    # The stored top-k of the first answer token: yes, no, then an absent (-inf) slot.
    scores, floored = first_token_scores(tokenizer, chat, ["yes", "no", "maybe"], [yes, no, yes], [-0.1, -2.5, -np.inf])
    assert maybe not in (yes, no)
    np.testing.assert_allclose(scores, [-0.1, -2.5, -2.5])  # "maybe" is not in the top-k: the lowest log-prob
    assert floored == 1
    assert first_token_scores(tokenizer, chat, ["yes", "no"], [yes], [-np.inf]) is None


def test_echoed_log_probs_are_read_from_the_end_of_the_prompt():
    def answer(tokens, values, completion_tokens):
        return {"choices": [{"logprobs": {"tokens": tokens, "token_logprobs": values}}],
                "usage": {"completion_tokens": completion_tokens}}

    tokens, values = ["Sent", "iment", ":", " pos", "itive"], [None, -1.0, -0.5, -2.0, -0.25]
    assert _echoed_logprob(answer(tokens, values, 0), " positive") == (-2.25, 2)
    # The answer's own token listed after the echo (vLLM) or not (llama-cpp-python): both read.
    assert _echoed_logprob(answer(tokens + ["."], values + [-0.1], 1), " positive") == (-2.25, 2)
    assert _echoed_logprob(answer(tokens, values, 1), " positive") == (-2.25, 2)
    assert _echoed_logprob(answer(tokens, values, 0), "positive") is None  # the tokens spell " positive"
    assert _echoed_logprob({"choices": [{"text": "x", "logprobs": None}]}, " positive") is None


# --- the spec ---------------------------------------------------------------------------------


def spec_with(**extra):
    data = {"name": "t", "teacher": {"model": "m"}, "sources": [{"inline": ["a", "b"]}]}
    data.update(extra)
    return parse_spec(data)


@pytest.mark.parametrize(("extra", "message"), [
    ({"sources": [{"inline": ["a"], "options": ["yes"]}]},
     "<spec>: sources[0].options: give at least 2 options (got 1): the teacher's distribution is over them"),
    ({"sources": [{"inline": ["a"], "options": ["Yes", "yes."]}]},
     ("<spec>: sources[0].options: options 'Yes' and 'yes.' are the same answer (answers are compared lower-cased, "
      "without punctuation)")),
    ({"sources": [{"inline": ["a"], "options": ["yes", "?"]}]},
     ("<spec>: sources[0].options: option '?' has no letter or digit: answers are compared without punctuation, so it "
      "would match no answer")),
    ({"coverage": {"categories": {"x": {"options": ["yes", ""]}}}},
     ("<spec>: coverage.categories.x.options: option '' has no letter or digit: answers are compared without "
      "punctuation, so it would match no answer")),
    ({"mining": {"confidence": "option_margin"}},
     ("<spec>: mining.confidence: option_margin is a measure over the teacher's distribution on a fixed answer set: it "
      "needs options on a source or a coverage category")),
    ({"training": {"loss": {"kd_target": "options"}}},
     ("<spec>: training.loss.kd_target: options distils the teacher's distribution on a fixed answer set: it needs "
      "options on a source or a coverage category")),
    ({"sources": [{"inline": ["a"], "options": ["yes", "no"]}], "mining": {"confidence": "option_entropy"},
      "teach": {"order": "selection"}, "coverage": {"categories": {"x": {}}}},
     ("<spec>: mining.confidence: option_entropy is scored after the teacher has answered, but teach.order: selection "
      "decides while it answers: use teach.order: all, or another measure")),
    ({"sources": [{"inline": ["a"], "options": ["yes", "no"]}, {"inline": ["b"]}]},
     ("<spec>: sources[1].options: sources[0] and sources[1] both name their rows 'inline' but their options differ: "
      "give them the same options, or set options on their coverage categories")),
])
def test_spec_errors_are_one_line_naming_the_field(extra, message):
    with pytest.raises(SpecError) as e:
        spec_with(**extra)
    assert str(e.value) == message


def test_a_category_overrides_its_rows_source_options():
    spec = spec_with(sources=[{"inline": ["a"], "options": ["yes", "no"]}, {"path": "x.jsonl"}],
                     coverage={"categories": {"colour": {"options": ["red", "blue"]}, "other": {}}},
                     mining={"confidence": "option_margin"}, training={"loss": {"kd_target": "options"}})
    frame = pl.DataFrame({"source": ["inline", "inline", "x.jsonl", "x.jsonl"],
                          "category": ["colour", "other", "other", "colour"]})
    assert row_options(frame, spec) == [["red", "blue"], ["yes", "no"], None, ["red", "blue"]]


# --- the pipeline -----------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, tiny_llm_dir):
    lines = [f'{{"text": "Is {i} an even number?", "kind": "{"parity" if i % 3 else "free"}"}}' for i in range(12)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "open.txt").write_text("\n".join(f"Tell me a fact about {n}." for n in range(6)) + "\n")
    spec = {
        "name": "opts",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6}, "logprobs": {"top_k": 4},
                    "batch_size": 4},
        "sources": [{"path": "prompts.jsonl", "text": "text", "category": "kind", "options": ["yes", "no"]},
                    {"path": "open.txt", "category": "parity"}],  # a source without options
        "coverage": {"categories": {"parity": {}, "free": {"options": ["even", "odd", "unsure"]}}},
        "mining": {"confidence": "option_margin", "band": [0.0, 1.0]},
        "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_a_run_stores_option_probs_and_measures_and_a_rerun_pays_nothing(project, tiny_llm_dir, monkeypatch):
    monkeypatch.chdir(project)
    first = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    stats = first.stage_stats["options"]
    assert stats["option_scoring"] == "teacher_forced" and stats["with_options"] == stats["scored"] == 12
    assert stats["rows"] == 18 and stats["cached"] == 0 and stats["scoring_calls"] == 8 * 2 + 4 * 3
    everything = store.open(project / "store").read("opts@1", "examples")
    # A row without options has no measure: mining counts it outside the band (the test split keeps all).
    without = everything.filter(pl.col("source") == "open.txt")
    assert without["split"].to_list() == ["test"] * without.height
    assert without["options"].null_count() == without["conf_option_margin"].null_count() == without.height
    rejected = store.open(project / "store").read("opts@1", "rejections").filter(pl.col("stage") == "mine")
    assert rejected["reason"].to_list() == ["conf_option_margin missing"] * 4 and without.height == 2
    examples = everything.filter(pl.col("source") == "prompts.jsonl")
    assert examples.height == 12
    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    for row in examples.iter_rows(named=True):
        expected = ["yes", "no"] if row["category"] == "parity" else ["even", "odd", "unsure"]
        assert row["options"] == expected
        # The teacher's own prompt (one chat user turn), each option read right after it.
        ids = prompt_ids(tokenizer, Conversation(row["teacher_prompt"]))
        hand = hand_scores(model, ids, [tokenizer(o, add_special_tokens=False)["input_ids"] for o in expected])
        probs = np.exp(hand - hand.max()) / np.exp(hand - hand.max()).sum()
        np.testing.assert_allclose(row["option_probs"], probs, atol=1e-5)
        top = sorted(row["option_probs"], reverse=True)
        assert row["conf_option_margin"] == pytest.approx(top[0] - top[1])
        assert row["conf_option_entropy"] == pytest.approx(-sum(p * math.log(p) for p in row["option_probs"]))
        named = [o for o in expected if f" {o} " in f" {row['answer'].lower()} "]
        expected_prob = row["option_probs"][expected.index(named[0])] if len(named) == 1 else None
        assert row["conf_option_answer_prob"] == pytest.approx(expected_prob)
    # A new band re-runs mining only: the scores come from the stage cache, and even the stage re-run
    # (a changed teacher batch size keeps the fingerprint) pays no forward pass.
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["teacher"]["batch_size"] = 2
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    again = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    assert again.stage_stats["options"]["cached"] == 12 and again.stage_stats["options"]["scoring_calls"] == 0
    rerun = store.open(project / "store").read(f"opts@{again.version}", "examples")
    assert rerun.filter(pl.col("source") == "prompts.jsonl")["option_probs"].to_list() == \
        examples["option_probs"].to_list()


# --- kd_target: options -----------------------------------------------------------------------


def encoded_pair(tokenizer):
    """Two examples: the first with three options and their teacher distribution, the second without."""
    first = Conversation("Is the sky blue?")
    second = Conversation("Name a colour.")
    with_options = Encoded(prompt_ids(tokenizer, first), [100, 200, 300], [[100, 5], [200, 6], [300, 7]],
                           [[-0.1, -2.5], [-0.2, -2.0], [-0.3, -1.5]])
    with_options.options = OptionTarget([tokenizer(o, add_special_tokens=False)["input_ids"]
                                         for o in ("yes", "no", "not at all")], [0.7, 0.2, 0.1])
    without = Encoded(prompt_ids(tokenizer, second), [400, 500], [[400, 8], [500, 9]], [[-0.5, -1.0], [-0.4, -1.2]])
    return [with_options, without]


def test_the_options_kd_loss_equals_a_hand_computation_and_its_gradient_flows(tiny_llm_dir):
    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    model.train()
    examples = encoded_pair(tokenizer)
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["token_kd"].tolist() == [False] * 3 + [True] * 2
    temperature = 2.0
    loss_spec = Loss(kd_target="options", kd_weight=0.7, hard_weight=0.3, temperature=temperature)
    # By hand: the student's mean log-prob of each option after its prompt, softmax, both sides tempered.
    first = examples[0]
    with torch.no_grad():
        student = torch.tensor(hand_scores(model, first.prompt_ids, first.options.ids)).log_softmax(-1)
    q = torch.tensor([0.7, 0.2, 0.1]).log().div(temperature).log_softmax(-1)
    r = student.div(temperature).log_softmax(-1)
    kl = float((q.exp() * (q - r)).sum())
    expected = temperature**2 * kl * 3 / 5  # the example's 3 response tokens of the batch's 5
    term = option_kd(model, batch, loss_spec, temperature)
    assert term.item() == pytest.approx(expected, rel=1e-4)
    # Token KD covers the other example's tokens only, still averaged over all 5.
    logits = response_logits(model, batch)
    parts = distillation_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["targets"], kd_weight=0.7,
                              hard_weight=0.3, temperature=temperature, kd_mask=batch["token_kd"])
    alone = distillation_loss(logits[3:], batch["topk_ids"][3:], batch["topk_logprobs"][3:], batch["targets"][3:],
                              kd_weight=0.7, hard_weight=0.3, temperature=temperature)
    assert float(parts.kd) == pytest.approx(float(alone.kd) * 2 / 5, rel=1e-5)
    total = with_option_kd(parts, model, batch, loss_spec, temperature)
    assert float(total.kd) == pytest.approx(float(parts.kd) + expected, rel=1e-4)
    assert total.loss.item() == pytest.approx(parts.loss.item() + 0.7 * expected, rel=1e-4)
    model.zero_grad()
    term.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # A batch without option examples is the token loss as it was.
    plain = collate(examples[1:], tokenizer.pad_token_id)
    assert "token_kd" not in plain and with_option_kd(alone, model, plain, loss_spec, temperature) is alone


def options_train_spec(teacher_dir, students, **training):
    teacher = {"model": str(teacher_dir), "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 8}, "batch_size": 4}
    return parse_spec({"name": "tiny", "teacher": teacher,
                       "sources": [{"path": "unused.jsonl", "options": ["quixotic", "zygomorphic"]}],
                       "students": students, "training": {"loss": {"kd_target": "options"}, **training}})


def test_training_with_kd_target_options_keeps_option_tokens_in_a_trimmed_vocabulary(tiny_llm_dir, tiny_examples,
                                                                                   tmp_path):
    from transformers import AutoTokenizer

    from engine.train import train_students

    # Every other row has the teacher's option distribution; the rest keep token KD.
    probs = [[0.8, 0.2] if i % 2 == 0 else None for i in range(tiny_examples.height)]
    examples = tiny_examples.with_columns(
        options=pl.Series([["quixotic", "zygomorphic"] if p else None for p in probs], dtype=pl.List(pl.String)),
        option_probs=pl.Series(probs, dtype=pl.List(pl.Float64)))
    students = [{"name": "trim", "from_teacher": {"layers": [0, 1], "vocab": {"keep_frequent": 20}}}]
    metrics = train_students(options_train_spec(tiny_llm_dir, students, max_steps=2, batch_size=4), examples, tmp_path,
                             progress=False)["trim"]
    assert metrics["loss"]["kd_target"] == "options" and all(math.isfinite(x) for x in metrics["loss_components"]["kd"][0])
    # The student's own tokenizer reads each option as the teacher's tokens: none fell back to bytes.
    teacher_tok = load_causal_lm(str(tiny_llm_dir))[1]
    own = AutoTokenizer.from_pretrained(tmp_path / "trim")
    for option in ("quixotic", "zygomorphic"):
        want = teacher_tok.convert_ids_to_tokens(teacher_tok(option, add_special_tokens=False)["input_ids"])
        assert own.convert_ids_to_tokens(own(option, add_special_tokens=False)["input_ids"]) == want
        assert len(want) > 1  # several merges deep: kept only because the options need them


def test_kd_target_options_needs_a_dataset_with_option_probs(tiny_llm_dir, tiny_examples, tmp_path):
    from engine.train import train_students

    spec = options_train_spec(tiny_llm_dir, [{"name": "s", "from_teacher": {"layers": [0]}}], max_steps=1)
    with pytest.raises(SpecError, match="training.loss.kd_target: options, but the dataset has no option_probs"):
        train_students(spec, tiny_examples, tmp_path, progress=False)
    unscored = tiny_examples.with_columns(options=pl.lit(None, pl.List(pl.String)),
                                          option_probs=pl.lit(None, pl.List(pl.Float64)))
    with pytest.raises(SpecError, match="but no train example has option_probs"):
        train_students(spec, unscored, tmp_path, progress=False)


# --- the openai backend, against a real server --------------------------------------------------

REVIEWS = ["Review: I loved every minute of it. Is this review positive or negative?"]


def served_options(url: str, chat: bool, prompts: list[str], tmp_path, top_k: int = 5):
    """A spec over llama_server's teacher (chat or plain text) whose inline source has two options."""
    from engine.stages.base import RunContext, prompt_id

    spec = parse_spec({
        "name": "t", "sources": [{"inline": prompts, "options": ["positive", "negative"]}],
        "teacher": {"backend": "openai", "model": "smollm2-135m-instruct", "base_url": url,
                    "tokenizer": "smollm2-135m-instruct", "chat": chat, "generation": {"max_new_tokens": 3},
                    "logprobs": {"top_k": top_k}, "max_concurrency": 1, "extra_body": {"repeat_penalty": 1.0}}})
    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts,
                          "source": ["inline"] * len(prompts), "category": [None] * len(prompts)},
                         schema_overrides={"category": pl.String})
    return spec, frame, lambda: RunContext(spec=spec, cache_dir=tmp_path, progress=False)


def test_a_server_scores_options_through_prompt_logprobs_where_they_check_out(llama_server, tmp_path):
    """llama-cpp-python echoes right log-probs for a chat prompt (it starts with the BOS token): the options are
    scored teacher-forced by the server, as the transformers backend scores them on the same weights."""
    from engine.stages.options import Options
    from engine.stages.teach import Teach

    _, frame, context = served_options(llama_server, True, REVIEWS, tmp_path)
    ctx = context()
    taught, _, _ = Teach().run(frame, ctx)
    scored, _, stats = Options().run(taught, ctx)
    assert stats["option_scoring"] == PROMPT_LOGPROBS and stats["scoring_calls"] == 2
    assert stats["first_token_rows"] == 0
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    ids = prompt_ids(tokenizer, Conversation(REVIEWS[0]))
    hand = hand_scores(model, ids, [tokenizer(o, add_special_tokens=False)["input_ids"] for o in ("positive", "negative")])
    # Q4_1 weights served, de-quantised here: measured 0.004 apart.
    np.testing.assert_allclose(scored["option_probs"][0].to_list(), option_probs(hand), atol=0.05)
    # A re-run reads the verdict and the scores from the request cache: no request at all.
    again, _, stats = Options().run(taught, context())
    assert stats["cached"] == 1 and stats["scoring_calls"] == 0 and stats["option_scoring"] == PROMPT_LOGPROBS
    assert again["option_probs"].to_list() == scored["option_probs"].to_list()


def test_a_server_whose_echo_is_shifted_scores_options_by_first_tokens(llama_server, tmp_path):
    """A plain prompt does not start with the BOS token, and llama-cpp-python then shifts echoed log-probs by one:
    the probe catches it, and the options are scored from the first answer token's stored top-k."""
    from engine.stages.options import Options
    from engine.stages.teach import Teach

    prompts = ["Review: I loved every minute of it.\nSentiment (positive or negative):"]
    _, frame, context = served_options(llama_server, False, prompts, tmp_path, top_k=20)
    ctx = context()
    taught, _, _ = Teach().run(frame, ctx)
    scored, _, stats = Options().run(taught, ctx)
    assert stats["option_scoring"] == FIRST_TOKEN and stats["scoring_calls"] == 0
    top = zip(taught["topk_ids"][0][0].to_list(), taught["topk_logprobs"][0][0].cast(pl.Float32).to_list())
    table = {i: lp for i, lp in top if math.isfinite(lp)}  # absent slots (-inf) are no alternative
    tokenizer = load_causal_lm("smollm2-135m-instruct")[1]
    firsts = [tokenizer(f" {o}", add_special_tokens=False)["input_ids"][0] for o in ("positive", "negative")]
    expected = [table.get(f, min(table.values())) for f in firsts]
    np.testing.assert_allclose(scored["option_probs"][0].to_list(), option_probs(np.array(expected)), atol=1e-6)
    assert stats["floored_options"] == sum(f not in table for f in firsts) < 2  # measured: both in the top 20


class EchoServer:
    """Stands in for an OpenAITeacher: its tokenizer, and echoed log-probs from `echo(prompt text, continuation)`."""

    def __init__(self, tokenizer, echo):
        self.tokenizer, self.echo, self.asked = tokenizer, echo, []

    def prompt_logprobs(self, pairs):
        self.asked += [c for _, c in pairs]
        return [self.echo(text, c) for text, c in pairs]


def echo_case(tiny_llm_dir, tmp_path, echo):
    from engine.stages.base import RunContext
    from engine.teachers.options import score_options

    tokenizer = load_causal_lm(str(tiny_llm_dir))[1]
    spec = parse_spec({"name": "t", "sources": [{"inline": ["a"], "options": ["yes", "no"]}],
                       "teacher": {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                                   "tokenizer": str(tiny_llm_dir)}})
    server = EchoServer(tokenizer, echo)
    [yes], [no] = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("yes", "no"))
    rows = [Conversation("Is it?"), Conversation("Is it not?")]
    first = [([yes, no], [-0.5, -1.5]), ([yes, no], [-0.25, -2.0])]  # the teacher answered "yes" first

    def score():
        return score_options(RunContext(spec=spec, cache_dir=tmp_path, progress=False, teacher=server), rows,
                             [["yes", "no"]] * 2, first)
    return server, score


def test_echoed_log_probs_that_match_the_teachers_answers_score_the_options(tiny_llm_dir, tmp_path):
    def echo(text, option):
        if "not" not in text:
            return {"yes": (-0.5, 1), "no": (-4.0, 2)}[option]  # "yes" as the teacher gave it: the probe passes
        return (-0.25, 1) if option == "yes" else None  # the server's tokens do not spell "no" here

    server, score = echo_case(tiny_llm_dir, tmp_path, echo)
    scored = score()
    assert scored.method == PROMPT_LOGPROBS and server.asked == ["yes", "yes"] + ["yes", "no"] * 2
    np.testing.assert_allclose(scored.scores[0], [-0.5, -2.0])  # -4.0 over 2 tokens: the mean per token
    np.testing.assert_allclose(scored.scores[1], [-0.25, -2.0])  # from its first answer token instead
    assert scored.fallback == 1 and scored.cached == 0
    server.asked.clear()
    again = score()  # the verdict and both rows come from the request cache
    assert server.asked == [] and again.cached == 2 and again.fallback == 1
    np.testing.assert_allclose(again.scores[0], [-0.5, -2.0])


def test_echoed_log_probs_that_disagree_with_the_teachers_answers_are_not_used(tiny_llm_dir, tmp_path):
    server, score = echo_case(tiny_llm_dir, tmp_path, lambda text, option: (-7.0, 1))  # shifted by a token
    scored = score()
    assert scored.method == FIRST_TOKEN and server.asked == ["yes", "yes"]  # the probe only
    np.testing.assert_allclose(scored.scores[0], [-0.5, -1.5])
    np.testing.assert_allclose(scored.scores[1], [-0.25, -2.0])
    server.asked.clear()
    assert score().method == FIRST_TOKEN and server.asked == []  # the verdict is cached


def test_option_scoring_counts_as_teacher_time(project, monkeypatch):
    # A run's share outside the teacher (bench/peer.py) must not count the teacher's option passes as overhead.
    from engine.stages.base import RunContext
    from engine.teachers.options import score_options

    spec = load_spec(project / "spec.yaml")
    ctx = RunContext(spec=spec, cache_dir=project / "cache", progress=False)
    scored = score_options(ctx, [Conversation("Is 3 odd?"), Conversation("Is 4 odd?")], [["yes", "no"]] * 2,
                           [None, None])
    assert scored.calls == 4 and ctx.counters["teacher_seconds"] > 0 and ctx.counters["teacher_load_seconds"] > 0
