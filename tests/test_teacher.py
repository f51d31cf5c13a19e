"""The transformers teacher on a tiny random model: top-k records and the answer cache."""

import numpy as np
import polars as pl
import pytest
import torch

from engine.models import chat_prompt_ids, load_causal_lm
from engine.spec import Teacher
from engine.stages.base import RunContext, prompt_id
from engine.stages.teach import Teach
from engine.teachers import load_teacher

PROMPTS = ["Is this good?", "Tell me a story about a very small cat.", "2+2="]


@pytest.fixture(scope="module")
def teacher_spec(tiny_llm_dir):
    return Teacher(model=str(tiny_llm_dir), generation={"max_new_tokens": 6}, logprobs={"top_k": 5}, batch_size=2)


def test_topk_records_are_valid_distributions(teacher_spec):
    outputs = load_teacher(teacher_spec).generate(PROMPTS)
    assert len(outputs) == len(PROMPTS)
    for out in outputs:
        n = len(out.token_ids)
        assert 1 <= n <= 6
        assert out.topk_ids.shape == out.topk_logprobs.shape == (n, 5)
        lp = out.topk_logprobs.astype(np.float32)
        assert (lp <= 0).all()
        assert (np.diff(lp, axis=1) <= 1e-3).all()  # most probable first
        assert (np.exp(lp).sum(axis=1) <= 1 + 1e-3).all()
        # greedy: the chosen token is the top-1 and its log-prob is recorded
        assert (out.topk_ids[:, 0] == out.token_ids).all()
        np.testing.assert_allclose(out.token_logprobs, lp[:, 0], atol=2e-3)


def test_stored_tokens_are_what_the_model_computes(teacher_spec):
    """Teacher-forcing the stored tokens reproduces the stored log-probs (batching changed nothing)."""
    model, tokenizer = load_causal_lm(teacher_spec.model)
    for prompt, out in zip(PROMPTS, load_teacher(teacher_spec).generate(PROMPTS)):
        ids = chat_prompt_ids(tokenizer, prompt)
        full = torch.tensor([ids + out.token_ids.tolist()])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).logits[0].float(), -1)
        steps = logprobs[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)]
        top_lp, top_ids = steps.topk(5, dim=-1)
        np.testing.assert_allclose(top_lp.numpy(), out.topk_logprobs.astype(np.float32), atol=1e-2)
        assert (top_ids[:, 0].numpy() == out.token_ids).all()


def test_teach_stage_caches_answers(tmp_path, teacher_spec):
    class Spec:
        teacher = teacher_spec

    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in PROMPTS], "prompt": PROMPTS})
    first_ctx = RunContext(spec=Spec, cache_dir=tmp_path, progress=False)
    first, _, stats = Teach().run(frame, first_ctx)
    assert stats["teacher_calls"] == 3 and first_ctx.teacher is not None
    again_ctx = RunContext(spec=Spec, cache_dir=tmp_path, progress=False)
    again, _, stats = Teach().run(frame, again_ctx)
    assert stats["teacher_calls"] == 0 and again_ctx.teacher is None  # not even loaded
    assert again.equals(first)
    assert first.schema["topk_logprobs"] == pl.List(pl.List(pl.Float16))
    assert first["teacher_prompt"].to_list() == PROMPTS
