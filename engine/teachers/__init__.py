"""Teacher backends behind one protocol.

A teacher turns prompts into generations that carry, for every generated token,
the chosen id, its log-probability and the teacher's top-k ids and log-probs from
the raw T=1 distribution (what the trainer distils from).
"""

from __future__ import annotations

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


class Teacher(Protocol):
    fingerprint: str  # identity of weights + backend, recorded in lineage and cache keys
    tokenizer: object

    def generate(self, prompts: list[str], on_batch: Callable[[int], None] | None = None,
                 max_new_tokens: int | None = None) -> list[TeacherOutput]: ...


def teacher_fingerprint(spec_teacher) -> str:
    """Backend + weights identity, known without loading the model."""
    from engine.models import fingerprint

    return f"{spec_teacher.backend}:{fingerprint(spec_teacher.model)}"


def load_teacher(spec_teacher) -> Teacher:
    if spec_teacher.backend == "transformers":
        from engine.teachers.transformers_backend import TransformersTeacher

        return TransformersTeacher(spec_teacher)
    raise ValueError(f"unknown teacher backend {spec_teacher.backend!r}")
