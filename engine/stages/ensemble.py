"""Ensemble: more teachers beside `teacher:` (spec `ensemble:`).

The teacher (the primary) keeps its role: its answer is the row's response, its tokens what the
student learns to write. Each member of `ensemble.members`, loaded one at a time:

- answers every row itself, through the teacher request cache (engine.stages.teach.ask_teacher):
  `ensemble_answers` holds the teacher's answer first, then each member's, and
  `conf_teacher_agreement` is the share of all the teachers whose normalised answer equals the
  teacher's (a mining measure);
- with the teacher's tokenizer (the same vocabulary) and its weights here (backend transformers),
  also reads the teacher's response teacher-forced (engine/teachers/forced.py). The row's top-k
  then become the weighted mixture of the teachers' distributions (mix_topk), and token_logprobs
  the mixture's log-prob of each chosen token. A member with another tokenizer, or a server (an
  openai member scores no response it did not write), gives answers only; `validate` says which.

Answers and scorings are cached per request, so a re-run pays for neither.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine.errors import ModelError, SpecError
from engine.progress import progress_bar
from engine.stages.base import RunContext, Stage, dump, no_rejections
from engine.teachers import context_teacher, teacher_fingerprint
from engine.teachers.answers import normalise_answer, split_answer
from engine.teachers.arrow import list_column, nested_list_column
from engine.teachers.forced import forced_key, forced_outputs
from engine.teachers.request_cache import TeacherCache, request_key

CHUNK = 2048  # rows mixed at a time: one chunk of every member's scorings is in memory, never all rows'
TOKEN_COLUMNS = ("token_logprobs", "topk_ids", "topk_logprobs")


# --- which member gives what -----------------------------------------------------------


@dataclass(frozen=True)
class Role:
    index: int
    member: object  # spec.Member, resolved against the teacher
    logits: bool  # its top-k join the targets (else: answers only)
    why: str = ""  # answers only: the reason

    @property
    def name(self) -> str:
        return f"ensemble.members[{self.index}] (model {self.member.model})"

    def note(self) -> str:
        """What `validate` says of the member."""
        if self.logits:
            weight = f"{self.member.weight:g}"
            return f"{self.name}: the teacher's tokenizer — its top-k join the logit targets (weight {weight})"
        return f"{self.name}: {self.why} — its answers count towards teacher_agreement, not the logit targets"


def member_roles(spec) -> list[Role]:
    """Each member and what it gives; SpecError naming the field when a tokenizer cannot be read."""
    teacher_field = "teacher.model" if spec.teacher.backend == "transformers" else "teacher.tokenizer"
    teacher_vocab = _vocab(spec, spec.teacher.local_model, teacher_field)
    roles = []
    for i, member in enumerate(spec.ensemble.resolved(spec.teacher)):
        if member.backend != "transformers":
            roles.append(Role(i, member, False, f"backend {member.backend} (a server scores no response it did not "
                                                "write)"))
        elif _vocab(spec, member.model, f"ensemble.members[{i}].model") != teacher_vocab:
            roles.append(Role(i, member, False, "another tokenizer than the teacher's"))
        else:
            roles.append(Role(i, member, True))
    return roles


def _vocab(spec, name: str, field: str) -> dict:
    from engine.models import load_tokenizer

    try:
        return load_tokenizer(name).get_vocab()  # token -> id: equal vocabularies, equal ids
    except (ModelError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpecError(f"{spec.path or '<spec>'}: {field}: {first}") from None


def member_spec(spec, member):
    """The spec with the member in the teacher's place: what teach's functions read."""
    return spec.model_copy(update={"teacher": member})


# --- the measures ------------------------------------------------------------------------


def teacher_agreement(answers: list[str | None], labels=frozenset()) -> float | None:
    """Share of the teachers (the first is the primary) whose normalised answer equals the primary's.

    A missing answer (no answer marker, or a member that could not be asked) agrees with nothing,
    so a primary without an answer has agreement 0."""
    if not answers:
        return None
    if answers[0] is None:
        return 0.0
    target = normalise_answer(answers[0], labels)
    return sum(a is not None and normalise_answer(a, labels) == target for a in answers) / len(answers)


def mix_topk(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], weights: list[np.ndarray],
             k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The weighted mixture of teachers' distributions over the same N token positions.

    parts: per teacher (top-k ids [N, k_i], their log-probs [N, k_i], log-prob of the chosen token [N]);
    weights: per teacher, its weight at each position [N] (0 where it gave nothing for that row).
    Returns the mixture's top-k ids [N, k] (int32), log-probs [N, k] (float16) and chosen log-probs [N]
    (float32). p_mix(id) = sum_i w_i p_i(id) / sum_i w_i over the union of the teachers' top-k ids; an id
    outside a teacher's top-k counts 0 from it, so each value is a lower bound of the true mixture, and
    the mass they miss is the trainer's tail bucket. The chosen token's log-prob is exact: each teacher's
    is over its whole vocabulary.
    """
    total = np.sum(weights, axis=0).astype(np.float64)  # [N]
    n = len(total)
    ids = np.concatenate([p[0] for p in parts], axis=1).astype(np.int64)
    mass = np.concatenate([w[:, None] * np.exp(p[1].astype(np.float64)) for p, w in zip(parts, weights)], axis=1)
    mass /= total[:, None]
    chosen = sum(w * np.exp(p[2].astype(np.float64)) for p, w in zip(parts, weights)) / total
    # Sum the mass of equal ids at each position (an id in several teachers' top-k), then rank.
    span = int(ids.max(initial=0)) + 1
    rows = np.repeat(np.arange(n), ids.shape[1])
    keys, inverse = np.unique(rows * span + ids.ravel(), return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=mass.ravel(), minlength=len(keys))
    key_rows, key_ids = keys // span, keys % span
    order = np.lexsort((-summed, key_rows))  # by position, then most mass first
    key_rows, key_ids, summed = key_rows[order], key_ids[order], summed[order]
    rank = np.arange(len(keys)) - np.searchsorted(key_rows, key_rows)  # place within its position
    top = rank < k
    # A position with fewer than k distinct ids is padded as the trainer pads: its top id, log-prob -inf.
    out_ids = np.repeat(key_ids[rank == 0][:, None], k, axis=1) if n else np.zeros((0, k), np.int64)
    out_mass = np.zeros((n, k))
    out_ids[key_rows[top], rank[top]] = key_ids[top]
    out_mass[key_rows[top], rank[top]] = summed[top]
    with np.errstate(divide="ignore"):
        return out_ids.astype(np.int32), np.log(out_mass).astype(np.float16), np.log(chosen).astype(np.float32)


# --- the stage ---------------------------------------------------------------------------


class Ensemble(Stage):
    name = "ensemble"
    order = 62  # after teach (its answers are needed), before confidence reads the top-k
    cached = True
    calls_teacher = False  # plan counts the members' calls itself (member_calls)
    drops_rows = False
    top_up = "new_rows"

    @classmethod
    def wanted(cls, spec) -> bool:
        return getattr(spec, "ensemble", None) is not None

    def cache_slice(self, spec, store):
        members = spec.ensemble.resolved(spec.teacher)  # templates' text is in the dump
        return {"weight": spec.ensemble.weight, "top_k": spec.teacher.logprobs.top_k,
                "members": [[dump(m), teacher_fingerprint(m)] for m in members]}

    def run_new_rows(self, batch: pl.DataFrame, kept: pl.DataFrame, ctx: RunContext):
        """Top-up rows: answers are normalised against the labels of every row so far."""
        return self.run(batch, ctx, labels=_labels(kept) | _labels(batch))

    def run(self, frame: pl.DataFrame, ctx: RunContext, labels: frozenset | None = None):
        spec = ctx.spec
        roles = member_roles(spec)
        labels = _labels(frame) if labels is None else labels
        responses = [np.asarray(ids, np.int32) for ids in frame["token_ids"].to_list()]
        # A response with a token the teacher's tokenizer could not map (id -1, openai) cannot be read back.
        readable = [bool(len(r) == 0 or r.min() >= 0) for r in responses]
        answers, scored, member_stats = [frame["answer"].to_list()], {}, []
        for role in roles:
            member_answers, prompts, stats = _ask_member(role, frame, ctx, responses, readable)
            answers.append(member_answers)
            member_stats.append(stats)
            if role.logits:
                scored[role.index] = prompts
        per_row = [list(a) for a in zip(*answers)]
        out = frame.with_columns(
            ensemble_answers=pl.Series(per_row, dtype=pl.List(pl.String)),
            conf_teacher_agreement=pl.Series([teacher_agreement(a, labels) for a in per_row], dtype=pl.Float64))
        if scored:
            out = _mixed(out, roles, scored, responses, readable, ctx)
        calls = sum(s["answer_calls"] + s["scoring_calls"] for s in member_stats)
        ctx.counters["teacher_calls"] = ctx.counters.get("teacher_calls", 0) + calls
        agreement = out["conf_teacher_agreement"].mean() if out.height else None
        stats = {"rows": frame.height, "teacher_calls": calls, "logit_members": len(scored),
                 "answer_members": len(roles) - len(scored), "members": member_stats,
                 "agreement_mean": None if agreement is None else round(float(agreement), 4)}
        if scored and not all(readable):
            stats["rows_teacher_only"] = readable.count(False)  # targets left as the teacher's own
        return out, no_rejections(), stats


def _labels(frame: pl.DataFrame) -> frozenset:
    """The gold answers the rows carry: answers are compared on the label they name, where known."""
    if "label" not in frame.columns:
        return frozenset()
    return frozenset(v for v in frame["label"].to_list() if v is not None)


def _ask_member(role: Role, frame: pl.DataFrame, ctx: RunContext, responses, readable):
    """One member's answers to the rows (None where its prompt could not render) and, for a logit
    member, its scorings of the teacher's responses, both cached; the member is unloaded after."""
    from engine.stages.teach import ask_teacher, render_teacher_prompts

    member = role.member
    sub = RunContext(spec=member_spec(ctx.spec, member), cache_dir=ctx.cache_dir, progress=ctx.progress,
                     store=ctx.store)
    prompts, _ = render_teacher_prompts(frame, sub.spec)
    asked = [i for i, p in enumerate(prompts) if p is not None]
    outputs, answer_calls = ask_teacher(sub, [prompts[i] for i in asked], f"ensemble[{role.index}]")
    marker = member.reasoning.answer_marker if member.reasoning else None
    answers: list[str | None] = [None] * frame.height
    for i, out in zip(asked, outputs):
        answers[i] = split_answer(out.text, marker)[1]
    del outputs
    scoring_calls = 0
    if role.logits:
        rows = [i for i in asked if readable[i]]
        scoring_calls = _score_member(sub, [prompts[i] for i in rows], [responses[i] for i in rows],
                                      ctx.spec.teacher.logprobs.top_k, f"ensemble[{role.index}] scoring")
    for key in ("teacher_seconds", "teacher_load_seconds"):
        if key in sub.counters:
            ctx.counters[key] = ctx.counters.get(key, 0.0) + sub.counters[key]
    sub.teacher = None  # one member in memory at a time
    gc.collect()
    stats = {"member": role.name, "gives": "answers and top-k" if role.logits else "answers",
             "answer_calls": answer_calls, "scoring_calls": scoring_calls}
    if len(asked) < frame.height:
        stats["render_limit"] = frame.height - len(asked)  # rows it could not be asked: no answer
    return answers, prompts, stats


def _score_member(sub: RunContext, prompts: list, responses: list, k: int, label: str) -> int:
    """Score the responses under the member (sub.teacher, loaded on the first row not cached), keeping
    the teacher's top-k width (k)."""
    member = sub.spec.teacher

    def load():
        loaded = context_teacher(sub)  # sub.spec.teacher is the member
        return loaded.model, loaded.tokenizer

    calls = 0
    with progress_bar(sub.progress) as bar:
        task = bar.add_task(label, total=len(prompts))
        for start in range(0, len(prompts), CHUNK):  # nothing kept: _mixed reads them back a chunk at a time
            _, new = forced_outputs(sub.cache_dir, teacher_fingerprint(member), prompts[start : start + CHUNK],
                                    responses[start : start + CHUNK], k, load,
                                    member.batch_size, on_batch=lambda n: bar.advance(task, n))
            calls += new
            bar.update(task, completed=min(start + CHUNK, len(prompts)))
    return calls


def _mixed(frame: pl.DataFrame, roles: list[Role], scored: dict, responses, readable, ctx: RunContext):
    """The rows with their top-k and token_logprobs replaced by the teachers' mixture."""
    spec = ctx.spec
    k = spec.teacher.logprobs.top_k
    columns = {c: [] for c in TOKEN_COLUMNS}
    for start in range(0, frame.height, CHUNK):
        rows = range(start, min(start + CHUNK, frame.height))
        parts, weights = [_stored(frame.slice(start, len(rows)))], [spec.ensemble.weight]
        for role in roles:
            if role.index in scored:
                part, weight = _member_part(role, scored[role.index], rows, responses, readable, k, ctx)
                parts.append(part)
                weights.append(weight)
        lengths = [len(responses[i]) for i in rows]
        weights = [np.full(sum(lengths), w) if np.isscalar(w) else w for w in weights]
        ids, lps, chosen = mix_topk(parts, weights, k)
        cuts = np.cumsum(lengths)[:-1]
        columns["topk_ids"] += np.split(ids, cuts)
        columns["topk_logprobs"] += np.split(lps, cuts)
        columns["token_logprobs"] += np.split(chosen, cuts)
    mixed = pa.table({"token_logprobs": list_column(columns["token_logprobs"], np.float32),
                      "topk_ids": nested_list_column(columns["topk_ids"], np.int32),
                      "topk_logprobs": nested_list_column(columns["topk_logprobs"], np.float16)})
    return pl.concat([frame.drop(TOKEN_COLUMNS), pl.from_arrow(mixed)], how="horizontal").select(frame.columns)


def _stored(chunk: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's own targets of a chunk of rows, flattened over their token positions."""
    top_ids = chunk["topk_ids"].to_arrow().flatten()
    top_lps = chunk["topk_logprobs"].to_arrow().flatten()
    width = top_ids.value_lengths().to_numpy(zero_copy_only=False)
    k = int(width[0]) if len(width) else 1
    if len(width) and (width != k).any():
        raise ValueError("the teacher's stored top-k have rows of different widths: re-run the teach stage")
    return (top_ids.flatten().to_numpy().reshape(-1, k), top_lps.flatten().to_numpy().reshape(-1, k),
            chunk["token_logprobs"].to_arrow().flatten().to_numpy())


def _member_part(role: Role, prompts: list, rows: range, responses, readable, k: int, ctx: RunContext):
    """A member's scorings over a chunk of rows (all cached by now), with weight 0 at rows it did not score."""
    member = role.member
    mine = [i for i in rows if prompts[i] is not None and readable[i]]

    def absent():
        raise RuntimeError(f"{role.name}: a scoring missing from the cache after scoring")

    outputs = dict(zip(mine, forced_outputs(ctx.cache_dir, teacher_fingerprint(member), [prompts[i] for i in mine],
                                            [responses[i] for i in mine], k, absent)[0]))
    ids, lps, chosen, weight = [], [], [], []
    for i in rows:
        n, out = len(responses[i]), outputs.get(i)
        ids.append(out.topk_ids if out else np.zeros((n, k), np.int32))
        lps.append(out.topk_logprobs if out else np.full((n, k), -np.inf, np.float16))
        chosen.append(out.token_logprobs if out else np.zeros(n, np.float32))
        weight.append(np.full(n, member.weight if out else 0.0))
    return (np.concatenate(ids), np.concatenate(lps), np.concatenate(chosen)), np.concatenate(weight)


# --- plan ----------------------------------------------------------------------------------


def member_calls(spec, frame: pl.DataFrame | None, cache_dir) -> list[dict]:
    """For `plan`: per member, the prompts it is asked over `frame` (the ensemble's input, or the
    teach stage's when that is all there is; None: the ensemble stage is cached), the answers still to
    pay and, for a logit member, the scorings still to pay (None: not known before the teacher answers)."""
    from engine.stages.teach import generation_params, render_teacher_prompts

    roles = member_roles(spec)
    found = []
    cache = TeacherCache(cache_dir / "teacher.sqlite")
    try:
        for role in roles:
            mspec = member_spec(spec, role.member)
            fingerprint = teacher_fingerprint(role.member)
            prompts = [] if frame is None else render_teacher_prompts(frame, mspec)[0]
            keys = {request_key(fingerprint, generation_params(mspec), p) for p in prompts if p is not None}
            cached = set(cache.get_many(sorted(keys)))
            entry = {"member": role.name, "prompts": None if frame is None else len(keys),
                     "answers": len(keys - cached)}
            if role.logits:
                entry["scorings"] = _scorings_to_pay(cache, fingerprint, spec, frame, prompts)
            found.append(entry)
    finally:
        cache.close()
    return found


def _scorings_to_pay(cache: TeacherCache, fingerprint: str, spec, frame, prompts) -> int | None:
    if frame is None:
        return 0
    if "token_ids" not in frame.columns:
        return None  # the teacher has not answered yet
    k = spec.teacher.logprobs.top_k
    keys = {forced_key(fingerprint, k, p, np.asarray(ids, np.int32))
            for p, ids in zip(prompts, frame["token_ids"].to_list()) if p is not None and min(ids, default=0) >= 0}
    return len(keys - set(cache.get_many(sorted(keys))))
