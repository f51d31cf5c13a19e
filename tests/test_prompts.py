"""Prompts as users write them: chat or plain text, a system message, few-shot turns, on both sides;
the same ids for teaching, training, eval and export; the teacher's accuracy against gold at run time."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

import store
from engine.cli import app
from engine.curate import pipeline
from engine.errors import TemplateProblem
from engine.models import chat_prompt_ids, load_causal_lm, load_tokenizer
from engine.prompts import Conversation, prompt_ids, side_format, student_side
from engine.scoring import teacher_gold
from engine.spec import SpecError, Teacher, load_spec, parse_spec
from engine.stages.base import RunContext, prompt_id
from engine.stages.teach import Teach, teacher_contexts
from engine.teachers import load_teacher
from engine.teachers.request_cache import request_key
from engine.templates import check_spec_templates
from engine.train.data import encode, student_conversations

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
SYSTEM = "You sort headlines into topics."
FEW_SHOT = [{"role": "user", "content": {"inline": "Headline: Striker scores twice"}},
            {"role": "assistant", "content": {"inline": "sports"}}]


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    return load_tokenizer(str(tiny_llm_dir))


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- ids ------------------------------------------------------------------------------------


def test_ids_follow_the_chat_template_or_the_plain_text(tokenizer):
    prompt = "Headline: Stocks fall on rate fears"
    turn = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    # One user turn, as every prompt was before: the template's default system prompt comes first.
    assert prompt_ids(tokenizer, prompt) == chat_prompt_ids(tokenizer, prompt) == \
        text_ids(tokenizer, DEFAULT_SYSTEM + turn)
    # A system message replaces the default one.
    with_system = Conversation(prompt, turns=(("system", SYSTEM),))
    assert prompt_ids(tokenizer, with_system) == text_ids(tokenizer, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + turn)
    # Few-shot examples are real turns before the row's own.
    few_shot = Conversation(prompt, turns=(("system", SYSTEM), ("user", "Headline: Striker scores twice"),
                                           ("assistant", "sports")))
    assert prompt_ids(tokenizer, few_shot) == text_ids(
        tokenizer, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHeadline: Striker scores twice<|im_end|>\n"
                   f"<|im_start|>assistant\nsports<|im_end|>\n" + turn)
    no_system = Conversation(prompt, turns=(("user", "Headline: Striker scores twice"), ("assistant", "sports")))
    assert prompt_ids(tokenizer, no_system)[: len(text_ids(tokenizer, DEFAULT_SYSTEM))] == text_ids(tokenizer, DEFAULT_SYSTEM)
    # chat: false: the text as it is, no template, no special token added.
    plain = Conversation("Headline: Striker scores twice\nTopic: sports\n\nHeadline: Stocks fall\nTopic:", chat=False)
    assert prompt_ids(tokenizer, plain) == tokenizer(plain.prompt)["input_ids"] == text_ids(tokenizer, plain.prompt)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in prompt_ids(tokenizer, plain)


def test_the_request_key_holds_the_whole_conversation():
    params = {"generation": {"max_new_tokens": 8}, "top_k": 5}
    plain_turn = request_key("fp", params, "Is it?")
    assert request_key("fp", params, Conversation("Is it?")) == plain_turn  # answers cached before stay valid
    variants = [Conversation("Is it?", chat=False), Conversation("Is it?", turns=(("system", "A"),)),
                Conversation("Is it?", turns=(("system", "B"),)),
                Conversation("Is it?", turns=(("user", "Q"), ("assistant", "yes"))),
                Conversation("Is it?", turns=(("user", "Q"), ("assistant", "no")))]
    keys = {request_key("fp", params, c) for c in variants}
    assert len(keys) == len(variants) and plain_turn not in keys


# --- the spec -------------------------------------------------------------------------------


BASE = {"name": "t", "teacher": {"model": "smollm2-135m-instruct"}, "sources": [{"path": "data.jsonl", "text": "q"}]}


def load(tmp_path, teacher=None, training=None, files=None):
    (tmp_path / "data.jsonl").write_text('{"q": "hello"}\n')
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    data = json.loads(json.dumps(BASE))
    data["teacher"].update(teacher or {})
    if training:
        data["training"] = training
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    return load_spec(tmp_path / "spec.yaml")


def error(tmp_path, **kw) -> str:
    with pytest.raises(SpecError) as info:
        load(tmp_path, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_spec_errors_name_the_field(tmp_path):
    where = tmp_path / "spec.yaml"
    assert error(tmp_path, teacher={"chat": False, "system": {"inline": "Be brief."}}) == (
        f"{where}: teacher.system: only with chat: true; with chat: false the prompt is sent as plain text, with no "
        "chat template and no turns: write the instructions and examples into the prompt template")
    assert error(tmp_path, teacher={"chat": False, "messages": FEW_SHOT}).startswith(f"{where}: teacher.messages: only with")
    assert error(tmp_path, teacher={"messages": [{"role": "bot", "content": {"inline": "x"}}]}) == (
        f"{where}: teacher.messages[0].role: Input should be 'user', 'assistant' or 'system'")
    assert error(tmp_path, teacher={"messages": [FEW_SHOT[0], {"role": "assistant", "content": "sports"}]}).startswith(
        f"{where}: teacher.messages[1].content: 'sports' is neither: a template is a file")
    assert error(tmp_path, teacher={"messages": [{"role": "user"}]}) == f"{where}: teacher.messages[0].content: Field required"
    assert error(tmp_path, training={"student_chat": False, "student_system": {"inline": "S"}}).startswith(
        f"{where}: training.student_system: training.student_chat is false: only with chat: true")
    assert error(tmp_path, teacher={"chat": False}, training={"student_messages": FEW_SHOT}).startswith(
        f"{where}: training.student_messages: the student reads plain text (teacher.chat: false, "
        "training.student_chat unset): only with chat: true")


def test_a_template_error_in_a_turn_names_the_turn_and_line(tmp_path):
    spec = load(tmp_path, teacher={"system": {"inline": "{{ category }} topics"},
                                   "messages": [FEW_SHOT[0], {"role": "assistant", "content": {"inline": "{{ labl }}"}}]})
    with pytest.raises(TemplateProblem) as info:
        check_spec_templates(spec)
    assert str(info.value) == (f"{tmp_path / 'spec.yaml'}: teacher.messages[1].content: line 1: 'labl' is undefined "
                               "(known: category, label, origin, parent_id, prompt, prompt_id, source, template_id)")
    # A file template is named by its file, with the turn it serves and the line.
    spec = load(tmp_path, teacher={"messages": [{"role": "user", "content": "example.j2"},
                                                {"role": "assistant", "content": "example.j2"}]},
                files={"example.j2": "Headline:\n{{ headline }}"})
    with pytest.raises(TemplateProblem) as info:
        check_spec_templates(spec)
    assert str(info.value).splitlines() == [
        f"{tmp_path / 'example.j2'} (teacher.messages[{i}].content): line 2: 'headline' is undefined (known: category, "
        "label, origin, parent_id, prompt, prompt_id, source, template_id)" for i in (0, 1)]
    # The student's turns see the examples' columns, the teacher's answer included.
    spec = load(tmp_path, training={"student_system": {"inline": "{{ answer }}"},
                                    "student_messages": [{"role": "user", "content": {"inline": "{{ response }}"}}]})
    assert check_spec_templates(spec)[-2:] == ["training.student_system: inline template",
                                               "training.student_messages[0].content: inline template"]


def test_the_student_reads_as_the_teacher_unless_told_otherwise(tmp_path):
    teacher = {"system": {"inline": SYSTEM}, "messages": FEW_SHOT}
    inherited = student_side(load(tmp_path, teacher=teacher))
    assert (inherited.chat, str(inherited.system), len(inherited.messages)) == (True, SYSTEM, 2)
    assert inherited.system_field == "teacher.system"
    none = student_side(load(tmp_path, teacher=teacher, training={"student_system": None, "student_messages": []}))
    assert (none.system, none.messages, none.chat) == (None, (), True)
    plain = student_side(load(tmp_path, teacher=teacher, training={"student_chat": False}))
    assert (plain.chat, plain.system, plain.messages) == (False, None, ())  # a plain text reads no turns
    own = student_side(load(tmp_path, teacher={"chat": False},
                            training={"student_chat": True, "student_system": {"inline": "Short."}}))
    assert (own.chat, str(own.system), own.system_field) == (True, "Short.", "training.student_system")
    assert side_format(student_side(load(tmp_path))) is None  # the defaults name no run differently


# --- teaching -------------------------------------------------------------------------------


PROMPTS = ["Is the sky blue?", "Do cats bark?", "Is fire cold?"]


def teach(tmp_path, teacher: Teacher):
    class Spec:
        pass

    Spec.teacher = teacher
    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in PROMPTS], "prompt": PROMPTS,
                          "category": ["a", "b", "a"]})
    kept, dropped, stats = Teach().run(frame, RunContext(spec=Spec, cache_dir=tmp_path, progress=False))
    assert dropped.is_empty()
    return kept, stats


def test_changing_chat_system_or_turns_asks_again(tmp_path, tiny_llm_dir):
    def spec(**fields):
        return Teacher(model=str(tiny_llm_dir), generation={"max_new_tokens": 4}, logprobs={"top_k": 3}, **fields)

    variants = [{}, {"system": "{{ category }} first"}, {"system": "{{ category }} second"},
                {"messages": [{"role": "user", "content": "{{ 'Is it?' }}"}, {"role": "assistant", "content": "{{ 'yes' }}"}]},
                {"chat": False}]
    kept = []
    for fields in variants:
        rows, stats = teach(tmp_path, spec(**fields))
        assert stats["teacher_calls"] == len(PROMPTS), fields  # a new request each time: nothing cached fits
        again, stats = teach(tmp_path, spec(**fields))
        assert stats["teacher_calls"] == 0 and again.equals(rows)
        assert rows["teacher_prompt"].to_list() == PROMPTS  # the row's own prompt, whatever surrounds it
        kept.append((rows, stats))
    assert "teacher_context" not in kept[0][1]
    assert kept[1][1]["teacher_context"] == {"chat": True, "system": "a first"}  # rendered over the first row
    assert kept[3][1]["teacher_context"] == {"chat": True, "messages": [{"role": "user", "content": "Is it?"},
                                                                        {"role": "assistant", "content": "yes"}]}
    assert kept[4][1]["teacher_context"] == {"chat": False}
    # The stage cache's key holds them too.
    slices = {json.dumps(Teach().cache_slice(type("S", (), {"teacher": spec(**f)}), None), sort_keys=True)
              for f in variants}
    assert len(slices) == len(variants)


def test_the_teacher_answers_exactly_the_ids_of_its_conversation(tiny_llm_dir):
    """The stored tokens and top-k are what the model computes after prompt_ids of the conversation."""
    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    conversations = [Conversation(PROMPTS[0], chat=False), Conversation(PROMPTS[1], turns=(("system", SYSTEM),)),
                     Conversation(PROMPTS[2], turns=(("user", "Is it?"), ("assistant", "yes")))]
    spec = Teacher(model=str(tiny_llm_dir), generation={"max_new_tokens": 5}, logprobs={"top_k": 5}, batch_size=2)
    for conversation, out in zip(conversations, load_teacher(spec).generate(conversations)):
        ids = prompt_ids(tokenizer, conversation)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids + out.token_ids.tolist()])).logits[0].float(), -1)
        steps = logprobs[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)]
        np.testing.assert_allclose(steps.topk(5, dim=-1).values.numpy(), out.topk_logprobs.astype(np.float32), atol=1e-2)
        assert (steps.argmax(-1).numpy() == out.token_ids).all()


# --- the student: the same ids in training and eval -----------------------------------------


def eval_spec(tiny_llm_dir, training: dict):
    return parse_spec({
        "name": "t",
        "teacher": {"model": str(tiny_llm_dir), "system": {"inline": "Answer {{ category }} questions."},
                    "messages": [{"role": "user", "content": {"inline": "Is water wet?"}},
                                 {"role": "assistant", "content": {"inline": "yes"}}],
                    "generation": {"max_new_tokens": 4}, "batch_size": 4},
        "sources": [{"inline": ["x"]}],
        "training": training,
        "eval": {"speed_prompts": 2, "speed_tokens": 2, "max_new_tokens": 3},
    })


@pytest.mark.parametrize("training", [
    {"student_chat": False, "student_prompt": "Q: {{ prompt }}\nA:"},  # context distillation into plain text
    {},  # the student reads what the teacher read: its system message and turns too
    {"student_system": {"inline": "Be brief."}, "student_messages": []},
], ids=["plain", "inherited", "own-system"])
def test_eval_reads_exactly_what_training_encodes(tiny_llm_dir, tiny_examples, monkeypatch, training):
    import importlib

    ev = importlib.import_module("engine.train.evaluate")  # the module (engine.train.evaluate is also a function)
    spec = eval_spec(tiny_llm_dir, training)
    rows = tiny_examples
    seen: dict[str, list] = {"generate": [], "kl": [], "speed": []}

    def generate_texts(model, tokenizer, prompts, max_new, batch, tick=lambda: None):
        seen["generate"].append(prompts)
        return ["no"] * len(prompts)

    def mean_token_kl(model, tokenizer, rows, texts, batch, tick=lambda: None):
        seen["kl"].append([e.prompt_ids for e in encode(rows, tokenizer, texts)])
        return 0.0

    def decode_speed(model, tokenizer, prompts, n_tokens, tick=lambda: None):
        seen["speed"].append(prompts)
        return 1.0

    for name, fake in (("generate_texts", generate_texts), ("mean_token_kl", mean_token_kl),
                       ("decode_speed", decode_speed)):
        monkeypatch.setattr(ev, name, fake)
    sets = [ev.EvalSet("test split", "split", "test split", rows, set(rows["label"].to_list()))]
    ev.evaluate_sets(spec, sets, [ev.StudentRun("student", tiny_llm_dir)], progress=False)

    tokenizer = load_tokenizer(str(tiny_llm_dir))
    trained = [e.prompt_ids for e in encode(rows, tokenizer, student_conversations(rows, spec))]  # what loop.py encodes
    teacher_ids = [prompt_ids(tokenizer, c) for c in teacher_contexts(rows, spec)]
    assert seen["generate"] == [trained] and seen["kl"] == [teacher_ids, trained]
    assert seen["speed"] == [teacher_ids[:2], teacher_ids[:2]]  # every model timed on the teacher's context
    # Against hand-built expectations.
    first = rows.row(0, named=True)
    assert teacher_ids[0] == text_ids(tokenizer, (
        f"<|im_start|>system\nAnswer yesno questions.<|im_end|>\n<|im_start|>user\nIs water wet?<|im_end|>\n"
        f"<|im_start|>assistant\nyes<|im_end|>\n<|im_start|>user\n{first['teacher_prompt']}<|im_end|>\n"
        "<|im_start|>assistant\n"))
    expected = {"plain": tokenizer(f"Q: {first['prompt']}\nA:")["input_ids"], "inherited": teacher_ids[0],
                "own-system": text_ids(tokenizer, f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                                  f"{first['teacher_prompt']}<|im_end|>\n<|im_start|>assistant\n")}
    kind = "plain" if training.get("student_chat") is False else "own-system" if training else "inherited"
    assert trained[0] == expected[kind]


def test_the_run_id_follows_what_the_student_reads(tiny_llm_dir):
    from engine.train.runs import training_hash

    plain = training_hash(eval_spec(tiny_llm_dir, {"student_chat": False}))
    inherited = training_hash(eval_spec(tiny_llm_dir, {}))
    explicit = training_hash(eval_spec(tiny_llm_dir, {"student_chat": True}))  # the same as inherited
    assert len({plain, inherited}) == 2 and explicit == inherited


# --- a curated version: gold accuracy, run summary, show, export -----------------------------


HEADLINES = [("Striker scores twice in derby", "sports"), ("Stocks fall on rate fears", "business"),
             ("Keeper saves late penalty", "sports"), ("Bank raises interest rates", "business"),
             ("Coach sacked after defeat", "sports"), ("Oil prices climb again", "business"),
             ("Team wins the league title", "sports"), ("Retailer reports record profit", "business")]


@pytest.fixture(scope="module")
def curated(tmp_path_factory, tiny_llm_dir):
    """A version curated by the tiny random teacher (whose answers match no gold label) through a system
    message and few-shot turns; its student reads plain text."""
    work = tmp_path_factory.mktemp("prompts")
    (work / "news.jsonl").write_text("".join(json.dumps({"headline": h, "topic": t, "kind": "news" if i % 2 else "wire"})
                                             + "\n" for i, (h, t) in enumerate(HEADLINES)))
    (work / "example.j2").write_text("Headline: Striker scores twice\nTopic:")
    spec = {
        "name": "news",
        "teacher": {"model": str(tiny_llm_dir), "prompt": "Headline: {{ prompt }}\nTopic:",
                    "system": {"inline": "Answer sports or business."},
                    "messages": [{"role": "user", "content": "example.j2"}, {"role": "assistant", "content": {"inline": "sports"}}],
                    "generation": {"max_new_tokens": 4}, "batch_size": 4},
        "sources": [{"path": str(work / "news.jsonl"), "text": "headline", "label": "topic", "category": "kind"}],
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "splits": {"train": 1.0, "val": 0.0, "test": 0.0},
        "training": {"student_chat": False, "student_prompt": "{{ prompt }} =>"},
    }
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    st = store.open(work / "store")
    result = pipeline.run(load_spec(work / "spec.yaml"), st, progress=False)
    return {"work": work, "store": st, "result": result, "spec": load_spec(work / "spec.yaml")}


def cli(*args):
    return CliRunner().invoke(app, list(args))


def test_gold_accuracy_is_in_lineage_the_summary_and_show(curated, tmp_path):
    gold = curated["result"].gold
    assert gold["n"] == len(HEADLINES) and gold["accuracy"] < 0.5 and set(gold["per_category"]) == {"news", "wire"}
    assert gold["baseline"]["accuracy"] == 0.5
    assert gold["warning"].startswith(f"teacher answers match gold on {gold['accuracy']:.0%} of rows (n=8; majority "
                                      "class 'business' 50%)")
    assert gold["warning"].endswith(": check teacher.prompt and teacher.system and teacher.messages")
    assert curated["store"].resolve("news@1").stats["teacher_gold"] == gold

    # `syllabus run` says so, even with -q; a fresh store asks the teacher again.
    r = cli("run", str(curated["work"] / "spec.yaml"), "--store", str(tmp_path / "st"), "-q")
    assert r.exit_code == 0, r.output
    assert f"warning: {gold['warning']}" in " ".join(r.stderr.split())
    r = cli("run", str(curated["work"] / "spec.yaml"), "--store", str(tmp_path / "st"))
    said = " ".join(r.stderr.split())
    assert r.exit_code == 0 and "teacher vs gold: " in said and "per category: news " in said and "warning:" in said

    r = cli("show", "news@1", "--store", str(curated["store"].root))
    shown = " ".join(r.stdout.split())
    assert r.exit_code == 0, r.output
    assert f"teacher vs gold: {100 * gold['accuracy']:.1f}%" in shown and "(majority class 'business' 50.0%)" in shown
    assert f"warning: {gold['warning']}" in shown
    assert "teacher context: chat" in shown and "system: Answer sports or business." in shown
    assert "user: Headline: Striker scores twice Topic:" in shown and "assistant: sports" in shown


def test_teacher_gold_warns_only_below_half_or_the_majority():
    def gold(answers, labels, categories=None):
        return teacher_gold(pl.DataFrame({"answer": answers, "label": labels,
                                          "category": categories or ["c"] * len(labels)}))

    right = gold(["The topic is sports.", "business", "Sports!", "no idea"], ["sports", "business", "sports", "business"])
    assert right["accuracy"] == 0.75 and right["warning"] is None
    echo = gold(["Sports: Striker scores twice"] * 4, ["sports", "business", "business", "business"])
    assert echo["accuracy"] == 0.25 and echo["warning"] == (
        "teacher answers match gold on 25% of rows (n=4; majority class 'business' 75%); its most frequent answer "
        "is 'sports' (100%): check teacher.prompt")
    majority = gold(["business"] * 10, ["business"] * 6 + ["sports"] * 4)  # 60%, but no better than always 'business'
    assert majority["accuracy"] == 0.6 and majority["warning"].startswith("teacher answers match gold on 60%")
    assert gold(["yes", "yes"], ["yes", "yes"])["warning"] is None  # one label: the majority is no yardstick
    assert gold(["x"], [None]) is None and teacher_gold(pl.DataFrame({"answer": ["x"]})) is None


def test_export_gives_each_side_its_own_context(curated, tmp_path):
    st, spec = curated["store"], curated["spec"]
    rows = st.read("news@1", "examples")
    tokenizer = load_tokenizer("smollm2-135m-instruct")  # as another trainer would load it (the tiny one's)
    # The student reads plain text: `text` and `completion`, and tokenizing `text` gives the trainer's ids.
    r = cli("export", "news@1", "--format", "jsonl", "--out", str(tmp_path / "s.jsonl"), "--with-meta",
            "--store", str(st.root))
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    trained = encode(rows, tokenizer, student_conversations(rows, spec))
    assert list(lines[0])[:2] == ["text", "completion"] and "messages" not in lines[0]
    assert [tokenizer(x["text"])["input_ids"] for x in lines] == [e.prompt_ids for e in trained]
    assert [x["completion"] for x in lines] == rows["response"].to_list()
    assert lines[0]["text"] == f"{rows['prompt'][0]} =>"
    # The teacher's context: the system message and the few-shot turns as real turns.
    r = cli("export", "news@1", "--format", "jsonl", "--out", str(tmp_path / "t.jsonl"), "--prompt", "teacher",
            "--store", str(st.root))
    assert r.exit_code == 0, r.output
    chats = [json.loads(x)["messages"] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [m["role"] for m in chats[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert chats[0][:3] == [{"role": "system", "content": "Answer sports or business."},
                            {"role": "user", "content": "Headline: Striker scores twice\nTopic:"},
                            {"role": "assistant", "content": "sports"}]
    taught = [prompt_ids(tokenizer, c) for c in teacher_contexts(rows, spec)]
    assert [list(tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True, return_dict=True)["input_ids"])
            for c in chats] == taught
    # Parquet: every column, plus the context.
    r = cli("export", "news@1", "--format", "parquet", "--out", str(tmp_path / "s.parquet"), "--store", str(st.root))
    assert r.exit_code == 0, r.output
    frame = pl.read_parquet(tmp_path / "s.parquet")
    assert {"text", "completion", "token_ids", "prompt"} <= set(frame.columns)
    # --system only where the side reads none.
    r = cli("export", "news@1", "--format", "jsonl", "--out", str(tmp_path / "x.jsonl"), "--system", "Hi",
            "--store", str(st.root))
    assert r.exit_code == 1 and str(r.exception) == "--system: the student reads plain text (chat: false): export without --system"
    r = cli("export", "news@1", "--format", "jsonl", "--out", str(tmp_path / "x.jsonl"), "--system", "Hi",
            "--prompt", "teacher", "--store", str(st.root))
    assert r.exit_code == 1 and str(r.exception) == ("--system: the teacher reads a system message (teacher.system): "
                                                     "export without --system")


def test_the_student_inheriting_the_teachers_turns_exports_them(curated, tmp_path):
    """The same data under a spec whose student reads as the teacher did: messages with its turns."""
    spec_text = (curated["work"] / "spec.yaml").read_text()
    data = yaml.safe_load(spec_text)
    data.pop("training")
    st = store.open(tmp_path / "st")
    lineage = {"spec_text": yaml.safe_dump(data), "spec_hash": "h", "teacher": "t", "code_version": "0", "stats": {},
               "spec_path": str(curated["work"] / "spec.yaml")}
    rows = curated["store"].read("news@1", "examples")
    st.commit("news", {"examples": rows.to_arrow()}, lineage, parent=None)
    r = cli("export", "news@1", "--format", "jsonl", "--out", str(tmp_path / "s.jsonl"), "--store", str(st.root))
    assert r.exit_code == 0, r.output
    chats = [json.loads(x)["messages"] for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [m["role"] for m in chats[0]] == ["system", "user", "assistant", "user", "assistant"]
    assert [c[3]["content"] for c in chats] == rows["teacher_prompt"].to_list()
