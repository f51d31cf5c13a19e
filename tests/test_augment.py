"""Augment and top_up on small frames: grid and seeded sampling, ids, teacher rewrites, the cap."""

from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from engine.spec import Augment as AugmentSpec
from engine.spec import Coverage, Teacher
from engine.stages import augment as augment_module
from engine.stages.augment import ASK_AGAIN, Augment, clean_rewrite, combinations, top_up
from engine.stages.base import REJECTION_SCHEMA, RunContext, prompt_id
from engine.stages.sources import ROW_SCHEMA
from engine.templates import TemplateProblem

REPO = Path(__file__).resolve().parents[1]


class FakeSpec:
    def __init__(self, **parts):
        self.__dict__.update(parts)

    def resolve_path(self, relative: str) -> Path:
        return Path(relative)


def context(tmp_path, entries: list[dict], templates: dict[str, str], cap: int = 4) -> RunContext:
    for name, text in templates.items():
        (tmp_path / name).write_text(text)
    augment = [AugmentSpec(**dict(e, template=str(tmp_path / e["template"]))) for e in entries]
    coverage = Coverage(categories={"x": {}, "y": {}}, augment_cap=cap)
    teacher = Teacher(model="fake", generation={"max_new_tokens": 8})
    return RunContext(spec=FakeSpec(augment=augment, coverage=coverage, teacher=teacher), cache_dir=tmp_path,
                      progress=False)


def originals(prompts, categories=None) -> pl.DataFrame:
    categories = categories or ["x"] * len(prompts)
    ids = [prompt_id(p) for p in prompts]
    return pl.DataFrame({
        "prompt_id": ids, "parent_id": ids, "source": ["s.jsonl"] * len(prompts), "category": categories,
        "template_id": [None] * len(prompts), "origin": ["source"] * len(prompts), "prompt": prompts,
        "label": [f"gold{i}" for i in range(len(prompts))],
    }, schema=ROW_SCHEMA)


def fake_teacher(monkeypatch, reply, tokens=lambda text: [0] * 3):
    """Replace the cached teacher call: `reply(request) -> text`; records (label, requests) per call."""
    calls = []

    def ask(ctx, prompts, label="teach", max_new_tokens=None):
        calls.append((label, list(prompts)))
        return [SimpleNamespace(text=reply(p), token_ids=tokens(reply(p))) for p in prompts], len(prompts)

    monkeypatch.setattr(augment_module, "ask_teacher", ask)
    return calls


# --- grid, categories, ids ---------------------------------------------------------

def test_grid_expands_every_combination_with_stable_ids(tmp_path):
    ctx = context(tmp_path, [{"template": "t.j2", "vars": {"style": ["a", "b"], "n": [1, 2, 3]}}],
                  {"t.j2": "{{ prompt }} [{{ style }}{{ n }}] {{ label }}"})
    frame = originals(["Is it good?", "Is it bad?"])
    kept, rejected, stats = Augment().run(frame, ctx)
    assert kept.height == 2 + 2 * 6 and rejected.height == 0
    assert kept.schema == frame.schema
    first = kept.head(7)
    assert first["prompt"].to_list() == ["Is it good?"] + [
        f"Is it good? [{s}{n}] gold0" for s in "ab" for n in (1, 2, 3)]
    assert first["template_id"].to_list()[1:] == [f"t.j2#style={s},n={n}" for s in "ab" for n in (1, 2, 3)]
    assert first["prompt_id"].to_list()[1:] == [prompt_id(p) for p in first["prompt"].to_list()[1:]]
    variations = kept.filter(pl.col("origin") == "template")
    assert set(variations["source"]) == {"s.jsonl"} and set(variations["category"]) == {"x"}
    assert kept["parent_id"].to_list() == [frame["prompt_id"][0]] * 7 + [frame["prompt_id"][1]] * 7
    assert kept[7, "prompt"] == "Is it bad?"  # each original followed by its variations
    assert stats == {"originals": 2, "variations": 12, "by_teacher": 0, "empty": 0, "identical": 0,
                     "cut_off": 0, "teacher_calls": 0}


def test_entry_applies_to_its_categories_only_and_no_vars_means_one_variation(tmp_path):
    ctx = context(tmp_path, [{"template": "t.j2", "categories": ["y"]}], {"t.j2": "Please: {{ prompt }}"})
    kept, _, stats = Augment().run(originals(["p1", "p2"], ["x", "y"]), ctx)
    assert kept["prompt"].to_list() == ["p1", "p2", "Please: p2"]
    assert kept["template_id"].to_list() == [None, None, "t.j2"]
    assert stats["variations"] == 1


def test_identical_and_empty_variations_are_rejected(tmp_path):
    ctx = context(tmp_path, [{"template": "same.j2"}, {"template": "empty.j2"}, {"template": "ok.j2"}],
                  {"same.j2": "  {{ prompt }}  ", "empty.j2": "{% if false %}x{% endif %}", "ok.j2": "Q: {{ prompt }}"})
    kept, rejected, stats = Augment().run(originals(["Is it good?"]), ctx)
    assert kept["prompt"].to_list() == ["Is it good?", "Q: Is it good?"]
    assert rejected.schema == pl.Schema(REJECTION_SCHEMA)
    assert list(zip(rejected["stage"], rejected["reason"])) == [
        ("augment", "identical to its parent"), ("augment", "empty variation")]
    assert (stats["empty"], stats["identical"], stats["variations"]) == (1, 1, 1)


def test_undefined_template_variable_is_an_error_naming_it(tmp_path):
    ctx = context(tmp_path, [{"template": "t.j2", "vars": {"style": ["a"]}}], {"t.j2": "{{ prompt }} {{ tone }}"})
    with pytest.raises(TemplateProblem, match=r"t\.j2: line 1: 'tone' is undefined"):
        Augment().run(originals(["p"]), ctx)


# --- seeded sampling -----------------------------------------------------------------

GRID = {"a": [1, 2, 3, 4], "b": ["x", "y", "z"]}  # 12 combinations


def test_sample_is_seeded_by_entry_and_parent():
    entry = AugmentSpec(template="t.j2", vars=GRID, sample=3, seed=5)
    first = combinations(entry, "parent-1")
    assert len(first) == 3 and len({tuple(c.items()) for c in first}) == 3
    assert combinations(entry, "parent-1") == first  # same seed, same parent: same combinations
    assert all(list(c) == ["a", "b"] for c in first)
    others = [combinations(entry, f"parent-{i}") for i in range(2, 8)]
    assert any(o != first for o in others)  # different parents: different combinations
    reseeded = AugmentSpec(template="t.j2", vars=GRID, sample=3, seed=6)
    assert [combinations(reseeded, f"parent-{i}") for i in range(1, 8)] != [first] + others
    assert combinations(entry, "parent-1", round=1) != first  # a top-up round draws anew
    full = AugmentSpec(template="t.j2", vars=GRID, sample=50)
    assert len(combinations(full, "p")) == 12  # a sample larger than the grid is the grid


def test_sampled_variations_are_stable_across_runs(tmp_path):
    ctx = context(tmp_path, [{"template": "t.j2", "vars": GRID, "sample": 2, "seed": 1}],
                  {"t.j2": "{{ prompt }} {{ a }}{{ b }}"})
    frame = originals([f"prompt {i}" for i in range(6)])
    once, _, _ = Augment().run(frame, ctx)
    again, _, _ = Augment().run(frame, ctx)
    assert once.height == 6 * 3
    assert once.equals(again)
    per_parent = once.group_by("parent_id", maintain_order=True).agg(pl.col("prompt").str.split(" ").list.last())
    assert len({tuple(combos[1:]) for combos in per_parent["prompt"]}) > 1  # parents drew different combinations


# --- teacher rewrites ------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ('"Is it any good?"', "Is it any good?"),
    ("Rewritten: Is it any good?", "Is it any good?"),
    ("Rewritten question: \u201cIs it any good?\u201d", "Is it any good?"),
    ("Here is a rewritten version:\n'Is it any good?'\n\nI kept the meaning.", "Is it any good?"),
    ("  Is it any good?  ", "Is it any good?"),
    ('""', ""),
])
def test_clean_rewrite(reply, expected):
    assert clean_rewrite(reply) == expected


def test_teacher_rewrites_become_rows_marked_teacher(tmp_path, monkeypatch):
    calls = fake_teacher(monkeypatch, lambda request: "Rewritten: " + request.upper())
    ctx = context(tmp_path, [{"template": "ask.j2", "vars": {"tone": ["simply"]}, "teacher": True},
                             {"template": "t.j2"}],
                  {"ask.j2": "Rewrite {{ tone }}: {{ prompt }}", "t.j2": "Q: {{ prompt }}"})
    kept, _, stats = Augment().run(originals(["is it ok?", "is it new?"]), ctx)
    assert calls == [("augment", ["Rewrite simply: is it ok?", "Rewrite simply: is it new?"])]  # one batch
    assert kept.select("prompt", "origin", "template_id").rows() == [
        ("is it ok?", "source", None),
        ("REWRITE SIMPLY: IS IT OK?", "teacher", "ask.j2#tone=simply"),
        ("Q: is it ok?", "template", "t.j2"),
        ("is it new?", "source", None),
        ("REWRITE SIMPLY: IS IT NEW?", "teacher", "ask.j2#tone=simply"),
        ("Q: is it new?", "template", "t.j2"),
    ]
    assert (stats["by_teacher"], stats["teacher_calls"]) == (2, 2)


def test_a_teacher_reply_that_repeats_the_prompt_is_rejected(tmp_path, monkeypatch):
    fake_teacher(monkeypatch, lambda request: '"' + request.split(": ", 1)[1] + '"')
    ctx = context(tmp_path, [{"template": "ask.j2", "teacher": True}], {"ask.j2": "Rewrite: {{ prompt }}"})
    kept, rejected, stats = Augment().run(originals(["Is it ok?"]), ctx)
    assert kept.height == 1 and rejected["reason"].to_list() == ["identical to its parent"]
    assert stats["identical"] == 1


def test_a_teacher_reply_that_used_every_token_is_cut_off(tmp_path, monkeypatch):
    # max_new_tokens is 8: a reply of 8 tokens was stopped by the limit, not by the teacher.
    fake_teacher(monkeypatch, lambda request: request.replace("Rewrite: ", "New: "),
                 tokens=lambda text: [0] * (8 if "long" in text else 5))
    ctx = context(tmp_path, [{"template": "ask.j2", "teacher": True}], {"ask.j2": "Rewrite: {{ prompt }}"})
    kept, rejected, stats = Augment().run(originals(["a long one", "short"]), ctx)
    assert kept["prompt"].to_list() == ["a long one", "short", "New: short"]
    assert list(zip(rejected["prompt"], rejected["reason"])) == [
        ("New: a long one", augment_module.CUT_OFF)]
    assert stats["cut_off"] == 1
    assert top_up(originals(["a long one"]), "x", 2, 1, set(), ctx).height == 0


def test_no_teacher_call_without_teacher_entries(tmp_path, monkeypatch):
    calls = fake_teacher(monkeypatch, lambda r: r)
    ctx = context(tmp_path, [{"template": "t.j2"}], {"t.j2": "Q: {{ prompt }}"})
    Augment().run(originals(["p"]), ctx)
    assert calls == []


# --- top_up ----------------------------------------------------------------------------

STYLES = {"style": [f"s{i}" for i in range(10)]}


def made_so_far(tmp_path, cap=3):
    ctx = context(tmp_path, [{"template": "t.j2", "vars": STYLES, "sample": 1, "seed": 3}],
                  {"t.j2": "{{ prompt }} ({{ style }})"}, cap=cap)
    frame = originals(["A?", "B?", "C?"], ["x", "x", "y"])
    augmented, _, _ = Augment().run(frame, ctx)
    return ctx, augmented


def test_top_up_respects_the_cap_and_never_repeats(tmp_path):
    ctx, augmented = made_so_far(tmp_path, cap=3)
    existing = set(augmented["prompt_id"])
    new = top_up(augmented, "x", 100, 1, existing, ctx)
    assert new.schema == pl.Schema(ROW_SCHEMA)
    # A? and B? have one variation each; the cap of 3 leaves two more each, taken in turns.
    parents = {prompt_id("A?"): "A?", prompt_id("B?"): "B?"}
    assert [parents[p] for p in new["parent_id"]] == ["A?", "B?", "A?", "B?"]
    assert set(new["category"]) == {"x"} and set(new["origin"]) == {"template"}
    assert not existing & set(new["prompt_id"])
    assert new["prompt_id"].n_unique() == 4
    assert all(t.startswith("t.j2#style=s") for t in new["template_id"])
    # Round 2 with everything made so far: every original is at its cap.
    both = pl.concat([augmented, new])
    assert top_up(both, "x", 100, 2, existing | set(new["prompt_id"]), ctx).height == 0


def test_top_up_stops_at_needed_and_is_deterministic(tmp_path):
    ctx, augmented = made_so_far(tmp_path, cap=4)
    existing = set(augmented["prompt_id"])
    three = top_up(augmented, "x", 3, 1, existing, ctx)
    assert [p for p in three["prompt"].str.head(2)] == ["A?", "B?", "A?"]
    assert three.equals(top_up(augmented, "x", 3, 1, existing, ctx))
    assert top_up(augmented, "x", 0, 1, existing, ctx).height == 0
    assert top_up(augmented, "zzz", 5, 1, existing, ctx).height == 0


def test_top_up_counts_only_the_variations_it_is_shown(tmp_path):
    ctx, augmented = made_so_far(tmp_path, cap=2)
    only_originals = augmented.filter(pl.col("origin") == "source")
    new = top_up(only_originals, "x", 100, 1, set(augmented["prompt_id"]), ctx)
    assert new.height == 4  # no earlier variation shown: the full cap of 2 each


def test_top_up_asks_the_teacher_anew_each_round(tmp_path, monkeypatch):
    calls = fake_teacher(monkeypatch, lambda request: request.replace("Rewrite: ", "New: ").replace("\n", " "))
    ctx = context(tmp_path, [{"template": "ask.j2", "teacher": True}], {"ask.j2": "Rewrite: {{ prompt }}"}, cap=3)
    frame = originals(["A?", "B?"])
    augmented, _, _ = Augment().run(frame, ctx)
    assert augmented["prompt"].to_list() == ["A?", "New: A?", "B?", "New: B?"]
    new = top_up(augmented, "x", 5, 1, set(augmented["prompt_id"]), ctx)
    again = ASK_AGAIN.format(n=2)
    assert calls[-1] == ("top-up x", [f"Rewrite: A?{again}", f"Rewrite: B?{again}"])
    assert new["prompt"].to_list() == [f"New: A?{again}".replace("\n", " "), f"New: B?{again}".replace("\n", " ")]
    assert set(new["origin"]) == {"teacher"} and set(new["template_id"]) == {"ask.j2#round=1"}


def test_top_up_teacher_failures_do_not_spend_the_turn(tmp_path, monkeypatch):
    # The teacher repeats the prompt for A? (rejected); B? gets its rewrite; A? has no other candidate.
    fake_teacher(monkeypatch, lambda request: "A?" if "A?" in request else "B, again?")
    ctx = context(tmp_path, [{"template": "ask.j2", "teacher": True}], {"ask.j2": "Rewrite: {{ prompt }} {{ round }}"})
    new = top_up(originals(["A?", "B?"]), "x", 5, 1, set(), ctx)
    assert new["prompt"].to_list() == ["B, again?"]


def test_a_variation_whose_template_cannot_render_is_a_bad_row_naming_template_and_line(tmp_path):
    ctx = context(tmp_path, [{"template": "big.j2"}], {"big.j2": "Say:\n{{ prompt * (10**6 if 'huge' in prompt else 1) }}"})
    kept, dropped, stats = Augment().run(originals(["a small one", "a huge one"]), ctx)
    assert kept["prompt"].to_list() == ["a small one", "Say:\na small one", "a huge one"]
    assert dropped["parent_id"].to_list() == [prompt_id("a huge one")]
    assert dropped["reason"][0].startswith(f"{tmp_path / 'big.j2'}: line 2: '*' would make")
    assert stats["variations"] == 1
