"""Augment: variations of the original prompts from Jinja2 templates, optionally written by the teacher.

Each augment entry renders its template over an original row (its columns are the
template's variables) once per combination of `vars`: the whole grid, or `sample: N`
combinations per prompt drawn with a seed fixed by the entry and the prompt, so a re-run
makes the same variations. With `teacher: true` the rendered text is a request and the
teacher's reply becomes the new prompt (origin "teacher").

`top_up` makes more variations for one category on demand (coverage.augment_until_quota):
new combinations and new teacher requests per round, never a prompt made before, and at
most coverage.augment_cap variations per original.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter, deque
from dataclasses import dataclass
from itertools import product
from math import prod
from pathlib import Path

import polars as pl

from engine.stages.base import RunContext, Stage, dump, prompt_id, rejections, teacher_key
from engine.stages.sources import ROW_SCHEMA
from engine.stages.teach import ask_teacher
from engine.errors import RenderLimit
from engine.templates import render, spec_template

EMPTY = "empty variation"
IDENTICAL = "identical to its parent"
CUT_OFF = "teacher rewrite cut off at max_new_tokens (raise augment[].max_new_tokens)"
# Appended to a teacher request in a top-up round when the template ignores `round`, so the
# (cached, usually greedy) teacher is asked something new and can answer with a new wording.
ASK_AGAIN = "\n\nWrite a wording different from any earlier one (variation {n})."


# --- combinations of vars --------------------------------------------------------

def grid_size(variables: dict[str, list]) -> int:
    return prod(len(values) for values in variables.values())


def combination(variables: dict[str, list], index: int) -> dict:
    """The index-th combination of the grid, in the order itertools.product gives (last var fastest)."""
    combo = {}
    for name, values in reversed(variables.items()):
        index, pick = divmod(index, len(values))
        combo[name] = values[pick]
    return {name: combo[name] for name in variables}


def combinations(entry, parent_id: str, round: int = 0, extra: int = 0) -> list[dict]:
    """The entry's combinations for one prompt: the grid, or a seeded sample of it (in grid order).

    The sample is fixed by (entry.seed, round, parent_id). `extra` draws that many more
    than `sample`, so a top-up round still finds new ones when some were drawn before.
    """
    if entry.sample is None:
        return [dict(zip(entry.vars, values)) for values in product(*entry.vars.values())]
    size = grid_size(entry.vars)
    rng = random.Random(f"{entry.seed}:{round}:{parent_id}")
    picks = rng.sample(range(size), min(size, entry.sample + extra))
    return [combination(entry.vars, i) for i in sorted(picks)]


def template_id(entry, combo: dict, round: int = 0) -> str:
    """A stable name for what made a variation: `rephrase.j2#style=formally`."""
    parts = [f"{name}={value}" for name, value in combo.items()]
    if entry.teacher and round:
        parts.append(f"round={round}")  # the request differs by round, so does the variation
    file = getattr(entry.template, "file", None)
    name = Path(file).name if file else f"inline-{hashlib.sha256(str(entry.template).encode()).hexdigest()[:8]}"
    return f"{name}#{','.join(parts)}" if parts else name


# --- teacher replies ---------------------------------------------------------------

_LABEL = re.compile(
    r"^(?:[a-z]+\s+){0,2}(?:rewritten|rewrite|rephrased|rephrase|paraphrased|paraphrase|"
    r"question|review|text|prompt|version|output|answer)\s*:\s*", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}


def clean_rewrite(reply: str) -> str:
    """The new prompt inside a teacher's reply: no intro line, label or surrounding quotes."""
    text = reply.strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):  # "Here is a rewritten version:"
        text = "\n".join(lines[1:]).strip()
    text = re.split(r"\n\s*\n", text, maxsplit=1)[0].strip()  # the first paragraph: no afterword
    text = _LABEL.sub("", text, count=1).strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


# --- candidates --------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One variation to make: its text is the new prompt, or the request to the teacher."""

    parent: dict
    template_id: str
    text: str
    by_teacher: bool
    max_new_tokens: int | None = None  # the teacher's reply length for this entry (None: teacher's own)
    problem: str | None = None  # the template could not render for this row (RenderLimit): a bad variation


def entries_for(spec, category: str | None) -> list:
    return [e for e in spec.augment if e.categories is None or category in e.categories]


def candidates(parent: dict, entries: list, spec, round: int = 0, extra: int = 0) -> list[Candidate]:
    """Every variation the entries make of one original, in spec order then combination order."""
    row = {name: parent.get(name) for name in ROW_SCHEMA}
    out = []
    for entry in entries:
        template = spec_template(spec, f"augment[{spec.augment.index(entry)}].template", entry.template)
        for combo in combinations(entry, parent["prompt_id"], round, extra):
            made_by = template_id(entry, combo, round)
            try:
                text = render(template, {**row, "round": round, **combo})
                if entry.teacher and round and text == render(template, {**row, "round": 0, **combo}):
                    text += ASK_AGAIN.format(n=round + 1)
            except RenderLimit as e:
                out.append(Candidate(parent, made_by, "", False, problem=str(e)))
                continue
            out.append(Candidate(parent, made_by, text, entry.teacher, entry.max_new_tokens))
    return out


def ask_for_rewrites(cands: list[Candidate], ctx: RunContext, label: str) -> tuple[list[str], list[str | None], int]:
    """The new prompt of each candidate: its rendered text, or the teacher's cleaned reply (one batch).

    Returns (texts, problems, teacher calls): a reply that hit its token limit was cut off
    mid-sentence, so its problem is CUT_OFF (it would be a truncated prompt).
    """
    default_limit = ctx.spec.teacher.generation.max_new_tokens
    replies, calls = {}, 0
    # One teacher batch per reply length (entries may set their own max_new_tokens).
    for limit in {c.max_new_tokens or default_limit for c in cands if c.by_teacher}:
        group = [i for i, c in enumerate(cands) if c.by_teacher and (c.max_new_tokens or default_limit) == limit]
        outs, n = ask_teacher(ctx, [cands[i].text for i in group], label, max_new_tokens=limit)
        replies.update(zip(group, outs))
        calls += n
    texts, problems = [], []
    for i, cand in enumerate(cands):
        if not cand.by_teacher:
            texts.append(cand.text)
            problems.append(cand.problem)
            continue
        reply, limit = replies[i], cand.max_new_tokens or default_limit
        texts.append(clean_rewrite(reply.text))
        problems.append(CUT_OFF if _cut_off(reply, limit) else None)
    return texts, problems, calls


def _cut_off(reply, limit: int) -> bool:
    """The reply hit its token limit: by the backend's finish_reason, else (older answers) by its length."""
    reason = getattr(reply, "finish_reason", None)
    if reason:
        return reason == "length"
    tokens = getattr(reply, "token_ids", None)
    return tokens is not None and len(tokens) >= limit


def variation_row(candidate: Candidate, text: str, columns) -> dict:
    """A new row: identity from its text, the rest inherited; columns a later stage derives start empty."""
    parent = candidate.parent
    row = {name: None for name in columns}
    row.update({name: parent.get(name) for name in ("source", "category", "label")})
    row.update(prompt_id=prompt_id(text), parent_id=parent["prompt_id"], template_id=candidate.template_id,
               origin="teacher" if candidate.by_teacher else "template", prompt=text)
    return row


def flaw(text: str, parent: dict) -> str | None:
    if not text.strip():
        return EMPTY
    if prompt_id(text) == parent["prompt_id"]:
        return IDENTICAL
    return None


# --- the stage ---------------------------------------------------------------------

class Augment(Stage):
    """Originals followed each by its variations; empty or unchanged variations are rejected."""

    name = "augment"
    order = 30
    cached = True
    adds_rows = True

    @classmethod
    def wanted(cls, spec) -> bool:
        return bool(spec.augment)

    def cache_slice(self, spec, store):
        from engine.teachers import teacher_fingerprint

        by_teacher = any(a.teacher for a in spec.augment)
        teacher = [teacher_key(spec.teacher), teacher_fingerprint(spec.teacher)] if by_teacher else None
        return [[dump(a) for a in spec.augment], teacher]  # a template's text is part of its entry

    def cheap(self, spec, frame) -> bool:
        return not any(a.teacher for a in spec.augment)

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        spec = ctx.spec
        rows = frame.to_dicts()
        cands = [c for r in rows if r["origin"] == "source"
                 for c in candidates(r, entries_for(spec, r["category"]), spec)]
        texts, problems, calls = ask_for_rewrites(cands, ctx, self.name)

        made: dict[str, list[dict]] = {}
        bad, reasons = [], []
        for cand, text, problem in zip(cands, texts, problems):
            row = variation_row(cand, text, frame.columns)
            why = problem or flaw(text, cand.parent)
            if why:
                bad.append(row)
                reasons.append(why)
            else:
                made.setdefault(cand.parent["prompt_id"], []).append(row)

        out = []
        for r in rows:  # each original followed by its variations
            out.append(r)
            out.extend(made.get(r["prompt_id"], []) if r["origin"] == "source" else [])
        kept = pl.DataFrame(out, schema=frame.schema)
        dropped = pl.DataFrame(bad, schema=frame.schema)
        origins = Counter(r["origin"] for vs in made.values() for r in vs)
        why = Counter(reasons)
        stats = {
            "originals": sum(r["origin"] == "source" for r in rows),
            "variations": origins["template"] + origins["teacher"],
            "by_teacher": origins["teacher"],
            "empty": why[EMPTY],
            "identical": why[IDENTICAL],
            "cut_off": why[CUT_OFF],
            "teacher_calls": calls,
        }
        return kept, rejections(dropped, self.name, pl.Series(reasons, dtype=pl.String)), stats


def top_up(originals: pl.DataFrame, category: str, needed: int, round: int, existing_ids: set[str],
           ctx: RunContext) -> pl.DataFrame:
    """Up to `needed` new variation rows (ROW_SCHEMA) for `category`, for top-up round `round` (1, 2, ...).

    originals: the category's rows made so far. Rows with origin "source" are the originals
    to vary; every other row counts as a variation of its parent_id against
    coverage.augment_cap (so pass the variations made earlier, kept or dropped, too).
    existing_ids: prompt_ids never to make again (every row made so far, kept or dropped).
    Originals take turns (round robin, in frame order), so the new rows spread over them.
    Round 0 is the Augment stage itself; each later round draws new samples and sends the
    teacher new requests.
    """
    spec = ctx.spec
    cap = spec.coverage.augment_cap
    rows = originals.filter(pl.col("category") == category).to_dicts()
    parents = [r for r in rows if r["origin"] == "source"]
    entries = entries_for(spec, category)
    if needed <= 0 or not parents or not entries:
        return pl.DataFrame(schema=ROW_SCHEMA)

    made = Counter(r["parent_id"] for r in rows if r["origin"] != "source")
    budget = {p["prompt_id"]: cap - made[p["prompt_id"]] for p in parents}
    queues = {p["prompt_id"]: deque(candidates(p, entries, spec, round, extra=cap)) for p in parents
              if budget[p["prompt_id"]] > 0}
    seen = set(existing_ids)
    out: list[dict] = []
    while len(out) < needed:
        picks = _take_turns(parents, queues, budget, seen, needed - len(out))
        if not picks:
            break
        texts, problems, _ = ask_for_rewrites(picks, ctx, f"top-up {category}")
        for cand, text, problem in zip(picks, texts, problems):
            if cand.by_teacher:  # known only now: check it as _take_turns checked the templates
                if problem or flaw(text, cand.parent) or prompt_id(text) in seen:
                    budget[cand.parent["prompt_id"]] += 1  # the turn made nothing, so it is not spent
                    continue
                seen.add(prompt_id(text))
            out.append(variation_row(cand, text, ROW_SCHEMA))
    return pl.DataFrame(out, schema=ROW_SCHEMA)


def _take_turns(parents: list[dict], queues: dict[str, deque], budget: dict[str, int], seen: set[str],
                want: int) -> list[Candidate]:
    """Up to `want` candidates, one per original per pass while it has budget and candidates left."""
    picks: list[Candidate] = []
    while len(picks) < want:
        taken = 0
        for parent in parents:
            pid = parent["prompt_id"]
            if len(picks) >= want or budget[pid] <= 0:
                continue
            cand = _next_candidate(queues.get(pid), parent, seen)
            if cand is not None:
                budget[pid] -= 1
                picks.append(cand)
                taken += 1
        if not taken:
            break
    return picks


def _next_candidate(queue: deque | None, parent: dict, seen: set[str]) -> Candidate | None:
    """The next candidate worth making. A template's text is known, so one made before is
    skipped (and the new one claimed in `seen`); a teacher's reply is checked after asking."""
    while queue:
        cand = queue.popleft()
        if cand.by_teacher:
            return cand
        if not flaw(cand.text, parent) and prompt_id(cand.text) not in seen:
            seen.add(prompt_id(cand.text))
            return cand
    return None
