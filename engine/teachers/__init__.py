"""Teacher backends behind one protocol.

A teacher turns prompts into generations that carry, for every generated token,
the chosen id, its log-probability and the teacher's top-k ids and log-probs from
the raw T=1 distribution (what the trainer distils from).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


@dataclass
class TeacherOutput:
    text: str
    token_ids: np.ndarray  # int32 [n]
    token_logprobs: np.ndarray  # float32 [n]: log p(chosen token) at T=1
    topk_ids: np.ndarray  # int32 [n, k], most probable first
    topk_logprobs: np.ndarray  # float16 [n, k], raw T=1 log-probs
    finish_reason: str | None = None  # "stop": ended by itself (eos); "length": hit max_new_tokens
    # Tokens a server named that the teacher's tokenizer could not map to one id (backend openai):
    # a chosen one is stored as id -1, an alternative as an absent top-k slot (-inf). Not cached.
    unmapped_tokens: int = 0


class Teacher(Protocol):
    fingerprint: str  # identity of weights + backend, recorded in lineage and cache keys
    tokenizer: object

    def generate(self, prompts: list, on_batch: Callable[[list[int], list[TeacherOutput]], None] | None = None,
                 max_new_tokens: int | None = None) -> list[TeacherOutput]:
        """One output per prompt, in order; on_batch(indices into prompts, their outputs) after each batch.

        A prompt is an engine.prompts.Conversation (chat or plain text, system message, turns) or a
        text, which is one chat user turn."""


def teacher_fingerprint(spec_teacher) -> str:
    """Backend + weights identity, known without loading the model (nor reaching a server).

    backend openai: the server's host and path, the served model's name and the tokenizer that
    maps its tokens to ids; never the key (nor the variable holding it, nor the URL's scheme).
    A pool (base_url: a list) serves one model from every endpoint (checked when it loads), so
    which endpoints serve it is no part of what it answers: "pool" stands for them.
    """
    from engine.models import fingerprint

    if spec_teacher.backend == "openai":
        from urllib.parse import urlsplit

        if isinstance(spec_teacher.base_url, list):
            where = "pool"
        else:
            url = urlsplit(spec_teacher.base_url)
            where = f"{url.hostname}{f':{url.port}' if url.port else ''}{url.path.rstrip('/')}"
        found = f"openai:{where}/{spec_teacher.model}+tokenizer:{fingerprint(spec_teacher.tokenizer)}"
        if spec_teacher.extra_body:  # a server's own sampling options change its answers
            extra = json.dumps(spec_teacher.extra_body, sort_keys=True, ensure_ascii=False)
            found += f"+extra:{hashlib.sha256(extra.encode()).hexdigest()[:16]}"
        return found
    return f"{spec_teacher.backend}:{fingerprint(spec_teacher.model)}"


def context_teacher(ctx) -> Teacher:
    """The run's loaded teacher (ctx.teacher; ctx.spec.teacher loaded on first use), its load time counted
    in ctx.counters["teacher_load_seconds"], where a run's time in the teacher is summed."""
    if ctx.teacher is None:
        import time

        began = time.perf_counter()
        ctx.teacher = load_teacher(ctx.spec.teacher)
        ctx.counters["teacher_load_seconds"] = ctx.counters.get("teacher_load_seconds", 0.0) + \
            time.perf_counter() - began
    return ctx.teacher


def load_teacher(spec_teacher) -> Teacher:
    if spec_teacher.backend == "transformers":
        from engine.teachers.transformers_backend import TransformersTeacher

        return TransformersTeacher(spec_teacher)
    if spec_teacher.backend == "openai":
        from engine.teachers.openai_backend import OpenAITeacher

        return OpenAITeacher(spec_teacher)
    raise ValueError(f"unknown teacher backend {spec_teacher.backend!r}")
