"""The openai teacher backend: parsing, token mapping, retries and errors against a fake server
(an httpx2 MockTransport), then the real thing: llama-cpp-python's OpenAI-compatible server on the
bundled SmolLM2 GGUF, alone and behind a fault-injecting proxy (tests/fault_proxy.py).
"""

from __future__ import annotations

import json
import threading
import time

import httpx2
import numpy as np
import polars as pl
import pytest

from engine.errors import TeacherError, UserError
from engine.spec import Teacher
from engine.stages.base import RunContext, prompt_id
from engine.stages.teach import Teach, ask_teacher
from engine.teachers import load_teacher, teacher_fingerprint
from engine.teachers.openai_backend import OpenAITeacher, TokenMapper, token_mapper

BASE = "http://teacher.test:8000/v1"
MODEL = "smol"


def openai_spec(tokenizer, **overrides) -> Teacher:
    fields = {"backend": "openai", "model": MODEL, "base_url": BASE, "tokenizer": str(tokenizer),
              "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 4},
              "retries": {"attempts": 4, "backoff": 0.01, "max_wait": 5}}
    fields.update(overrides)
    return Teacher(**fields)


# --- a fake OpenAI-compatible server --------------------------------------------


class FakeServer:
    """Answers chat completions the way llama.cpp's server does: token texts, no bytes, no ids.

    The answer to a prompt is a fixed token sequence derived from it; `faults` (consumed in
    order by chat requests) are "500", "429", "timeout", "drop" or "400".
    """

    def __init__(self, tokenizer, *, faults=(), models=(MODEL,), style="text", logprobs=True, retry_after="2"):
        self.tokenizer = tokenizer
        self.faults = list(faults)
        self.models = list(models)
        self.style = style
        self.logprobs = logprobs
        self.retry_after = retry_after
        self.requests: list[httpx2.Request] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.delay = 0.0

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    def answer_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(f" Answer: {prompt} — it’s fine 😀", add_special_tokens=False)["input_ids"]

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            self.requests.append(request)
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if fault == "500":
                return httpx2.Response(500, json={"error": {"message": "boom"}})
            if fault == "429":
                return httpx2.Response(429, headers={"Retry-After": self.retry_after}, json={"error": {"message": "slow down"}})
            if fault == "400":
                return httpx2.Response(400, json={"error": {"message": "top_logprobs too large"}})
            if fault == "timeout":
                raise httpx2.ReadTimeout("timed out", request=request)
            if fault == "drop":
                raise httpx2.RemoteProtocolError("Server disconnected without sending a response.", request=request)
            return httpx2.Response(200, json=self.completion(json.loads(request.content)))
        finally:
            with self.lock:
                self.in_flight -= 1

    def render(self, token_id: int) -> dict:
        raw = self.bytes_of[token_id]
        if self.style == "ids":
            return {"token": f"token_id:{token_id}", "bytes": None}
        if self.style == "bytes":
            return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}
        return {"token": raw.decode("utf-8", errors="ignore"), "bytes": None}  # llama.cpp

    @property
    def bytes_of(self):
        if not hasattr(self, "_bytes_of"):
            self._bytes_of = token_mapper(self.tokenizer).bytes_of
        return self._bytes_of

    def completion(self, body: dict) -> dict:
        prompt = body["messages"][-1]["content"]
        ids = self.answer_ids(prompt)[: body["max_tokens"]]
        k = body["top_logprobs"]
        entries = []
        for step, token in enumerate(ids):
            others = [(token + 1 + j) % 49152 for j in range(k)]  # distinct alternatives, less likely
            lps = [-0.1 - 0.01 * step] + [-3.0 - j for j in range(k)]
            top = [{**self.render(i), "logprob": lp} for i, lp in zip([token] + others, lps)]
            entries.append({**self.render(token), "logprob": lps[0], "top_logprobs": top[:k]})
        full = len(self.answer_ids(prompt)) <= body["max_tokens"]
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                  "content": self.tokenizer.decode(ids)},
                         "logprobs": {"content": entries} if self.logprobs else None,
                         "finish_reason": "stop" if full else "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(ids), "total_tokens": len(ids) + 1},
        }

    def chat_requests(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith("/chat/completions")]


def fake_teacher(tokenizer_dir, server: FakeServer, sleeps: list | None = None, **overrides) -> OpenAITeacher:
    recorded = sleeps if sleeps is not None else []
    return OpenAITeacher(openai_spec(tokenizer_dir, **overrides), transport=server.transport(), sleep=recorded.append)


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    from engine.models import load_tokenizer

    return load_tokenizer(str(tiny_llm_dir))


# --- the spec ---------------------------------------------------------------------


def test_spec_needs_url_and_tokenizer_and_keeps_openai_fields_to_openai(tiny_llm_dir):
    with pytest.raises(ValueError, match="needs base_url and tokenizer"):
        Teacher(backend="openai", model="m")
    with pytest.raises(ValueError, match="max_concurrency: only for backend: openai"):
        Teacher(model=str(tiny_llm_dir), max_concurrency=3)
    with pytest.raises(ValueError, match="api_key_env"):
        openai_spec(tiny_llm_dir, base_url="http://user:secret@host/v1")
    with pytest.raises(ValueError, match="not an http"):
        openai_spec(tiny_llm_dir, base_url="host:8000/v1")
    with pytest.raises(ValueError):
        openai_spec(tiny_llm_dir, api_key_env="sk-not-a-variable-name!")
    with pytest.raises(ValueError, match="top_logprobs: set by the backend"):
        openai_spec(tiny_llm_dir, extra_body={"top_logprobs": 3})
    spec = openai_spec(tiny_llm_dir, base_url=BASE + "/")
    assert spec.base_url == BASE and spec.local_model == str(tiny_llm_dir)


def test_fingerprint_names_server_and_model_never_the_key(tiny_llm_dir, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    a = openai_spec(tiny_llm_dir, api_key_env="MY_KEY")
    b = openai_spec(tiny_llm_dir, max_concurrency=9, timeout={"read": 5}, retries={"attempts": 2})
    fingerprint = teacher_fingerprint(a)
    assert fingerprint.startswith(f"openai:teacher.test:8000/v1/{MODEL}+tokenizer:")
    assert "secret" not in fingerprint and "MY_KEY" not in fingerprint
    assert teacher_fingerprint(b) == fingerprint  # how it is asked is not what is asked
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, model="other")) != fingerprint
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, base_url="http://elsewhere:8000/v1")) != fingerprint
    # A server's own sampling options change its answers.
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, extra_body={"repeat_penalty": 1.0})) != fingerprint


# --- token mapping ------------------------------------------------------------------


@pytest.mark.parametrize("style", ["text", "bytes", "ids"])
def test_answers_round_trip_into_the_transformers_columns(tokenizer, tiny_llm_dir, style):
    server = FakeServer(tokenizer, style=style)
    teacher = fake_teacher(tiny_llm_dir, server, extra_body={"repeat_penalty": 1.0})
    prompts = ["Is the sky blue?", "x" * 3]
    outputs = teacher.generate(prompts)
    for prompt, out in zip(prompts, outputs):
        expected = server.answer_ids(prompt)[:8]
        assert out.token_ids.dtype == np.int32 and out.token_logprobs.dtype == np.float32
        assert out.topk_ids.dtype == np.int32 and out.topk_logprobs.dtype == np.float16
        assert out.token_ids.tolist() == expected  # " " and split emoji resolved by the answer's text
        assert out.topk_ids.shape == out.topk_logprobs.shape == (len(expected), 4)
        assert (out.topk_ids[:, 0] == out.token_ids).all()
        assert (np.diff(out.topk_logprobs.astype(np.float32), axis=1) <= 0).all()
        if style != "text":  # llama.cpp's texts leave some alternatives ambiguous; bytes and ids never do
            assert out.unmapped_tokens == 0
        assert out.finish_reason == "length" and out.text == tokenizer.decode(expected).strip()
    body = server.chat_requests()[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 4 and body["max_tokens"] == 8
    assert body["temperature"] == 0.0 and body["seed"] == 0 and body["top_p"] == 1.0 and body["model"] == MODEL
    assert body["repeat_penalty"] == 1.0


def test_unmappable_tokens_are_counted_not_guessed(tokenizer):
    mapper = TokenMapper(tokenizer)
    space = tokenizer.convert_tokens_to_ids("Ġ")
    # " " alone is ambiguous in llama.cpp's rendering (tokens holding a space and part of a character).
    assert mapper.token_id({"token": " "}) is None
    assert mapper.token_id({"token": " ", "bytes": [32]}) == space
    assert mapper.token_id({"token": "token_id:17"}) == 17
    assert mapper.token_id({"token": "token_id:999999"}) is None
    assert mapper.token_id({"token": "\x00no such token\x00"}) is None
    # The chosen tokens are resolved by the text when one segmentation fits: " " then " world".
    ids, unmapped = mapper.chosen_ids([{"token": "Hi"}, {"token": " "}, {"token": " world"}], "Hi  world")
    assert unmapped == 0 and ids[1] == space
    # ...and stay unmapped (-1) when the text does not settle it.
    ids, unmapped = mapper.chosen_ids([{"token": "Hi"}, {"token": " "}], "something else")
    assert ids[1] == -1 and unmapped == 1


def test_unmapped_alternatives_become_absent_slots(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer, style="bytes")
    teacher = fake_teacher(tiny_llm_dir, server)
    data = server.completion({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 3, "top_logprobs": 4})
    entry = data["choices"][0]["logprobs"]["content"][0]
    entry["top_logprobs"][1] = {"token": "\x00nothing\x00", "logprob": -2.0}  # unmappable alternative
    entry["top_logprobs"][2] = {"token": " ", "logprob": -2.5}  # ambiguous alternative
    out = teacher._parse(data)
    assert out.unmapped_tokens == 2 and teacher.stats["absent_topk"] == 2
    lps = out.topk_logprobs[0].astype(np.float32)
    assert np.isfinite(lps[:2]).all() and np.isneginf(lps[2:]).all()
    assert out.topk_ids[0, 2] == out.topk_ids[0, 3] == out.topk_ids[0, 0]  # the trainer's padding: slot 0's id


# --- retries, errors, concurrency ------------------------------------------------------


def test_retries_timeouts_drops_429_and_5xx_with_backoff(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer, faults=["500", "429", "timeout", "drop"], retry_after="7")
    sleeps = []
    teacher = fake_teacher(tiny_llm_dir, server, sleeps, max_concurrency=1,
                           retries={"attempts": 5, "backoff": 0.5, "max_wait": 60})
    [out] = teacher.generate(["Is water wet?"])
    assert out.token_ids.tolist() == server.answer_ids("Is water wet?")[:8]
    assert len(server.chat_requests()) == 5 and teacher.stats["retries"] == 4
    assert sleeps[1] == 7  # Retry-After honoured as said
    assert 0.4 <= sleeps[0] <= 0.6 and 1.6 <= sleeps[2] <= 2.4 and 3.2 <= sleeps[3] <= 4.8  # doubling, jittered


def test_retry_after_is_capped_by_max_wait(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer, faults=["429"], retry_after="3600")
    sleeps = []
    fake_teacher(tiny_llm_dir, server, sleeps, retries={"attempts": 2, "max_wait": 5}).generate(["a"])
    assert sleeps == [5]


def test_a_request_failing_for_good_says_what_was_tried(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer, faults=["500"] * 3)
    teacher = fake_teacher(tiny_llm_dir, server, retries={"attempts": 3, "backoff": 0})
    with pytest.raises(TeacherError) as info:
        teacher.generate(["a"])
    assert str(info.value) == f"teacher server: POST {BASE}/chat/completions failed after 3 tries: HTTP 500: boom"


def test_a_client_error_is_not_retried(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer, faults=["400"])
    with pytest.raises(TeacherError, match="answered HTTP 400: top_logprobs too large"):
        fake_teacher(tiny_llm_dir, server).generate(["a"])
    assert len(server.chat_requests()) == 1


def test_unreachable_server_fails_at_start_in_one_line(tiny_llm_dir):
    def refuse(request):
        raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(TeacherError) as info:
        OpenAITeacher(openai_spec(tiny_llm_dir), transport=httpx2.MockTransport(refuse), sleep=lambda s: None)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message == f"teacher server: GET {BASE}/models failed after 4 tries: ConnectError: [Errno 111] Connection refused"


def test_wrong_model_or_path_fails_at_start(tokenizer, tiny_llm_dir):
    with pytest.raises(TeacherError, match=r"teacher.model: 'smol' is not served at .* lists 'other'"):
        fake_teacher(tiny_llm_dir, FakeServer(tokenizer, models=["other"]))
    with pytest.raises(TeacherError, match="answered HTTP 404.*usually ends in /v1"):
        OpenAITeacher(openai_spec(tiny_llm_dir), transport=httpx2.MockTransport(lambda r: httpx2.Response(404)))


def test_missing_api_key_variable_names_it_before_any_request(tiny_llm_dir, monkeypatch):
    monkeypatch.delenv("SYLLABUS_TEST_KEY", raising=False)
    server = FakeServer(None)
    with pytest.raises(TeacherError, match="environment variable SYLLABUS_TEST_KEY is not set"):
        fake_teacher(tiny_llm_dir, server, api_key_env="SYLLABUS_TEST_KEY")
    assert server.requests == []


def test_key_goes_in_the_header_and_nowhere_else(tokenizer, tiny_llm_dir, monkeypatch):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("SYLLABUS_TEST_KEY", secret)

    def echo_key(request):  # a server that quotes the key back in its error
        assert request.headers["Authorization"] == f"Bearer {secret}"
        if request.url.path.endswith("/models"):
            return httpx2.Response(200, json={"data": [{"id": MODEL}]})
        return httpx2.Response(401, json={"error": {"message": f"bad key {secret}"}})

    spec = openai_spec(tiny_llm_dir, api_key_env="SYLLABUS_TEST_KEY")
    teacher = OpenAITeacher(spec, transport=httpx2.MockTransport(echo_key))
    with pytest.raises(TeacherError) as info:
        teacher.generate(["a"])
    assert secret not in str(info.value) and "***" in str(info.value) and "$SYLLABUS_TEST_KEY" in str(info.value)
    assert secret not in teacher_fingerprint(spec) and secret not in json.dumps(spec.model_dump(mode="json"))


def test_no_logprobs_names_the_option_to_set(tokenizer, tiny_llm_dir):
    teacher = fake_teacher(tiny_llm_dir, FakeServer(tokenizer, logprobs=False))
    with pytest.raises(TeacherError, match="answered without logprobs.*--logits_all true"):
        teacher.generate(["a"])


def test_requests_run_concurrently_and_each_answer_is_handed_over_at_once(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer)
    server.delay = 0.05
    teacher = fake_teacher(tiny_llm_dir, server, max_concurrency=3)
    heard = []
    prompts = [f"question {i}" for i in range(9)]
    outputs = teacher.generate(prompts, on_batch=lambda idx, outs: heard.extend(zip(idx, outs)))
    assert server.most_in_flight == 3
    assert sorted(i for i, _ in heard) == list(range(9))
    for (i, out) in heard:
        assert out is outputs[i] and out.token_ids.tolist() == server.answer_ids(prompts[i])[:8]


def test_one_failure_keeps_the_answers_already_in(tokenizer, tiny_llm_dir):
    server = FakeServer(tokenizer, faults=[None, None, "400"])
    teacher = fake_teacher(tiny_llm_dir, server, max_concurrency=1)
    heard = []
    with pytest.raises(TeacherError):
        teacher.generate(["a", "b", "c", "d", "e"], on_batch=lambda idx, outs: heard.extend(idx))
    assert heard == [0, 1]
    assert len(server.chat_requests()) == 3  # nothing new starts after the failure


def test_teach_stage_caches_answers_of_the_openai_backend(tokenizer, tiny_llm_dir, tmp_path, monkeypatch):
    server = FakeServer(tokenizer)
    monkeypatch.setattr("engine.teachers.load_teacher", lambda spec: OpenAITeacher(spec, transport=server.transport()))

    class Spec:
        teacher = openai_spec(tiny_llm_dir)

    prompts = ["Is this good?", "2+2=", "Tell me a story."]
    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts})
    first, _, stats = Teach().run(frame, RunContext(spec=Spec, cache_dir=tmp_path, progress=False))
    assert stats["teacher_calls"] == 3 and len(server.chat_requests()) == 3
    assert first.schema["token_ids"] == pl.List(pl.Int32) and first.schema["topk_logprobs"] == pl.List(pl.List(pl.Float16))

    class Other:  # another spec asking the same thing, asked differently
        teacher = openai_spec(tiny_llm_dir, max_concurrency=2, timeout={"read": 9})

    again, _, stats = Teach().run(frame, RunContext(spec=Other, cache_dir=tmp_path, progress=False))
    assert stats["teacher_calls"] == 0 and len(server.chat_requests()) == 3
    assert again.equals(first)


class CompletionsServer(FakeServer):
    """Also answers /completions as the completions API does: the text, and per token its text, log-prob
    and a {text: log-prob} map of the top k (llama.cpp's and vLLM's form)."""

    def completion(self, body: dict) -> dict:
        if "messages" in body:
            return super().completion(body)
        chat = super().completion({**body, "messages": [{"role": "user", "content": body["prompt"]}],
                                   "top_logprobs": body["logprobs"]})
        choice = chat["choices"][0]
        entries = choice["logprobs"]["content"]
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "usage": chat["usage"],
                "choices": [{"index": 0, "text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                             "logprobs": {"tokens": [e["token"] for e in entries],
                                          "token_logprobs": [e["logprob"] for e in entries],
                                          "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]}
                                                           for e in entries],
                                          "text_offset": list(range(len(entries)))}}]}


def test_chat_sends_system_and_turns_and_plain_text_goes_to_completions(tokenizer, tiny_llm_dir):
    from engine.prompts import Conversation

    server = CompletionsServer(tokenizer)
    teacher = fake_teacher(tiny_llm_dir, server)
    prompt = "Headline: Stocks fall\nTopic:"
    turns = (("system", "Sort headlines."), ("user", "Headline: Striker scores twice\nTopic:"), ("assistant", "sports"))
    chat, plain = teacher.generate([Conversation(prompt, turns=turns), Conversation(prompt, chat=False)])
    bodies = {r.url.path: json.loads(r.content) for r in server.requests if not r.url.path.endswith("/models")}
    assert sorted(bodies) == ["/v1/chat/completions", "/v1/completions"]
    assert bodies["/v1/chat/completions"]["messages"] == [{"role": r, "content": c} for r, c in turns] + [
        {"role": "user", "content": prompt}]
    sent = bodies["/v1/completions"]
    assert sent["prompt"] == prompt and sent["logprobs"] == 4 and "messages" not in sent and "top_logprobs" not in sent
    # The completions form gives the same columns as the chat form.
    assert plain.text == chat.text and plain.finish_reason == chat.finish_reason
    assert plain.token_ids.tolist() == chat.token_ids.tolist() == server.answer_ids(prompt)[:8]
    np.testing.assert_array_equal(plain.topk_ids, chat.topk_ids)
    np.testing.assert_array_equal(plain.topk_logprobs, chat.topk_logprobs)
    np.testing.assert_array_equal(plain.token_logprobs, chat.token_logprobs)


def test_a_closed_port_fails_at_start_naming_the_url(tiny_llm_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(TeacherError) as info:
        load_teacher(openai_spec(tiny_llm_dir, base_url=url, retries={"attempts": 2, "backoff": 0.01}))
    assert str(info.value).startswith(f"teacher server: GET {url}/models failed after 2 tries: ConnectError")


# --- the real server: llama-cpp-python on the bundled SmolLM2 ------------------------------

from collections import Counter  # noqa: E402

LLAMA_SERVER_MODEL = "smollm2-135m-instruct"  # the name conftest's llama_server serves the bundled GGUF under
from fault_proxy import FaultProxy  # noqa: E402

REAL_PROMPTS = ["What is the capital of France?", "Is the sky blue? Answer yes or no.", "Say hello in Spanish.",
                "What is 2+2?", "Name a fruit that is yellow."]


def real_spec(url: str, **overrides) -> Teacher:
    fields = {"backend": "openai", "model": LLAMA_SERVER_MODEL, "base_url": url, "tokenizer": "smollm2-135m-instruct",
              "generation": {"max_new_tokens": 12}, "logprobs": {"top_k": 5}, "max_concurrency": 2,
              "timeout": {"connect": 5, "read": 60}, "retries": {"attempts": 6, "backoff": 0.05, "max_wait": 5},
              # llama.cpp's server penalises repeats (1.1) unless told not to: greedy means the argmax here.
              "extra_body": {"repeat_penalty": 1.0}}
    fields.update(overrides)
    return Teacher(**fields)


def spec_of(teacher: Teacher):
    class Spec:
        pass

    Spec.teacher = teacher
    return Spec


def test_real_server_answers_round_trip_into_the_transformers_columns(llama_server, tiny_llm_dir, tmp_path):
    teacher = load_teacher(real_spec(llama_server))
    outputs = teacher.generate(REAL_PROMPTS)
    unmapped = listed = tokens = 0
    for out in outputs:
        n = len(out.token_ids)
        # llama.cpp's server ends an answer on a whole character: a few tokens past max_tokens at most.
        assert 1 <= n <= 12 + 3 and out.finish_reason == ("length" if n >= 12 else "stop")
        assert out.token_ids.dtype == np.int32 and out.token_logprobs.dtype == np.float32
        assert out.topk_ids.dtype == np.int32 and out.topk_logprobs.dtype == np.float16
        assert out.topk_ids.shape == out.topk_logprobs.shape == (n, 5)
        assert (out.token_ids >= 0).all()  # every chosen token mapped
        assert teacher.tokenizer.decode(out.token_ids.tolist(), skip_special_tokens=True).strip() == out.text
        lp = out.topk_logprobs.astype(np.float32)
        assert (lp <= 0).all() and (np.exp(lp).sum(axis=1) <= 1 + 1e-3).all()
        # Most probable first; absent slots (-inf: alternatives that mapped to no single id) last.
        assert (np.diff(np.maximum(lp, -1e4), axis=1) <= 1e-3).all()
        # Greedy: where the chosen token is among the top-k, it is the first, with its own log-prob.
        chosen = (out.topk_ids == out.token_ids[:, None]) & np.isfinite(lp)
        assert not chosen[:, 1:].any()
        np.testing.assert_allclose(out.token_logprobs[chosen[:, 0]], lp[chosen[:, 0], 0], atol=2e-3)
        unmapped += out.unmapped_tokens
        listed += chosen[:, 0].sum()
        tokens += n
    # llama.cpp renders tokens as text only; an alternative " " or "" fits several ids and stays unmapped,
    # but most positions keep their top-k.
    assert listed >= 0.8 * tokens and unmapped == teacher.stats["unmapped_tokens"]
    assert teacher.stats["prompt_mismatch"] == 0  # the server read as many prompt tokens as the student will
    # The Teach stage writes the same columns, with the same types, from either backend.
    prompts = REAL_PROMPTS[:2]
    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts})
    served, _, _ = Teach().run(frame, RunContext(spec=spec_of(real_spec(llama_server)), cache_dir=tmp_path / "a",
                                                 progress=False))
    local = Teacher(model=str(tiny_llm_dir), generation={"max_new_tokens": 12}, logprobs={"top_k": 5})
    computed, _, _ = Teach().run(frame, RunContext(spec=spec_of(local), cache_dir=tmp_path / "b", progress=False))
    assert served.schema == computed.schema


def test_the_server_reads_the_prompt_the_student_is_trained_on(llama_server):
    """The GGUF's chat template (what the server uses without --chat_format) renders the tokenizer's prompt."""
    from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter

    from engine.models import load_tokenizer, locate

    gguf_template = _gguf_chat_template(locate(LLAMA_SERVER_MODEL))
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    served = Jinja2ChatFormatter(gguf_template, eos_token="<|im_end|>", bos_token="<|im_start|>")(messages=messages)
    assert served.prompt == expected
    chatml = Jinja2ChatFormatter(CHATML_CHAT_TEMPLATE, eos_token="<|im_end|>", bos_token="<s>")(messages=messages)
    assert chatml.prompt != expected  # --chat_format chatml drops the default system prompt


def _gguf_chat_template(path) -> str:
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()


def test_real_server_agrees_with_the_transformers_backend(llama_server):
    """Same GGUF weights (de-quantised for transformers): greedy first tokens agree within quantisation."""
    prompts = REAL_PROMPTS + ["Translate 'cat' to French.", "Who wrote Hamlet?", "Is 7 a prime number?"]
    served = load_teacher(real_spec(llama_server, generation={"max_new_tokens": 3})).generate(prompts)
    local = load_teacher(Teacher(model="smollm2-135m-instruct", generation={"max_new_tokens": 3},
                                 logprobs={"top_k": 5}, batch_size=1)).generate(prompts)
    # Measured: 7 of 8 agree; the other is a near tie ("L" -1.94 vs "The" -1.88 on the first prompt).
    first_same = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(served, local))
    assert first_same >= len(prompts) - 2
    for a, b in zip(served, local):
        overlap = len(set(a.topk_ids[0].tolist()) & set(b.topk_ids[0].tolist()))
        assert overlap >= 3, (a.topk_ids[0], b.topk_ids[0])
        if a.token_ids[0] == b.token_ids[0]:  # measured: within 0.08
            assert abs(float(a.token_logprobs[0]) - float(b.token_logprobs[0])) < 0.25


def test_faults_are_survived_and_no_prompt_is_answered_twice(llama_server, tmp_path):
    prompts = [f"Give one word that rhymes with {w}." for w in ("cat", "dog", "sun", "tree", "car", "book")]
    faults = ["500", "429", "slow", "drop", "500", "drop", "429"]
    # "slow" holds a request past the client's read timeout; real answers take about 1.5 s here.
    with FaultProxy(llama_server, faults, retry_after=1, slow_seconds=14) as proxy:
        spec = real_spec(proxy.url + "/v1", timeout={"connect": 5, "read": 12},
                         retries={"attempts": 10, "backoff": 0.05, "max_wait": 5})  # 7 faults may hit one prompt
        outputs, calls = ask_teacher(RunContext(spec=spec_of(spec), cache_dir=tmp_path, progress=False), prompts)
        assert calls == len(prompts) and all(len(o.token_ids) for o in outputs)
        assert proxy.injected == Counter(faults)
        assert proxy.answered == {p: 1 for p in prompts}  # the server answered each prompt exactly once
        # The same answers as the server gives directly (greedy is deterministic).
        direct = load_teacher(real_spec(llama_server)).generate(prompts)
        assert [o.token_ids.tolist() for o in outputs] == [o.token_ids.tolist() for o in direct]

        proxy.reset_counts()
        again, calls = ask_teacher(RunContext(spec=spec_of(spec), cache_dir=tmp_path, progress=False), prompts)
        assert calls == 0 and sum(proxy.received.values()) == 0  # an identical run asks nothing, not even /models
        assert [o.token_ids.tolist() for o in again] == [o.token_ids.tolist() for o in outputs]
        # Another spec asking the same thing (asked with other concurrency and timeouts) shares the answers.
        other = real_spec(proxy.url + "/v1/", max_concurrency=1, timeout={"read": 30}, retries={"attempts": 2})
        shared, calls = ask_teacher(RunContext(spec=spec_of(other), cache_dir=tmp_path, progress=False), prompts)
        assert calls == 0 and sum(proxy.received.values()) == 0


def test_an_interrupted_run_resumes_without_asking_again(llama_server, tmp_path, monkeypatch):
    from engine.stages.teach import generation_params
    from engine.teachers.request_cache import TeacherCache, request_key

    prompts = [f"Name a country in {c}." for c in ("Europe", "Asia", "Africa", "South America", "Oceania")]
    with FaultProxy(llama_server) as proxy:
        spec = real_spec(proxy.url + "/v1", max_concurrency=1)
        put_many, committed = TeacherCache.put_many, []

        def interrupt_after_two(self, items):
            put_many(self, items)
            committed.extend(items)
            if len(committed) == 2:
                raise KeyboardInterrupt

        monkeypatch.setattr(TeacherCache, "put_many", interrupt_after_two)
        with pytest.raises(KeyboardInterrupt):
            ask_teacher(RunContext(spec=spec_of(spec), cache_dir=tmp_path, progress=False), prompts)
        monkeypatch.undo()
        time.sleep(2)  # the request in flight at the interrupt ends by itself (its answer is not kept)
        fingerprint, params = teacher_fingerprint(spec), generation_params(spec_of(spec))
        keys = {request_key(fingerprint, params, p): p for p in prompts}
        kept = [keys[k] for k in committed]
        _, calls = ask_teacher(RunContext(spec=spec_of(spec), cache_dir=tmp_path, progress=False), prompts)
        assert calls == len(prompts) - 2
        assert all(proxy.answered[p] == 1 for p in kept)  # what was kept is never asked again
        assert set(proxy.answered) == set(prompts) and sum(proxy.answered.values()) <= len(prompts) + 1


def test_a_server_without_logprobs_names_the_option(llama_server):
    with FaultProxy(llama_server, strip_logprobs=True) as proxy:
        teacher = load_teacher(real_spec(proxy.url + "/v1"))
        heard = []
        with pytest.raises(TeacherError, match=r"answered without logprobs: .*--logits_all true") as info:
            teacher.generate(REAL_PROMPTS[:2], on_batch=lambda idx, outs: heard.extend(idx))
        assert heard == [] and "\n" not in str(info.value)


def test_real_server_reads_plain_text_and_turns_as_the_tokenizer_does(llama_server):
    """chat: false goes to /completions with the plain prompt: the server reads exactly the tokenizer's ids
    (no begin-of-text token) and answers as the transformers backend does; a chat with a system message
    and few-shot turns reads as many tokens as the tokenizer's chat template gives."""
    from engine.prompts import Conversation

    plain = [Conversation("Headline: Striker scores twice\nTopic: sports\n\nHeadline: Stocks fall on rate fears\n"
                          "Topic:", chat=False),
             Conversation("Q: What is the capital of France?\nA:", chat=False),
             Conversation("Q: Is the sky blue?\nA:", chat=False)]
    turns = (("system", "You sort news headlines into sports or business."),
             ("user", "Headline: Striker scores twice"), ("assistant", "sports"))
    chats = [Conversation("Headline: Stocks fall on rate fears", turns=turns),
             Conversation("Headline: Keeper saves late penalty", turns=turns)]
    teacher = load_teacher(real_spec(llama_server, generation={"max_new_tokens": 6}))
    served = teacher.generate(plain + chats)
    assert teacher.stats["prompt_mismatch"] == 0  # the server read as many prompt tokens as prompt_ids gives
    for out in served:
        assert 1 <= len(out.token_ids) <= 6 + 3 and (out.token_ids >= 0).all()
        assert out.topk_ids.shape == (len(out.token_ids), 5) and out.finish_reason in ("stop", "length")
        assert teacher.tokenizer.decode(out.token_ids.tolist(), skip_special_tokens=True).strip() == out.text
    local = load_teacher(Teacher(model="smollm2-135m-instruct", generation={"max_new_tokens": 6},
                                 logprobs={"top_k": 5}, batch_size=1)).generate(plain + chats)
    # Same weights (de-quantised for transformers): the greedy first tokens agree within quantisation.
    assert sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(served, local)) >= len(served) - 1
    assert served[0].text.lower().startswith("sports")  # completion-style: it continues the pattern
