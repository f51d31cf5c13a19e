"""The transformers teacher's speed paths and its device, on the tiny random model.

A prompt prefix every prompt shares is run once and its key/value cache reused: answers are the ones
the plain path gives (greedy tokens identical, log-probs equal within float tolerance), sampled ones
too. The teach stage hands everything to be asked to the teacher at once, which batches prompts of like
length across all of it and commits each batch as it is answered. teacher.device is validated, a CUDA
device this machine lacks stops the teacher before it loads, and the device is not in the fingerprint.
"""

import numpy as np
import pytest
import torch

from engine.errors import SpecError
from engine.models import load_causal_lm
from engine.prompts import Conversation, prompt_ids
from engine.spec import Teacher, parse_spec
from engine.stages.base import RunContext
from engine.stages.teach import ask_teacher, generation_params
from engine.teachers import teacher_fingerprint
from engine.teachers.prefix import MIN_PREFIX, shared_prefix
from engine.teachers.request_cache import TeacherCache, request_key
from engine.teachers.transformers_backend import TransformersTeacher

INSTRUCTION = ("You label film reviews. Read the review, decide whether its writer liked the film, and answer "
               "with exactly one word, positive or negative, and nothing else.")
FEW_SHOT = (("system", INSTRUCTION), ("user", "Dull and far too long."), ("assistant", "negative"))
REVIEWS = ["Great film.", "I hated every minute of this long, loud and boring movie.", "ok", "Loved the music!",
           "meh", "A quiet triumph: the best thing its director has made in a decade, and the cast is superb."]
SHARED = [Conversation(r, turns=FEW_SHOT) for r in REVIEWS]  # a context-distillation prompt: mostly shared
UNSHARED = [Conversation(r, chat=False) for r in REVIEWS]  # plain text: nothing in common


def spec(model_dir, **fields) -> Teacher:
    generation = {"max_new_tokens": 8, **fields.pop("generation", {})}
    return Teacher(model=str(model_dir), generation=generation, logprobs={"top_k": 5}, batch_size=2, **fields)


def assert_same_rows(got, want, atol=1e-3):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        assert (a.topk_ids == b.topk_ids).all()
        np.testing.assert_allclose(a.topk_logprobs.astype(np.float32), b.topk_logprobs.astype(np.float32), atol=atol)
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=atol)


@pytest.fixture(scope="module")
def teachers(tiny_llm_dir):
    """(with the prefix cache, without it), greedy."""
    return TransformersTeacher(spec(tiny_llm_dir)), TransformersTeacher(spec(tiny_llm_dir), prefix_cache=False)


# --- the shared prefix ----------------------------------------------------------------------------


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # the last token is where generation starts
    assert shared_prefix([[1, 2, 3]]) == 0  # one prompt: nothing to share
    assert shared_prefix([[1, 2], [3, 2]]) == 0


def test_a_shared_prefix_is_run_once_and_changes_no_answer(teachers, tiny_llm_dir):
    cached, plain = teachers
    encoded = [prompt_ids(cached.tokenizer, p) for p in SHARED]
    shared = shared_prefix(encoded)
    assert shared >= MIN_PREFIX  # the chat template's system part, the instruction, the few-shot turn
    before, plain_before = cached.tally.prefilled_tokens, plain.tally.prefilled_tokens
    got, want = cached.generate(SHARED), plain.generate(SHARED)
    assert_same_rows(got, want)
    # The prefix ran once instead of once per prompt.
    ran, plain_ran = cached.tally.prefilled_tokens - before, plain.tally.prefilled_tokens - plain_before
    assert plain_ran - ran >= shared * (len(SHARED) - 1)
    # [prefix][padding][suffix] puts every token where a batch-1 forward over the whole prompt does.
    model, _ = load_causal_lm(str(tiny_llm_dir))
    for ids, out in zip(encoded, got):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out.token_ids.tolist()])).logits[0].float()
        steps = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)], -1)
        top_lp, top_ids = steps.topk(5, dim=-1)
        assert (top_ids.numpy() == out.topk_ids).all()
        np.testing.assert_allclose(top_lp.numpy(), out.topk_logprobs.astype(np.float32), atol=1e-2)


def test_prompts_sharing_nothing_run_whole(teachers):
    cached, plain = teachers
    assert shared_prefix([prompt_ids(cached.tokenizer, p) for p in UNSHARED]) < MIN_PREFIX
    before = cached.tally.prefilled_tokens
    prompt_tokens = sum(len(prompt_ids(cached.tokenizer, p)) for p in UNSHARED)
    padding = cached.tally.padding_tokens
    assert_same_rows(cached.generate(UNSHARED), plain.generate(UNSHARED))
    # No prefix run: what the model ran is the prompts themselves and their padding.
    assert cached.tally.prefilled_tokens - before == prompt_tokens + cached.tally.padding_tokens - padding


def test_seeded_sampling_with_the_prefix_cache(tiny_llm_dir, teachers):
    sampling = spec(tiny_llm_dir, generation={"temperature": 1.0, "seed": 0})
    cached, plain = TransformersTeacher(sampling), TransformersTeacher(sampling, prefix_cache=False)
    first = cached.generate(SHARED)
    assert_same_rows(cached.generate(SHARED), first, atol=0)  # the seed is re-applied: the very same rows
    assert_same_rows(plain.generate(SHARED), first)  # and the plain path samples the same tokens
    greedy = teachers[0].generate(SHARED)
    assert [o.token_ids.tolist() for o in first] != [o.token_ids.tolist() for o in greedy]
    assert any((o.topk_ids[:, 0] != o.token_ids).any() for o in first)  # sampled, not the argmax


# --- length grouping through the teach stage -----------------------------------------------------


class Interrupt(Exception):
    pass


def test_the_teach_stage_groups_lengths_across_everything_and_commits_each_batch(tiny_llm_dir, tmp_path):
    """Ten prompts of alternating short and long lengths, batches of 2: one teacher call with all ten
    (not chunks of batch_size x 4), batches of neighbouring lengths, each committed as it is answered."""
    prompts = [("w " * (3 if i % 2 else 40 + i)) + str(i) for i in range(10)]
    teacher = TransformersTeacher(spec(tiny_llm_dir))
    full_spec = parse_spec({"name": "t", "teacher": spec(tiny_llm_dir).model_dump(exclude_unset=True),
                            "sources": [{"inline": ["x"]}]})
    calls, batches = [], []
    real_generate = teacher.generate

    def generate(sent, on_batch=None, max_new_tokens=None):
        calls.append(len(sent))
        lengths = [len(prompt_ids(teacher.tokenizer, p)) for p in sent]

        def heard(indices, outputs):
            on_batch(indices, outputs)
            batches.append(sorted(lengths[i] for i in indices))
            if len(batches) == 3:
                raise Interrupt  # after three batches: what they answered must be cached already

        return real_generate(sent, on_batch=heard, max_new_tokens=max_new_tokens)

    teacher.generate = generate
    ctx = RunContext(spec=full_spec, cache_dir=tmp_path, progress=False, teacher=teacher)
    with pytest.raises(Interrupt):
        ask_teacher(ctx, prompts)
    assert calls == [10]
    lengths = sorted(len(prompt_ids(teacher.tokenizer, p)) for p in prompts)
    assert batches == [lengths[0:2], lengths[2:4], lengths[4:6]]  # shortest first, neighbours together
    cache = TeacherCache(tmp_path / "teacher.sqlite")
    keys = [request_key(teacher.fingerprint, generation_params(full_spec), p) for p in prompts]
    assert len(cache.get_many(keys)) == 6
    cache.close()

    teacher.generate = real_generate  # the rest, resumed: only the four unanswered prompts are asked
    outputs, new_calls = ask_teacher(ctx, prompts)
    assert new_calls == 4 and len(outputs) == 10
    cache = TeacherCache(tmp_path / "teacher.sqlite")
    assert cache.speed(teacher.fingerprint)[0] > 0  # seconds per row, recorded batch by batch for plan
    cache.close()


def test_length_grouping_cuts_padding(tiny_llm_dir):
    """Alternating short and long prompts in batches of 2: grouped by length, the padding is what sorted
    neighbours differ by, a small share of what batching them as they came would carry."""
    prompts = [("w " * (3 if i % 2 else 40 + i)) + str(i) for i in range(10)]
    teacher = TransformersTeacher(spec(tiny_llm_dir), prefix_cache=False)
    lengths = [len(prompt_ids(teacher.tokenizer, p)) for p in prompts]
    teacher.generate(prompts)
    ordered = sorted(lengths)
    grouped = sum(ordered[i + 1] - ordered[i] for i in range(0, 10, 2))
    as_they_came = sum(abs(lengths[i + 1] - lengths[i]) for i in range(0, 10, 2))
    assert teacher.tally.padding_tokens == grouped and grouped * 4 < as_they_came
    assert teacher.tally.padding_share == grouped / (sum(lengths) + grouped)


# --- teacher.device -------------------------------------------------------------------------------


def test_device_is_validated_and_only_for_the_transformers_backend():
    def error(teacher: dict) -> str:
        with pytest.raises(SpecError) as e:
            parse_spec({"name": "t", "teacher": teacher, "sources": [{"inline": ["x"]}]}, path="s.yaml")
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error({"model": "m", "device": "gpu"}) == ("s.yaml: teacher.device: 'gpu' is not a device: "
                                                      "use auto, cpu, cuda or cuda:N")
    assert "device: only for backend: transformers" in error(
        {"model": "m", "backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "tokenizer": "m", "device": "cuda"})
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert Teacher(model="m", device=device).device == device
    assert Teacher(model="m").device == "cpu"


def test_the_device_is_not_in_the_fingerprint_nor_the_cache_key(tiny_llm_dir):
    on_cpu, on_gpu = spec(tiny_llm_dir), spec(tiny_llm_dir, device="cuda:0")
    assert teacher_fingerprint(on_cpu) == teacher_fingerprint(on_gpu)
    params = {"generation": on_cpu.generation.model_dump(), "top_k": on_cpu.logprobs.top_k}
    assert request_key(teacher_fingerprint(on_cpu), params, "hi") == request_key(teacher_fingerprint(on_gpu), params,
                                                                                 "hi")


def test_a_cuda_device_this_machine_lacks_stops_before_the_teacher_loads(tiny_llm_dir, tmp_path, monkeypatch):
    from engine.preflight import check_teacher

    def no_load(_):
        raise AssertionError("the teacher must not load")

    monkeypatch.setattr("engine.teachers.transformers_backend.load_causal_lm", no_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        full = parse_spec({"name": "t", "teacher": {"model": str(tiny_llm_dir), "device": device},
                           "sources": [{"inline": ["x"]}]}, path=tmp_path / "s.yaml")
        with pytest.raises(SpecError) as before_any_stage:  # validate, plan and run check it first
            check_teacher(full)
        assert str(before_any_stage.value).startswith(f"{tmp_path / 's.yaml'}: teacher.device: {device} asked for, "
                                                      "but torch sees no CUDA device")
        assert "\n" not in str(before_any_stage.value)
        with pytest.raises(SpecError, match=rf"^<spec>: teacher.device: {device} asked for"):  # and the backend
            ask_teacher(RunContext(spec=full, cache_dir=tmp_path, progress=False), ["hi"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SpecError, match=r"^<spec>: teacher.device: cuda:3 asked for, but this machine has 1 CUDA "
                                        r"device \(cuda:0 to cuda:0\)$"):
        TransformersTeacher(spec(tiny_llm_dir, device="cuda:3"))


def test_auto_runs_on_the_cpu_here_as_cpu_does(tiny_llm_dir, teachers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = TransformersTeacher(spec(tiny_llm_dir, device="auto"))
    assert auto.device == torch.device("cpu") and next(auto.model.parameters()).dtype == torch.float32
    assert_same_rows(auto.generate(SHARED[:3]), teachers[0].generate(SHARED[:3]), atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_rows_match_the_cpu_within_float_tolerance(tiny_llm_dir):
    """bf16 weights where the GPU has bf16, log-probs in float32: what the GPU stores is what a float32
    CPU forward gives over the same tokens, within bf16's precision."""
    gpu = TransformersTeacher(spec(tiny_llm_dir, device="cuda"))
    bf16 = torch.cuda.is_bf16_supported()
    assert next(gpu.model.parameters()).dtype == (torch.bfloat16 if bf16 else torch.float32)
    model, tokenizer = load_causal_lm(str(tiny_llm_dir))
    for prompt, out in zip(SHARED, gpu.generate(SHARED)):
        assert out.topk_logprobs.dtype == np.float16 and out.token_logprobs.dtype == np.float32
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            logits = model(torch.tensor([ids + out.token_ids.tolist()])).logits[0].float()
        steps = torch.log_softmax(logits[len(ids) - 1 : len(ids) - 1 + len(out.token_ids)], -1)
        chosen = steps.gather(-1, torch.tensor(out.token_ids, dtype=torch.long).unsqueeze(-1)).squeeze(-1)
        np.testing.assert_allclose(out.token_logprobs, chosen.numpy(), atol=0.25 if bf16 else 1e-3)
