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


# --- sampling (temperature > 0) ---------------------------------------------------------


def sampling_spec(tiny_llm_dir, **generation):
    return Teacher(model=str(tiny_llm_dir), generation={"max_new_tokens": 8, **generation},
                   logprobs={"top_k": 5}, batch_size=2)


def token_lists(outputs) -> list[list[int]]:
    return [o.token_ids.tolist() for o in outputs]


def test_seeded_sampling_is_reproducible_and_differs_from_greedy_and_other_seeds(tiny_llm_dir):
    greedy = token_lists(load_teacher(sampling_spec(tiny_llm_dir)).generate(PROMPTS))
    teacher = load_teacher(sampling_spec(tiny_llm_dir, temperature=1.0, seed=0))
    first = teacher.generate(PROMPTS)
    again = teacher.generate(PROMPTS)  # the same teacher, called again: the seed is re-applied
    fresh = load_teacher(sampling_spec(tiny_llm_dir, temperature=1.0, seed=0)).generate(PROMPTS)
    assert token_lists(first) == token_lists(again) == token_lists(fresh)
    for a, b in zip(first, fresh):
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        assert a.text == b.text
    other_seed = token_lists(load_teacher(sampling_spec(tiny_llm_dir, temperature=1.0, seed=1)).generate(PROMPTS))
    assert token_lists(first) != greedy and token_lists(first) != other_seed and other_seed != greedy
    # Sampled, not greedy: somewhere a token other than the most probable one was chosen.
    assert any((o.topk_ids[:, 0] != o.token_ids).any() for o in first)


def test_top_p_is_honoured(tiny_llm_dir):
    """A nucleus this small holds only the likeliest token: sampling at any temperature is greedy."""
    greedy = token_lists(load_teacher(sampling_spec(tiny_llm_dir)).generate(PROMPTS))
    nucleus = load_teacher(sampling_spec(tiny_llm_dir, temperature=2.0, top_p=1e-6, seed=3)).generate(PROMPTS)
    assert token_lists(nucleus) == greedy


def test_sampled_logprobs_are_the_raw_t1_distribution(tiny_llm_dir):
    """At temperature 2 the chosen tokens come from the tempered distribution, but what is stored
    (and what students distil from) is the model's untempered T=1 distribution at each step."""
    spec = sampling_spec(tiny_llm_dir, temperature=2.0, seed=0)
    model, tokenizer = load_causal_lm(spec.model)
    outputs = load_teacher(spec).generate(PROMPTS)
    for prompt, out in zip(PROMPTS, outputs):
        ids = chat_prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            logits = model(torch.tensor([ids + out.token_ids.tolist()])).logits[0].float()
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)]
        t1 = torch.log_softmax(steps, -1)
        top_lp, top_ids = t1.topk(5, dim=-1)
        np.testing.assert_allclose(out.topk_logprobs.astype(np.float32), top_lp.numpy(), atol=1e-2)
        assert (out.topk_ids == top_ids.numpy()).all()
        chosen = t1.gather(-1, torch.tensor(out.token_ids, dtype=torch.long).unsqueeze(-1)).squeeze(-1)
        np.testing.assert_allclose(out.token_logprobs, chosen.numpy(), atol=1e-4)
        tempered = torch.log_softmax(steps / 2.0, -1).topk(5, dim=-1).values
        assert not np.allclose(out.topk_logprobs.astype(np.float32), tempered.numpy(), atol=1e-2)


def test_the_answer_cache_keys_on_the_sampling_seed(tmp_path, tiny_llm_dir):
    def teach(seed):
        class Spec:
            teacher = sampling_spec(tiny_llm_dir, temperature=1.0, seed=seed)

        frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in PROMPTS], "prompt": PROMPTS})
        kept, _, stats = Teach().run(frame, RunContext(spec=Spec, cache_dir=tmp_path, progress=False))
        return kept, stats["teacher_calls"]

    seed0, calls = teach(0)
    assert calls == 3
    again, calls = teach(0)
    assert calls == 0 and again.equals(seed0)
    seed1, calls = teach(1)
    assert calls == 3  # another seed is another sample, not the cached one
    assert seed1["token_ids"].to_list() != seed0["token_ids"].to_list()
