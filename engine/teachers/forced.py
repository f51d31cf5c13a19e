"""Teacher-forced scoring: a model's distribution over a response it did not write.

An ensemble member with the teacher's tokenizer reads its own prompt followed by the teacher's
response ids in one forward pass. At each response position it gives the log-prob of the token the
teacher chose and its own top-k: the raw T=1 distribution, in float32 as generation computes it.
Results go to the teacher request cache, keyed by the member's fingerprint, the prompt and the
response ids, so a re-run or a resumed run pays nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch

from engine.prompts import prompt_ids
from engine.teachers import TeacherOutput
from engine.teachers.request_cache import TeacherCache, request_key

FORCED = "forced"  # finish_reason of a cached scoring: it was read, not generated


def forced_key(fingerprint: str, top_k: int, prompt, response_ids: np.ndarray) -> str:
    """The request cache's key of one scoring: the response ids stand where generation parameters would."""
    digest = hashlib.sha256(np.asarray(response_ids, dtype=np.int32).tobytes()).hexdigest()
    return request_key(fingerprint, {"teacher_forced": digest, "top_k": top_k}, prompt)


@torch.inference_mode()
def score_forced(model, tokenizer, prompts: list, responses: list[np.ndarray], top_k: int,
                 batch_size: int = 8) -> list[TeacherOutput]:
    """Per (prompt, response ids): log p(response[j] | prompt, response[:j]) and the top-k at each j.

    Batches are padded on the left with explicit position ids, as generation runs them, and only the
    response positions go through the output head (logits_to_keep), which bounds memory by the
    response length, not the prompt's.
    """
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]) + len(responses[i]))
    outputs: list[TeacherOutput | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        scored = _score_batch(model, tokenizer, [encoded[i] for i in batch], [responses[i] for i in batch], top_k)
        for i, out in zip(batch, scored):
            outputs[i] = out
    return outputs  # type: ignore[return-value]


def _score_batch(model, tokenizer, prompts: list[list[int]], responses: list[np.ndarray], top_k: int):
    keep = max(len(r) for r in responses)
    if keep == 0:
        return [_output(np.zeros(0, np.int32), torch.zeros(0, 1), top_k) for _ in responses]
    logprobs = continuation_logprobs(model, tokenizer, prompts, [[int(t) for t in r] for r in responses])
    # Row b's predictions are its last len(response) positions: all rows end together.
    return [_output(np.asarray(r, np.int32), logprobs[b, keep - len(r):], top_k) for b, r in enumerate(responses)]


def continuation_logprobs(model, tokenizer, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """Teacher-forced log-probs, float32 on the CPU, [batch, keep, vocab] with keep the longest continuation:
    row b's last len(continuations[b]) positions predict its continuation's tokens (all rows end together)."""
    keep = max(len(c) for c in continuations)
    seqs = [p + c[:-1] for p, c in zip(prompts, continuations)]  # the last token is predicted, never read
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _output(response: np.ndarray, logprobs: torch.Tensor, top_k: int) -> TeacherOutput:
    if not len(response):
        return TeacherOutput("", response, np.zeros(0, np.float32), np.zeros((0, top_k), np.int32),
                             np.zeros((0, top_k), np.float16), finish_reason=FORCED)
    top_lp, top_ids = logprobs.topk(top_k, dim=-1)
    chosen = logprobs.gather(-1, torch.from_numpy(response.astype(np.int64)).unsqueeze(-1)).squeeze(-1)
    return TeacherOutput("", response, chosen.numpy().astype(np.float32), top_ids.numpy().astype(np.int32),
                         top_lp.numpy().astype(np.float16), finish_reason=FORCED)


def forced_outputs(cache_dir, fingerprint: str, prompts: list, responses: list[np.ndarray], top_k: int,
                   load: Callable[[], tuple], batch_size: int = 8,
                   on_batch: Callable[[int], None] | None = None) -> tuple[list[TeacherOutput], int]:
    """Scorings of each (prompt, response), from the cache where they are there; `load()` gives
    (model, tokenizer) and is called only when some are not. Returns (outputs in order, new scorings).
    Each batch is committed as soon as it is scored, so an interrupt loses at most the batch in flight."""
    keys = [forced_key(fingerprint, top_k, p, r) for p, r in zip(prompts, responses)]
    cache = TeacherCache(cache_dir / "teacher.sqlite")
    try:
        found = cache.get_many(keys)
        todo = sorted({k: i for i, k in enumerate(keys) if k not in found}.items())
        if todo:
            model, tokenizer = load()
        chunk = batch_size * 4  # a few batches at a time: score_forced sorts each chunk by length
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            scored = score_forced(model, tokenizer, [prompts[i] for _, i in part], [responses[i] for _, i in part],
                                  top_k, batch_size)
            fresh = {k: out for (k, _), out in zip(part, scored)}
            cache.put_many(fresh)
            found.update(fresh)
            if on_batch:
                on_batch(len(part))
    finally:
        cache.close()
    return [found[k] for k in keys], len(todo)
