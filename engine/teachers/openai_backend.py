"""Teacher backend on an OpenAI-compatible server (OpenAI, vLLM, llama.cpp's server).

Each prompt is one `POST {base_url}/chat/completions` with `logprobs: true, top_logprobs: k` and the
conversation as `messages` (teacher.system, teacher.messages, then the prompt as the user turn); with
teacher.chat: false, one `POST {base_url}/completions` with the plain `prompt` and `logprobs: k` (the
completions API's form: per token its text, log-prob and a {text: log-prob} map of the top k, which
llama.cpp's server and vLLM answer), read into the same columns. Up to `max_concurrency` run at once
(threads over one httpx2 client), and every answer is handed to `on_batch` as soon as it
arrives, so the request cache commits it at once. base_url may be a list: a pool of servers of the
same model, each with its own concurrency, where a failing one is taken out and its requests move to
the others (engine/teachers/endpoints.py).

Timeouts, connection errors, 429 and 5xx are retried with exponential backoff (a server's
Retry-After is honoured, up to `retries.max_wait`); any other error status fails at once. The
constructor asks `GET {base_url}/models` (with the same retries) so that an unreachable or
misconfigured server fails before any work, in one line naming the URL and what was tried; in a pool
an endpoint that does not answer is left out with a warning, and all must serve the same model.

Token ids: a server that gives them ("token_id:123", vLLM's `--return-tokens-as-token-ids`) is
taken at its word; otherwise each token's `bytes` (when present) or its text is mapped to an id
with the teacher's tokenizer (`tokenizer:` in the spec). A text that several ids render to (a
token holding part of a UTF-8 character loses bytes in the server's rendering) is resolved for
the chosen tokens by the one segmentation of the answer's text that fits them all, and is never
guessed: an unmappable chosen token is stored as id -1, an unmappable alternative as an absent
top-k slot (log-prob -inf, the id of slot 0, as the trainer pads), and both are counted.

The API key is read from the environment variable that `api_key_env` names, sent only in the
Authorization header, and scrubbed from every message this module writes.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from engine.errors import TeacherError
from engine.teachers import TeacherOutput, teacher_fingerprint
from engine.teachers.endpoints import Cancelled, Endpoint, EndpointFailed, EndpointPool, urls_of

log = logging.getLogger(__name__)

NO_LOGPROBS = ("answered without logprobs: the server must return them (llama_cpp.server: --logits_all true; "
               "vLLM: --max-logprobs at least logprobs.top_k; hosted APIs: a model that supports logprobs)")


def api_key(spec_teacher) -> str | None:
    """The key from the variable the spec names (None when it names none); one line naming a missing variable."""
    name = spec_teacher.api_key_env
    if name is None:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise TeacherError(f"teacher.api_key_env: the environment variable {name} is not set (it holds the API key "
                           f"for {urls_of(spec_teacher)})")
    return key


class OpenAITeacher:
    def __init__(self, spec_teacher, *, transport=None, sleep: Callable[[float], None] | None = None):
        """`transport` (an httpx2 transport) and `sleep` are for tests; a run uses the network and real time."""
        import httpx2

        from engine.models import load_tokenizer

        self.spec = spec_teacher
        self.fingerprint = teacher_fingerprint(spec_teacher)
        key = api_key(spec_teacher)  # before anything slow: a missing variable is said at once
        self._secret = key
        self.pool = EndpointPool(spec_teacher)
        self.tokenizer = load_tokenizer(spec_teacher.tokenizer)
        self.mapper = token_mapper(self.tokenizer)
        t = spec_teacher.timeout
        connections = sum(e.concurrency for e in self.pool.endpoints)
        self._client = httpx2.Client(
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx2.Timeout(t.read, connect=t.connect),
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=transport,
            follow_redirects=False,
        )
        self._httpx = httpx2
        self._sleep = sleep
        self._lock = threading.Lock()
        self.stats: Counter = Counter()  # requests, retries, answers, unmapped_tokens, absent_topk, prompt_mismatch
        self._warned_prompt = False
        self._probe()

    # --- the protocol ---------------------------------------------------------

    def generate(self, prompts: list, on_batch: Callable[[list[int], list[TeacherOutput]], None] | None = None,
                 max_new_tokens: int | None = None) -> list[TeacherOutput]:
        """One output per prompt, in order; `on_batch([i], [output])` hears each answer as it arrives.

        The first request that fails for good stops the others from starting; the answers
        already in are still handed to on_batch (and so cached) before the error is raised.
        """
        from engine.prompts import as_conversation, prompt_ids

        # The prompt's length in the ids stored beside the answer (the tokenizer here, its chat template
        # for a chat), to check the server's reading against it; computed here, not in the workers.
        prompts = [as_conversation(p) for p in prompts]
        expected = [len(prompt_ids(self.tokenizer, p)) for p in prompts]
        outputs: list[TeacherOutput | None] = [None] * len(prompts)

        def answer(i: int, endpoint: Endpoint) -> TeacherOutput:
            return self._answer(prompts[i], expected[i], max_new_tokens, endpoint)

        def hand_over(i: int, output: TeacherOutput) -> None:
            outputs[i] = output
            if on_batch:
                on_batch([i], [output])

        self.pool.run(len(prompts), answer, hand_over)
        return outputs  # type: ignore[return-value]

    def endpoint_stats(self) -> list[dict]:
        """Per endpoint: requests sent, answers, tokens, failures, lost answers, requests moved, when taken out."""
        return self.pool.report()

    def close(self) -> None:
        self._client.close()

    def prompt_logprobs(self, pairs: list[tuple[str, str]]) -> list[tuple[float, int] | None]:
        """Per (plain-text prompt, continuation): the log-prob the server gives the continuation read after
        the prompt, from `POST /completions` with `echo: true, logprobs: 1` (option scoring,
        engine/teachers/options.py): (sum of its tokens' log-probs, their number as the server split it), or
        None where the echoed tokens before the answer do not end by spelling the continuation. Up to
        max_concurrency requests at once (per endpoint); the first that fails for good stops the rest and is raised."""
        found: list[tuple[float, int] | None] = [None] * len(pairs)

        def echo(i: int, endpoint: Endpoint) -> tuple[float, int] | None:
            text, tail = pairs[i]
            body = {**self.spec.extra_body, "model": self.spec.model, "prompt": text + tail, "max_tokens": 1,
                    "temperature": 0.0, "echo": True, "logprobs": 1, "n": 1, "stream": False}
            data = self._request("POST", "/completions", body, endpoint)
            self._count_answer(endpoint, data)
            return _echoed_logprob(data, tail)

        self.pool.run(len(pairs), echo, found.__setitem__)
        return found

    # --- one request ----------------------------------------------------------

    def _answer(self, prompt, expected_prompt_tokens: int, max_new_tokens: int | None,
                endpoint: Endpoint) -> TeacherOutput:
        """One request: a chat (`messages`, /chat/completions) or, for chat: false, plain text (/completions)."""
        gen = self.spec.generation
        body = {
            **self.spec.extra_body,
            "model": self.spec.model,
            "max_tokens": max_new_tokens or gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "seed": gen.seed,
            "n": 1,
            "stream": False,
        }
        if prompt.chat:
            body.update(messages=prompt.messages(), logprobs=True, top_logprobs=self.spec.logprobs.top_k)
        else:
            body.update(prompt=prompt.prompt, logprobs=self.spec.logprobs.top_k)
        data = self._request("POST", "/chat/completions" if prompt.chat else "/completions", body, endpoint)
        self._count_answer(endpoint, data)  # answered: never asked again, whatever its parsing says
        out = self._parse(data, chat=prompt.chat, url=endpoint.url)
        usage = data.get("usage") or {}
        with self._lock:
            self.stats["answers"] += 1
            self.stats["unmapped_tokens"] += out.unmapped_tokens
            if isinstance(usage.get("prompt_tokens"), int) and usage["prompt_tokens"] != expected_prompt_tokens:
                self.stats["prompt_mismatch"] += 1
                if not self._warned_prompt:
                    self._warned_prompt = True
                    if prompt.chat:
                        log.warning("teacher %s read %d prompt tokens where the tokenizer's chat template gives %d: "
                                    "the server's chat template differs from the one students are trained with",
                                    endpoint.url, usage["prompt_tokens"], expected_prompt_tokens)
                    else:
                        log.warning("teacher %s read %d prompt tokens where the tokenizer gives %d for the plain "
                                    "prompt: the server tokenizes it otherwise (a begin-of-text token?) than the "
                                    "students are trained with", endpoint.url, usage["prompt_tokens"],
                                    expected_prompt_tokens)
        return out

    def _count_answer(self, endpoint: Endpoint, data: dict) -> None:
        usage = data.get("usage") or {}
        tokens = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
        self.pool.count(endpoint, answers=1, **tokens)

    def _request(self, method: str, path: str, body: dict | None, endpoint: Endpoint) -> dict:
        """The JSON of a 200 answer, retrying what a retry can cure; TeacherError (one line) otherwise:
        EndpointFailed when the retries ran out (the server's fault: the pool may take it out)."""
        httpx2 = self._httpx
        url = endpoint.url + path
        stop = endpoint.halt
        retries = self.spec.retries
        problem, retry_after = "", None
        for attempt in range(retries.attempts):
            if attempt:
                delay = retry_after if retry_after is not None else retries.backoff * 2 ** (attempt - 1)
                delay = min(delay * (1 if retry_after is not None else random.uniform(0.8, 1.2)), retries.max_wait)
                self._wait(delay, stop)
                with self._lock:
                    self.stats["retries"] += 1
            if stop.is_set():
                raise Cancelled()
            retry_after = None
            with self._lock:
                self.stats["requests"] += 1
            self.pool.count(endpoint, requests=1)
            try:
                response = self._client.request(method, url, json=body)
            except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as e:  # never reached it
                problem = _transport_problem(e)
                self.pool.count(endpoint, failures=1)
                continue
            except httpx2.TransportError as e:  # sent, no answer back: the server may have done the work
                problem = _transport_problem(e)
                self.pool.count(endpoint, failures=1, lost_answers=1)
                continue
            status = response.status_code
            if status != 200:
                self.pool.count(endpoint, failures=1)
            if status == 429 or status >= 500:
                problem = f"HTTP {status}{_said(response)}"
                retry_after = _retry_after(response.headers.get("retry-after"))
                continue
            if status != 200:
                hint = ""
                if status in (401, 403):
                    hint = f" (check the key in ${self.spec.api_key_env})" if self.spec.api_key_env else \
                        " (the server wants a key: set teacher.api_key_env to the variable holding it)"
                elif status == 404 and path == "/models":
                    hint = " (base_url of an OpenAI-compatible server usually ends in /v1)"
                raise TeacherError(self._scrub(f"teacher server: {method} {url} answered HTTP {status}"
                                               f"{_said(response)}{hint}"))
            try:
                data = response.json()
            except ValueError:
                data, problem = None, "HTTP 200 with a body that is not JSON"
            if not isinstance(data, dict):
                problem = problem if data is None else "HTTP 200 with JSON that is not an object"
                self.pool.count(endpoint, failures=1, lost_answers=1)  # it answered, unreadably: maybe paid
                continue
            return data
        raise EndpointFailed(self._scrub(f"teacher server: {method} {url} failed after {retries.attempts} "
                                         f"{'try' if retries.attempts == 1 else 'tries'}: {problem}"))

    def _wait(self, seconds: float, stop: threading.Event | None) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        elif stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)

    def _probe(self) -> None:
        """Fail before any work when no server can be reached or one does not serve the model.

        A single URL that does not answer fails the run with its own error; in a pool it is left out
        with a warning, and all of them not answering is one error naming each."""
        endpoints = self.pool.endpoints
        with ThreadPoolExecutor(max_workers=len(endpoints), thread_name_prefix="teacher-probe") as probes:
            listed = list(probes.map(self._listed_model, endpoints))
        if not self.pool.live():
            raise self.pool.none_left("probe")
        found = {e.url: entry for e, entry in zip(endpoints, listed) if e.taken_out is None}
        if len({json.dumps(entry, sort_keys=True) for entry in found.values()}) > 1:
            said = ", ".join(f"{url} {json.dumps(entry, sort_keys=True)}" for url, entry in found.items())
            raise TeacherError(self._scrub(f"teacher.base_url: the endpoints serve {self.spec.model!r} differently "
                                           f"(a pool needs the same model behind each): {said}"))

    def _listed_model(self, endpoint: Endpoint) -> dict:
        """What GET /models says of teacher.model: the fields naming its weights (vLLM's root, parent,
        max_model_len; llama.cpp's server lists the name only). Left out of the pool when it does not answer."""
        try:
            data = self._request("GET", "/models", None, endpoint)
        except EndpointFailed as e:
            self.pool.take_out(endpoint, e, "probe")
            return {}
        entries = [m for m in data.get("data") or [] if isinstance(m, dict)]
        served = [m.get("id") for m in entries]
        if served and self.spec.model not in served:
            shown = ", ".join(repr(s) for s in served[:10]) + (f" and {len(served) - 10} more" if len(served) > 10 else "")
            raise TeacherError(self._scrub(f"teacher.model: {self.spec.model!r} is not served at {endpoint.url} "
                                           f"(GET {endpoint.url}/models lists {shown})"))
        entry = next((m for m in entries if m.get("id") == self.spec.model), {})
        return {k: entry[k] for k in ("root", "parent", "max_model_len") if entry.get(k) is not None}

    def _scrub(self, message: str) -> str:
        message = " ".join(message.split())  # one line, whatever a server said
        return message.replace(self._secret, "***") if self._secret else message

    # --- one answer -----------------------------------------------------------

    def _parse(self, data: dict, chat: bool = True, url: str | None = None) -> TeacherOutput:
        url = url or self.pool.endpoints[0].url
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise TeacherError(self._scrub(f"teacher server {url}: an answer without choices "
                                           f"({json.dumps(data)[:200]})")) from None
        if chat:
            content = (choice.get("message") or {}).get("content") or ""
            entries = (choice.get("logprobs") or {}).get("content")
        else:
            content = choice.get("text") or ""
            entries = _completion_entries(choice.get("logprobs"))
        if entries is None or (entries == [] and content):
            raise TeacherError(f"teacher server {url} {NO_LOGPROBS}")
        k = self.spec.logprobs.top_k
        if entries and not any(e.get("top_logprobs") for e in entries):
            raise TeacherError(f"teacher server {url} {NO_LOGPROBS}".replace("without logprobs",
                                                                                       "without top_logprobs"))
        chosen, unmapped = self.mapper.chosen_ids(entries, content)
        top_ids = np.empty((len(entries), k), dtype=np.int32)
        top_lps = np.empty((len(entries), k), dtype=np.float16)
        absent = 0
        for row, entry in enumerate(entries):
            pairs: dict[int, float] = {}
            for alt in entry.get("top_logprobs") or []:
                lp = alt.get("logprob")
                if not isinstance(lp, (int, float)):
                    continue  # no number to keep: an absent slot
                i = self.mapper.token_id(alt)
                if i is None:
                    unmapped += 1
                elif i not in pairs or lp > pairs[i]:
                    pairs[i] = float(lp)
            ranked = sorted(pairs.items(), key=lambda p: -p[1])[:k]
            absent += k - len(ranked)
            fill = ranked[0][0] if ranked else max(int(chosen[row]), 0)
            ranked += [(fill, float("-inf"))] * (k - len(ranked))
            top_ids[row] = [i for i, _ in ranked]
            top_lps[row] = [lp for _, lp in ranked]
        if absent:
            with self._lock:
                self.stats["absent_topk"] += absent
        return TeacherOutput(
            text=content.strip(),
            token_ids=np.asarray(chosen, dtype=np.int32),
            token_logprobs=np.asarray([_number(e.get("logprob")) for e in entries], dtype=np.float32),
            topk_ids=top_ids,
            topk_logprobs=top_lps,
            finish_reason=_finish_reason(choice.get("finish_reason")),
            unmapped_tokens=unmapped,
        )


def _echoed_logprob(data: dict, tail: str) -> tuple[float, int] | None:
    """(summed log-prob, tokens) of the echoed tokens that spell `tail` at the end of the prompt, or None.

    The answer's own tokens (usage.completion_tokens) may follow the echo or not (llama-cpp-python lists
    no entry for a token it did not evaluate): both are tried."""
    try:
        logprobs = data["choices"][0]["logprobs"]
        tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
        return None
    answered = (data.get("usage") or {}).get("completion_tokens")
    for skip in dict.fromkeys((answered if isinstance(answered, int) else 0, 0)):
        end, text, start = len(tokens) - skip, "", len(tokens) - skip
        while start > 1 and len(text) < len(tail) and isinstance(tokens[start - 1], str):
            start -= 1
            text = tokens[start] + text
        read = values[start:end]
        if end > start and text == tail and all(isinstance(v, (int, float)) and math.isfinite(v) for v in read):
            return float(sum(read)), end - start
    return None


def _completion_entries(logprobs) -> list[dict] | None:
    """The completions API's logprobs ({tokens, token_logprobs, top_logprobs: [{text: log-prob}]}) as the
    chat API's token entries ({token, logprob, top_logprobs: [{token, logprob}]}); None: none given."""
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
        return None
    tokens = logprobs["tokens"]
    chosen = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    entries = []
    for token, lp, top in zip(tokens, chosen, tops):
        alternatives = [{"token": t, "logprob": v} for t, v in top.items()] if isinstance(top, dict) else []
        entries.append({"token": token, "logprob": lp, "top_logprobs": alternatives})
    return entries


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _finish_reason(reason) -> str | None:
    """"stop" (the model ended its answer) or "length" (max_tokens); another server word is kept as said."""
    if reason in ("stop", "eos", "end_turn", "stop_sequence"):
        return "stop"
    return reason


def _transport_problem(e: Exception) -> str:
    if "Timeout" in type(e).__name__:
        return f"no answer within the timeout ({type(e).__name__})"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _said(response) -> str:
    """What an error answer said, short: the OpenAI-style error message or the start of the body."""
    try:
        data = response.json()
        text = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("detail") or data
        text = text if isinstance(text, str) else json.dumps(text)
    except Exception:
        text = response.text
    text = " ".join(str(text).split())
    return f": {text[:200]}" if text else ""


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- token strings to ids ----------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE vocabularies spell byte b as chr(table[b])."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Every id's raw bytes, as a server renders them (special tokens: their text)."""
    decoder = tokenizer.backend_tokenizer.decoder
    kinds = decoder.__getstate__().decode() if decoder is not None else ""  # its JSON: the kinds of decoding
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    table = _byte_decoder() if '"ByteLevel"' in kinds else None
    out = {}
    for text, i in tokenizer.get_vocab().items():
        if i in special:
            out[i] = special[i].encode()
        elif table is not None:
            try:
                out[i] = bytes(table[c] for c in text)
            except KeyError:
                out[i] = text.encode()
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):  # SentencePiece byte fallback
            out[i] = bytes([int(text[3:5], 16)])
        elif '"Metaspace"' in kinds or "\u2581" in kinds:
            out[i] = text.replace("\u2581", " ").encode()
        else:
            out[i] = tokenizer.convert_tokens_to_string([text]).encode()
    return out


_MAPPERS: dict[tuple, TokenMapper] = {}


def token_mapper(tokenizer) -> TokenMapper:
    """One TokenMapper per tokenizer folder and vocabulary (building one takes a second or two)."""
    key = (tokenizer.name_or_path, len(tokenizer), tuple(sorted(tokenizer.added_tokens_decoder)))
    with _MAPPERS_LOCK:
        if key not in _MAPPERS:
            _MAPPERS[key] = TokenMapper(tokenizer)
        return _MAPPERS[key]


_MAPPERS_LOCK = threading.Lock()


class TokenMapper:
    """Token ids for the token entries of a chat-completions answer, never guessed."""

    def __init__(self, tokenizer):
        self.bytes_of = token_bytes(tokenizer)
        self.size = max(self.bytes_of) + 1
        self.special = set(tokenizer.added_tokens_decoder)
        by_bytes: dict[bytes, list[int]] = defaultdict(list)
        by_text: dict[str, set[int]] = defaultdict(set)
        for i, b in self.bytes_of.items():
            by_bytes[b].append(i)
            # How servers render a token: its UTF-8 text, partial characters dropped (llama.cpp)
            # or replaced by U+FFFD (vLLM); a special token by its text or by nothing.
            by_text[b.decode("utf-8", errors="ignore")].add(i)
            by_text[b.decode("utf-8", errors="replace")].add(i)
            if i in self.special:
                by_text[""].add(i)
        # Where two ids share their bytes, a special token never stands for plain text.
        self.by_bytes = {}
        for b, ids in by_bytes.items():
            plain = [i for i in ids if i not in self.special] or ids
            self.by_bytes[b] = plain[0] if len(plain) == 1 else None
        self.by_text = {t: sorted(ids) for t, ids in by_text.items()}

    def candidates(self, entry: dict) -> list[int]:
        """The ids an entry may stand for (one: mapped; none or several: not on its own)."""
        token = entry.get("token")
        if isinstance(token, str) and token.startswith("token_id:"):
            try:
                i = int(token[len("token_id:"):])
            except ValueError:
                return []
            return [i] if 0 <= i < self.size else []
        raw = entry.get("bytes")
        if isinstance(raw, list) and raw:
            try:
                i = self.by_bytes.get(bytes(raw))
            except (TypeError, ValueError):
                i = None
            return [] if i is None else [i]
        if not isinstance(token, str):
            return []
        return self.by_text.get(token, [])

    def token_id(self, entry: dict) -> int | None:
        found = self.candidates(entry)
        return found[0] if len(found) == 1 else None

    def chosen_ids(self, entries: list[dict], content: str) -> tuple[list[int], int]:
        """Ids of the generated tokens and how many could not be mapped (stored as -1).

        A token whose text several ids render to is resolved by the answer's text: the
        chosen tokens' bytes, concatenated, spell it. Where every segmentation of the text
        that fits all entries agrees on one id, that id is certain; otherwise it stays -1.
        """
        cands = [self.candidates(e) for e in entries]
        if all(len(c) == 1 for c in cands):
            return [c[0] for c in cands], 0
        resolved = self._segment(cands, content.encode("utf-8"))
        ids = []
        for c, r in zip(cands, resolved):
            ids.append(c[0] if len(c) == 1 else r if r is not None else -1)
        return ids, sum(i == -1 for i in ids)

    def _segment(self, cands: list[list[int]], text: bytes) -> list[int | None]:
        """Per position, the one id that every full segmentation of `text` gives it (None: not one)."""
        n = len(cands)
        # forward[i]: byte offsets reachable after i tokens; a special token may render as nothing.
        forward: list[set[int]] = [{0}]
        for c in cands:
            nxt = set()
            for off in forward[-1]:
                for i in c:
                    b = self.bytes_of[i]
                    if text.startswith(b, off):
                        nxt.add(off + len(b))
                    if i in self.special:
                        nxt.add(off)
            forward.append(nxt)
            if not nxt:
                return [None] * n
        if len(text) not in forward[n]:
            return [None] * n
        # backward: keep the steps that lie on a path to the end; a position is certain when one id remains.
        ends, result = {len(text)}, [None] * n
        for pos in range(n - 1, -1, -1):
            used, starts = set(), set()
            for off in forward[pos]:
                for i in cands[pos]:
                    b = self.bytes_of[i]
                    steps = ([off + len(b)] if text.startswith(b, off) else []) + ([off] if i in self.special else [])
                    if any(s in ends for s in steps):
                        used.add(i)
                        starts.add(off)
            result[pos] = used.pop() if len(used) == 1 else None
            ends = starts
        return result
