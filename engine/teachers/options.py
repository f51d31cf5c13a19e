"""Option scoring: the teacher's distribution over a fixed answer set (spec `options:`).

Each option is read right after the teacher's own prompt (the conversation the teach stage sends,
engine.prompts) and scored by its mean log-prob per token, so a long option is not penalised for its
length; a softmax over a row's options gives its option_probs. How depends on the backend:

- teacher_forced (transformers): one forward pass over the prompt ids followed by the option's ids,
  log-softmax in float32.
- prompt_logprobs (openai): `POST /completions` with the prompt text followed by the option,
  `echo: true, logprobs: 1`: the log-probs the server gives the echoed option tokens. Used only where
  a probe shows they are right: the echo of a prompt followed by the teacher's likeliest first token
  must give that token the log-prob the teacher gave it when it answered. (llama-cpp-python shifts
  echoed log-probs by one token when a prompt does not start with its BOS token; llama.cpp's own
  server and OpenAI's chat models give no prompt log-probs at all.) The verdict is cached per teacher.
- first_token (openai, otherwise): the teacher's stored top-k of its first answer token, the
  top_logprobs of a one-token answer that teach already paid for: each option scores the log-prob of
  its first token. An option whose first token is not in the top-k gets the top-k's lowest log-prob
  (counted as floored_options); options sharing their first token tie.

What follows the prompt: a chat answer starts right where the assistant's turn opens, so an option is
read as written; after a plain-text prompt that does not end in whitespace it is read with one space
before it (" positive" after "Sentiment:"), unless it starts with whitespace itself.

Each row's scores go to the teacher request cache under their own key (teacher, method, options,
conversation), so a re-run pays nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import TeacherError
from engine.prompts import Conversation, as_conversation, prompt_ids
from engine.teachers import TeacherOutput, context_teacher, teacher_fingerprint
from engine.teachers.forced import continuation_logprobs
from engine.teachers.request_cache import TeacherCache, request_key

TEACHER_FORCED, PROMPT_LOGPROBS, FIRST_TOKEN = "teacher_forced", "prompt_logprobs", "first_token"
PROBES = 3  # rows whose echo is checked against the teacher's own first-token log-prob
CHUNK_ROWS = 64  # rows scored between two cache commits: an interrupt loses at most these


def continuation(conversation: Conversation, option: str) -> str:
    """The text read after the prompt for `option` (see the module docstring)."""
    prompt = conversation.prompt
    if conversation.chat or not prompt or prompt[-1].isspace() or option[:1].isspace():
        return option
    return " " + option


def option_ids(tokenizer, conversation: Conversation, options: list[str]) -> list[list[int]]:
    """Each option's token ids as read after the conversation's prompt."""
    return [list(tokenizer(continuation(conversation, o), add_special_tokens=False)["input_ids"]) for o in options]


def option_probs(scores: np.ndarray) -> np.ndarray:
    """Softmax over a row's option scores (mean log-probs), in float64."""
    z = np.asarray(scores, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def prompt_text(tokenizer, conversation: Conversation) -> str:
    """The conversation as the plain text prompt_ids tokenizes (a chat through the chat template)."""
    if not conversation.chat or not tokenizer.chat_template:
        return conversation.prompt
    return tokenizer.apply_chat_template(conversation.messages(), add_generation_prompt=True, tokenize=False)


# --- teacher_forced ------------------------------------------------------------------------


@torch.inference_mode()
def teacher_forced_scores(model, tokenizer, prompts: list[list[int]], options: list[list[list[int]]],
                          batch_size: int = 8) -> list[np.ndarray]:
    """Per row, the mean log-prob per token of each option's ids right after the row's prompt ids.

    Sequences (one per row and option) are batched by length, padded on the left with explicit
    position ids as generation runs them; only the option positions go through the head. A row whose
    options are all one token long (labels such as "positive", "sports") is read once: the teacher's
    distribution right after its prompt holds every option's log-prob, so one pass scores them all.
    """
    single = [all(len(o) == 1 for o in opts) for opts in options]
    pairs = sorted(((r, j) for r, opts in enumerate(options) for j in range(1 if single[r] else len(opts))),
                   key=lambda rj: len(prompts[rj[0]]) + len(options[rj[0]][rj[1]]))
    scores = [np.zeros(len(opts), dtype=np.float64) for opts in options]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        logprobs = continuation_logprobs(model, tokenizer, [prompts[r] for r, _ in batch],
                                         [options[r][j] for r, j in batch])
        keep = logprobs.shape[1]
        for b, (r, j) in enumerate(batch):  # all rows end together: row b's predictions are its last positions
            if single[r]:
                ids = torch.tensor([o[0] for o in options[r]])
                scores[r][:] = logprobs[b, keep - 1].gather(-1, ids).double().numpy()
            else:
                o = options[r][j]
                scores[r][j] = float(logprobs[b, keep - len(o):].gather(-1, torch.tensor(o).unsqueeze(-1)).mean())
    return scores


# --- first_token ------------------------------------------------------------------------------


def first_token_scores(tokenizer, conversation: Conversation, options: list[str],
                       top_ids, top_logprobs) -> tuple[np.ndarray, int] | None:
    """(each option's first-token log-prob from the stored top-k, options floored), None without a top-k."""
    table: dict[int, float] = {}
    for i, lp in zip(top_ids, top_logprobs):
        if lp is not None and math.isfinite(lp) and int(i) not in table:
            table[int(i)] = float(lp)
    if not table:
        return None
    floor = min(table.values())
    firsts = [ids[0] for ids in option_ids(tokenizer, conversation, options)]
    return np.array([table.get(f, floor) for f in firsts]), sum(f not in table for f in firsts)


# --- the request cache ------------------------------------------------------------------------


def scores_key(fingerprint: str, method: str, conversation: Conversation, options: list[str]) -> str:
    return request_key(fingerprint, {"score_options": list(options), "method": method}, conversation)


def _as_output(method: str, scores: np.ndarray, tokens: list[int]) -> TeacherOutput:
    """A row's scores in the cache's record: the mean log-probs where an answer keeps its token log-probs."""
    return TeacherOutput(text=method, token_ids=np.asarray(tokens, dtype=np.int32),
                         token_logprobs=np.asarray(scores, dtype=np.float32),
                         topk_ids=np.zeros((0, 1), np.int32), topk_logprobs=np.zeros((0, 1), np.float16))


def _verdict_key(fingerprint: str) -> str:
    return request_key(fingerprint, {"option_scoring": "probe"}, "")


# --- one stage's scoring ----------------------------------------------------------------------


@dataclass
class Scored:
    scores: list[np.ndarray | None]  # per row, each option's score (None: the row could not be scored)
    method: str
    calls: int = 0  # forward passes or requests paid now (one per row and option)
    cached: int = 0  # rows whose scores came from the cache
    floored: int = 0  # first_token: options whose first token was outside the stored top-k
    fallback: int = 0  # prompt_logprobs: rows whose echo did not spell an option, scored by first_token


def score_options(ctx, conversations: list[Conversation], options: list[list[str]],
                  first_topk: list[tuple[list, list] | None]) -> Scored:
    """Every row's option scores. first_topk: per row, the teacher's stored top-k (ids, log-probs) of its
    first answer token, or None (the first_token method reads them)."""
    spec = ctx.spec
    if not conversations:  # nothing to score: no model, no server
        return Scored([], TEACHER_FORCED if spec.teacher.backend != "openai" else FIRST_TOKEN)
    fingerprint = teacher_fingerprint(spec.teacher)
    cache = TeacherCache(ctx.cache_dir / "teacher.sqlite")
    try:
        if spec.teacher.backend != "openai":
            return _cached(TEACHER_FORCED, ctx, cache, fingerprint, conversations, options, _forced_rows)
        method = _openai_method(ctx, cache, fingerprint, conversations, first_topk)
        if method == FIRST_TOKEN:
            return _first_tokens(ctx, conversations, options, first_topk)
        scored = _cached(PROMPT_LOGPROBS, ctx, cache, fingerprint, conversations, options, _echo_rows)
    finally:
        cache.close()
    missing = [i for i, s in enumerate(scored.scores) if s is None]
    if missing:  # the echo did not spell an option of these rows: their first tokens say it
        fallback = _first_tokens(ctx, [conversations[i] for i in missing], [options[i] for i in missing],
                                 [first_topk[i] for i in missing])
        for i, s in zip(missing, fallback.scores):
            scored.scores[i] = s
        scored.fallback, scored.floored = len(missing), fallback.floored
    return scored


def _tokenizer(ctx):
    from engine.models import load_tokenizer

    return ctx.teacher.tokenizer if ctx.teacher is not None else load_tokenizer(ctx.spec.teacher.local_model)


def _count(ctx, counter: str, seconds: float) -> None:
    """Teacher time, as the teach stage counts its own: what a run spends in the teacher, not around it."""
    ctx.counters[counter] = ctx.counters.get(counter, 0.0) + seconds


def _cached(method, ctx, cache, fingerprint, conversations, options, compute) -> Scored:
    """Scores from the cache, the rest computed `CHUNK_ROWS` rows at a time and committed as they come."""
    from engine.progress import progress_bar

    keys = [scores_key(fingerprint, method, c, o) for c, o in zip(conversations, options)]
    # An empty record: the server's echo did not spell an option of the row (kept, so it is not asked again).
    found = {k: out.token_logprobs.astype(np.float64) for k, out in cache.get_many(keys).items()}
    todo = list({k: i for i, k in enumerate(keys) if k not in found}.values())
    scored = Scored([None] * len(keys), method, cached=len(keys) - len(todo))
    with progress_bar(ctx.progress and bool(todo)) as bar:
        task = bar.add_task("options", total=len(todo))
        for start in range(0, len(todo), CHUNK_ROWS):
            part = todo[start : start + CHUNK_ROWS]
            fresh = compute(ctx, [conversations[i] for i in part], [options[i] for i in part])
            cache.put_many({keys[i]: _as_output(method, np.zeros(0) if s is None else s, n)
                            for i, (s, n) in zip(part, fresh)})
            for i, (s, _) in zip(part, fresh):  # as the cache holds them (float32): a re-run gives the same probs
                found[keys[i]] = np.zeros(0) if s is None else s.astype(np.float32).astype(np.float64)
            scored.calls += sum(len(options[i]) for i in part)
            bar.advance(task, len(part))
    scored.scores = [found[k] if len(found[k]) else None for k in keys]
    return scored


def _forced_rows(ctx, conversations, options) -> list[tuple[np.ndarray, list[int]]]:
    teacher = context_teacher(ctx)
    tokenizer = teacher.tokenizer
    ids = [option_ids(tokenizer, c, o) for c, o in zip(conversations, options)]
    prompts = [prompt_ids(tokenizer, c) for c in conversations]
    began = time.perf_counter()
    scores = teacher_forced_scores(teacher.model, tokenizer, prompts, ids, ctx.spec.teacher.batch_size)
    _count(ctx, "teacher_seconds", time.perf_counter() - began)
    return [(s, [len(x) for x in row]) for s, row in zip(scores, ids)]


def _echo_rows(ctx, conversations, options) -> list[tuple[np.ndarray | None, list[int]]]:
    teacher = context_teacher(ctx)
    texts = [prompt_text(teacher.tokenizer, c) for c in conversations]
    pairs = [(t, continuation(c, o)) for t, c, opts in zip(texts, conversations, options) for o in opts]
    began = time.perf_counter()
    got = iter(teacher.prompt_logprobs(pairs))
    _count(ctx, "teacher_seconds", time.perf_counter() - began)
    out = []
    for opts in options:
        row = [next(got) for _ in opts]
        if any(r is None for r in row):
            out.append((None, []))
        else:
            out.append((np.array([total / n for total, n in row]), [n for _, n in row]))
    return out


def _first_tokens(ctx, conversations, options, first_topk) -> Scored:
    tokenizer = _tokenizer(ctx)
    scored = Scored([], FIRST_TOKEN)
    for conversation, opts, top in zip(conversations, options, first_topk):
        found = first_token_scores(tokenizer, conversation, opts, *top) if top is not None else None
        scored.scores.append(None if found is None else found[0])
        scored.floored += 0 if found is None else found[1]
    return scored


def _openai_method(ctx, cache, fingerprint, conversations, first_topk) -> str:
    """prompt_logprobs where the server's echoed log-probs agree with its answers' (cached), else first_token."""
    key = _verdict_key(fingerprint)
    known = cache.get_many([key])
    if key in known:
        return known[key].text
    teacher = context_teacher(ctx)
    probes = []  # (prompt text, the teacher's likeliest first token, its log-prob when it answered)
    special = set(teacher.tokenizer.all_special_ids)
    for conversation, top in zip(conversations, first_topk):
        if top is None or not len(top[0]) or int(top[0][0]) in special or not math.isfinite(top[1][0]):
            continue
        token = teacher.tokenizer.decode([int(top[0][0])])
        if token.strip():
            probes.append((prompt_text(teacher.tokenizer, as_conversation(conversation)), token, float(top[1][0])))
        if len(probes) == PROBES:
            break
    try:
        echoed = teacher.prompt_logprobs([(text, token) for text, token, _ in probes]) if probes else []
    except TeacherError:  # the server refuses echo (HTTP 4xx) or failed: not cached, a later run asks again
        return FIRST_TOKEN
    # Conclusive: the token came back as one token. The stored log-prob is float16: a little slack.
    agree = [abs(e[0] - lp) <= 0.05 + 0.02 * abs(lp) for e, (_, _, lp) in zip(echoed, probes)
             if e is not None and e[1] == 1]
    method = PROMPT_LOGPROBS if agree and all(agree) else FIRST_TOKEN
    cache.put_many({key: _as_output(method, np.zeros(0), [])})
    return method
