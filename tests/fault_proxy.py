"""A small HTTP proxy on 127.0.0.1 that injects faults in front of a real OpenAI-compatible server.

Chat-completion requests take the next fault of `faults` (in order of arrival), if any:

    "500"   answer 500 itself, without forwarding
    "429"   answer 429 with Retry-After: `retry_after` seconds, without forwarding
    "slow"  hold the request `slow_seconds` (past the client's timeout), then close, without forwarding
    "drop"  close the connection without an answer, without forwarding
    "die"   the proxy dies as a crashed server would: this request and every later one (on a kept-alive
            connection) is dropped, new connections are refused, and an answer the server gives after
            the death is thrown away (counted in `lost`: work the server did that no client got)

Everything else is forwarded. `received` counts what reached the proxy; `answered` counts, per
prompt (the last message's content), the chat requests the server answered with 200. With
`strip_logprobs`, answers are forwarded without their logprobs (a server that gives none).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FaultProxy:
    def __init__(self, upstream: str, faults=(), *, retry_after: float = 1, slow_seconds: float = 5,
                 strip_logprobs: bool = False):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.faults = list(faults)
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.strip_logprobs = strip_logprobs
        self.lock = threading.Lock()
        self.received: Counter = Counter()  # path -> requests that reached the proxy
        self.injected: Counter = Counter()  # fault -> times injected
        self.answered: Counter = Counter()  # prompt -> chat requests the server answered with 200
        self.lost: Counter = Counter()  # prompt -> answers the server gave after "die", never delivered
        self.dead = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def _stop_listening(self) -> None:
        """New connections are refused from now on (connections already open are dropped by the handler)."""
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self.lock:
            self.received.clear()
            self.injected.clear()
            self.answered.clear()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients expect of a server

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                self._serve()

            def do_POST(self):
                self._serve()

            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.dead:
                    return self._drop()
                chat = self.path.endswith("/chat/completions")
                with proxy.lock:
                    proxy.received[self.path] += 1
                    fault = proxy.faults.pop(0) if chat and proxy.faults else None
                    if fault:
                        proxy.injected[fault] += 1
                if fault == "500":
                    return self._reply(500, json.dumps({"error": {"message": "injected"}}).encode())
                if fault == "429":
                    return self._reply(429, json.dumps({"error": {"message": "injected"}}).encode(),
                                       {"Retry-After": str(proxy.retry_after)})
                if fault in ("slow", "drop"):
                    if fault == "slow":
                        time.sleep(proxy.slow_seconds)
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if fault == "die":
                    proxy.dead = True
                    threading.Thread(target=proxy._stop_listening, daemon=True).start()
                    return self._drop()
                if fault is not None:
                    raise ValueError(f"unknown fault {fault!r}")
                self._forward(body, chat)

            def _forward(self, body: bytes, chat: bool):
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=600)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() in ("content-type", "authorization", "accept")}
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    status, kind = response.status, response.getheader("Content-Type", "application/json")
                finally:
                    upstream.close()
                if proxy.dead:  # the server did the work; a dead proxy cannot deliver it
                    if chat and status == 200:
                        with proxy.lock:
                            proxy.lost[json.loads(body)["messages"][-1]["content"]] += 1
                    return self._drop()
                if chat and status == 200:
                    prompt = json.loads(body)["messages"][-1]["content"]
                    with proxy.lock:
                        proxy.answered[prompt] += 1
                    if proxy.strip_logprobs:
                        answer = json.loads(data)
                        for choice in answer.get("choices", []):
                            choice["logprobs"] = None
                        data = json.dumps(answer).encode()
                self._reply(status, data, {"Content-Type": kind})

            def _drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _reply(self, status: int, data: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
