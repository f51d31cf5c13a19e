"""A pool of teacher endpoints (teacher.base_url as a list): the spec, the fingerprint, spreading, probing,
taking a failing endpoint out without paying a request twice; first against fake servers (an httpx2
MockTransport routing by host), then against two real llama-cpp-python servers behind fault proxies.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter

import httpx2
import polars as pl
import pytest
from fault_proxy import FaultProxy
from test_openai_backend import MODEL, FakeServer, openai_spec, real_spec, spec_of

from engine.errors import TeacherError
from engine.spec import Teacher
from engine.stages.base import RunContext, prompt_id
from engine.stages.teach import Teach
from engine.teachers import load_teacher, teacher_fingerprint
from engine.teachers.openai_backend import OpenAITeacher

A, B = "http://a.test:8000/v1", "http://b.test:8000/v1"


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    from engine.models import load_tokenizer

    return load_tokenizer(str(tiny_llm_dir))


class PoolMember(FakeServer):
    """A fake server that counts the work it does per prompt and can go down.

    Faults as FakeServer's, plus "lost" (the answer is made, then the connection drops: work done, never
    delivered) and "down" (this request and every later one is refused, as by a dead server)."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.worked: Counter = Counter()  # prompt -> answers made
        self.down = False

    def handle(self, request):
        chat = request.url.path.endswith("/chat/completions")
        with self.lock:
            if chat and self.faults and self.faults[0] in ("lost", "down"):
                fault = self.faults.pop(0)
                self.down = self.down or fault == "down"
                if fault == "lost":
                    self.worked[json.loads(request.content)["messages"][-1]["content"]] += 1
                    raise httpx2.RemoteProtocolError("Server disconnected without sending a response.",
                                                     request=request)
            if self.down:
                raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)
        response = super().handle(request)
        if chat and response.status_code == 200:
            with self.lock:
                self.worked[json.loads(request.content)["messages"][-1]["content"]] += 1
        return response


def routed(members: dict) -> httpx2.MockTransport:
    return httpx2.MockTransport(lambda request: members[request.url.host].handle(request))


def pool_teacher(tiny_llm_dir, members: dict, base_url=None, **overrides) -> OpenAITeacher:
    spec = openai_spec(tiny_llm_dir, base_url=base_url or [f"http://{h}:8000/v1" for h in members],
                       retries={"attempts": 3, "backoff": 0}, **overrides)
    return OpenAITeacher(spec, transport=routed(members), sleep=lambda s: None)


# --- the spec and the fingerprint -----------------------------------------------------


def test_base_url_takes_a_list_of_urls_or_url_and_concurrency(tiny_llm_dir):
    spec = openai_spec(tiny_llm_dir, base_url=[A + "/", {"url": B, "concurrency": 2}], max_concurrency=3)
    assert [(e.url, e.concurrency) for e in spec.base_url] == [(A, None), (B, 2)]
    assert openai_spec(tiny_llm_dir).base_url == "http://teacher.test:8000/v1"  # one URL stays a string
    with pytest.raises(ValueError, match="listed twice"):
        openai_spec(tiny_llm_dir, base_url=[A, A + "/"])
    with pytest.raises(ValueError, match="an empty list"):
        openai_spec(tiny_llm_dir, base_url=[])
    with pytest.raises(ValueError, match=r"base_url\n.*entry 1\.url: 'b.test:8000/v1' is not an http"):
        openai_spec(tiny_llm_dir, base_url=[A, {"url": "b.test:8000/v1"}])
    with pytest.raises(ValueError, match="api_key_env"):
        openai_spec(tiny_llm_dir, base_url=[A, "http://user:pw@b.test/v1"])
    with pytest.raises(ValueError, match="concurrency"):
        openai_spec(tiny_llm_dir, base_url=[{"url": A, "concurrency": 0}])


def test_a_pool_is_keyed_by_its_model_not_by_which_endpoints_serve_it(tiny_llm_dir):
    pool = teacher_fingerprint(openai_spec(tiny_llm_dir, base_url=[A, B]))
    assert pool.startswith(f"openai:pool/{MODEL}+tokenizer:")
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, base_url=[{"url": B, "concurrency": 7}])) == pool
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, base_url=[B, A, "http://c.test/v1"])) == pool
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, base_url=[A], model="other")) != pool
    # One URL keeps its fingerprint (its host and path), so caches written before pools still serve it.
    assert teacher_fingerprint(openai_spec(tiny_llm_dir, base_url=A)) == f"openai:a.test:8000/v1/{MODEL}" + \
        pool.removeprefix(f"openai:pool/{MODEL}")


# --- scheduling, against fake servers ----------------------------------------------------


def test_requests_spread_over_the_endpoints_each_within_its_concurrency(tokenizer, tiny_llm_dir):
    a, b = PoolMember(tokenizer), PoolMember(tokenizer)
    a.delay = b.delay = 0.05
    teacher = pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b},
                           base_url=[A, {"url": B, "concurrency": 1}], max_concurrency=2)
    prompts = [f"question {i}" for i in range(12)]
    heard = []
    outputs = teacher.generate(prompts, on_batch=lambda idx, outs: heard.extend(idx))
    assert sorted(heard) == list(range(12))
    assert [o.token_ids.tolist() for o in outputs] == [a.answer_ids(p)[:8] for p in prompts]
    assert a.most_in_flight == 2 and b.most_in_flight == 1 and len(b.chat_requests()) >= 2
    assert a.worked + b.worked == Counter(prompts)  # each prompt asked once, of one endpoint
    stats = {s["url"]: s for s in teacher.endpoint_stats()}
    assert stats[A]["answers"] + stats[B]["answers"] == 12 and stats[A]["requests"] == len(a.chat_requests()) + 1
    assert stats[B]["completion_tokens"] == sum(len(b.answer_ids(p)[:8]) for p in b.worked)
    assert stats[A]["taken_out"] is None and stats[B]["failures"] == 0


def test_a_failing_endpoint_is_taken_out_and_its_requests_move_without_paying_twice(tokenizer, tiny_llm_dir):
    a, b = PoolMember(tokenizer), PoolMember(tokenizer, faults=[None, None, "500", "500", "500"])
    a.delay = b.delay = 0.02
    teacher = pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b}, max_concurrency=1)
    prompts = [f"question {i}" for i in range(10)]
    outputs = teacher.generate(prompts)
    assert all(len(o.token_ids) for o in outputs)
    assert a.worked + b.worked == Counter(prompts) and sum(b.worked.values()) == 2
    stats = {s["url"]: s for s in teacher.endpoint_stats()}
    assert stats[B]["failures"] == 3 and stats[B]["retried_elsewhere"] == 1 and stats[B]["answers"] == 2
    out = stats[B]["taken_out"]
    assert out["during"] == "run" and "failed after 3 tries: HTTP 500" in out["reason"]
    assert 2 <= out["after_pool_answers"] <= 10
    assert stats[A]["answers"] == 8 and stats[A]["taken_out"] is None


def test_an_answer_lost_after_the_work_is_counted_as_maybe_paid(tokenizer, tiny_llm_dir):
    a, b = PoolMember(tokenizer), PoolMember(tokenizer, faults=[None, "lost", "down"])
    a.delay = b.delay = 0.02
    teacher = pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b}, max_concurrency=1)
    prompts = [f"question {i}" for i in range(6)]
    teacher.generate(prompts)
    stats = {s["url"]: s for s in teacher.endpoint_stats()}
    paid = sum((a.worked + b.worked).values())
    assert paid == len(prompts) + 1  # the lost answer's prompt was asked again: the servers worked once more
    assert stats[B]["lost_answers"] == paid - len(prompts)  # and the stats say so
    assert stats[B]["taken_out"] is not None and stats[B]["retried_elsewhere"] == 1


def test_a_request_failing_on_its_own_stops_the_run_instead_of_moving(tokenizer, tiny_llm_dir):
    a, b = PoolMember(tokenizer, faults=["400"]), PoolMember(tokenizer)
    teacher = pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b}, max_concurrency=1)
    with pytest.raises(TeacherError, match="answered HTTP 400"):
        teacher.generate([f"q{i}" for i in range(4)])
    assert all(s["taken_out"] is None for s in teacher.endpoint_stats())


def test_every_endpoint_failing_mid_run_is_one_error_naming_them(tokenizer, tiny_llm_dir):
    a, b = PoolMember(tokenizer, faults=["down"]), PoolMember(tokenizer, faults=["down"])
    teacher = pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b}, max_concurrency=1)
    heard = []
    with pytest.raises(TeacherError) as info:
        teacher.generate(["q1", "q2"], on_batch=lambda idx, outs: heard.extend(idx))
    message = str(info.value)
    assert "\n" not in message and message.startswith("teacher.base_url: no endpoint is left: ")
    assert f"{A} (teacher server: POST {A}/chat/completions failed after 3 tries: ConnectError" in message
    assert B in message and heard == []


# --- the probe before any work -------------------------------------------------------------


def test_an_endpoint_not_answering_the_probe_is_left_out_with_a_warning(tokenizer, tiny_llm_dir, caplog):
    a, b = PoolMember(tokenizer), PoolMember(tokenizer)
    b.down = True
    with caplog.at_level(logging.WARNING):
        teacher = pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b})
    said = [r.getMessage() for r in caplog.records if B in r.getMessage()]
    assert len(said) == 1 and "left out of the pool: it does not answer" in said[0] and "ConnectError" in said[0]
    teacher.generate(["q1", "q2", "q3"])
    assert len(a.chat_requests()) == 3 and b.chat_requests() == []
    assert {s["url"]: s["taken_out"]["during"] if s["taken_out"] else None
            for s in teacher.endpoint_stats()} == {A: None, B: "probe"}


def test_no_endpoint_answering_is_one_error_naming_the_urls(tokenizer, tiny_llm_dir):
    a, b = PoolMember(tokenizer), PoolMember(tokenizer)
    a.down = b.down = True
    with pytest.raises(TeacherError) as info:
        pool_teacher(tiny_llm_dir, {"a.test": a, "b.test": b})
    message = str(info.value)
    assert "\n" not in message and message.startswith("teacher.base_url: no endpoint answered: ")
    assert f"{A} (teacher server: GET {A}/models failed after 3 tries" in message and f"{B} (" in message
    assert a.chat_requests() == b.chat_requests() == []


def test_endpoints_must_serve_the_same_model(tokenizer, tiny_llm_dir):
    with pytest.raises(TeacherError, match=r"teacher.model: 'smol' is not served at http://b.test"):
        pool_teacher(tiny_llm_dir, {"a.test": PoolMember(tokenizer), "b.test": PoolMember(tokenizer, models=["x"])})

    def listing(root):
        return lambda request: httpx2.Response(200, json={"data": [{"id": MODEL, "root": root, "created": 1}]})

    members = {"a.test": type("M", (), {"handle": staticmethod(listing("/models/smol-q8"))}),
               "b.test": type("M", (), {"handle": staticmethod(listing("/models/smol-f16"))})}
    with pytest.raises(TeacherError) as info:
        pool_teacher(tiny_llm_dir, members)
    assert "\n" not in str(info.value) and "serve 'smol' differently" in str(info.value)
    assert "smol-q8" in str(info.value) and "smol-f16" in str(info.value)


def test_closed_ports_fail_at_start_naming_each_url(tiny_llm_dir):
    urls = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            urls.append(f"http://127.0.0.1:{s.getsockname()[1]}/v1")  # nothing listens once closed
    with pytest.raises(TeacherError) as info:
        load_teacher(openai_spec(tiny_llm_dir, base_url=urls, retries={"attempts": 2, "backoff": 0.01}))
    message = str(info.value)
    assert "\n" not in message and message.startswith("teacher.base_url: no endpoint answered:")
    assert all(f"{u} (teacher server: GET {u}/models failed after 2 tries: ConnectError" in message for u in urls)


# --- two real servers: llama-cpp-python on the bundled SmolLM2, behind counting proxies -------------


def pool_spec(*urls, **overrides) -> Teacher:
    fields = {"base_url": [{"url": u, "concurrency": 1} for u in urls], "generation": {"max_new_tokens": 4},
              "retries": {"attempts": 3, "backoff": 0.05, "max_wait": 1}, **overrides}
    return real_spec(urls[0], **fields)


def teach(spec: Teacher, prompts: list[str], cache_dir):
    frame = pl.DataFrame({"prompt_id": [prompt_id(p) for p in prompts], "prompt": prompts})
    return Teach().run(frame, RunContext(spec=spec_of(spec), cache_dir=cache_dir, progress=False))


def test_real_servers_share_the_work(llama_server, second_llama_server, tmp_path):
    prompts = [f"Name a {w}." for w in ("colour", "fruit", "city", "river")]
    with FaultProxy(llama_server) as a, FaultProxy(second_llama_server) as b:
        spec = pool_spec(a.url + "/v1", b.url + "/v1")
        answered, _, stats = teach(spec, prompts, tmp_path)
        assert answered["response"].null_count() == 0 and answered.height == len(prompts)
        assert a.answered + b.answered == Counter(prompts) and a.answered and b.answered
        by_url = {s["url"]: s for s in stats["endpoints"]}
        for proxy in (a, b):
            mine = by_url[proxy.url + "/v1"]
            assert mine["requests"] == sum(proxy.received.values())  # the probe and each answer
            assert mine["answers"] == sum(proxy.answered.values()) and mine["completion_tokens"] > 0


def test_a_real_server_dying_mid_run_moves_its_work_and_nothing_is_paid_twice(llama_server, second_llama_server,
                                                                              tmp_path):
    prompts = [f"Give one word that rhymes with {w}." for w in ("cat", "dog", "sun", "tree", "car", "book")]
    # b answers two requests, then dies: the third is dropped and every later connection refused.
    with FaultProxy(llama_server) as a, FaultProxy(second_llama_server, [None, None, "die"]) as b:
        spec = pool_spec(a.url + "/v1", b.url + "/v1")
        answered, _, stats = teach(spec, prompts, tmp_path)
        assert answered["response"].null_count() == 0 and answered.height == len(prompts)
        assert a.answered + b.answered == Counter(prompts)  # every prompt answered once, by one server
        assert sum(b.answered.values()) == 2 and not b.lost
        died = {s["url"]: s for s in stats["endpoints"]}[b.url + "/v1"]
        assert died["answers"] == 2 and died["retried_elsewhere"] == 1 and died["failures"] >= 1
        assert died["taken_out"]["during"] == "run" and died["taken_out"]["after_pool_answers"] >= 2
        # The dropped request reached the dead proxy (not the server): counted as maybe paid, honestly.
        assert 1 <= died["lost_answers"] <= died["failures"]
        lived = {s["url"]: s for s in stats["endpoints"]}[a.url + "/v1"]
        assert lived["answers"] == len(prompts) - 2 and lived["taken_out"] is None
        # A second run asks nothing: each answer was cached once, when it came.
        again, _, stats = teach(spec, prompts, tmp_path)
        assert stats["teacher_calls"] == 0 and again["response"].to_list() == answered["response"].to_list()
