"""The servers that answer for one openai teacher: `teacher.base_url` as one URL, or a list of them (a pool).

Work is one shared queue. Each endpoint runs `concurrency` workers (its own entry's, else
teacher.max_concurrency) that take the next request from the queue, so a faster server takes more.

An endpoint where a request fails for good for a reason of the server's (EndpointFailed: refused or
dropped connections, timeouts, 5xx or 429 after its retries) is taken out: it takes no new request, a
request of it waiting to retry moves at once, and the failed request goes back to the front of the queue
for the others. A single URL is a pool of one: when it is taken out the run fails with its own error.

Never paid twice: a request is sent to one endpoint at a time (no hedging), an answer that came back is
handed over once and never asked again, and so cached once. What cannot be known is said: a request whose
answer was lost on the way back (a timeout or dropped connection after it was sent: the server may have
done the work) is counted as `lost_answers` where it was sent, before it is asked again.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from engine.errors import TeacherError

log = logging.getLogger(__name__)

# Per endpoint: HTTP requests sent (retries included), answers taken, their usage tokens, tries that failed,
# tries sent whose answer never came back (maybe paid), requests that failed here and moved to another.
STATS = ("requests", "answers", "prompt_tokens", "completion_tokens", "failures", "lost_answers",
         "retried_elsewhere")


class EndpointFailed(TeacherError):
    """A request failed for good on one endpoint for a reason of the server's, not of the request."""


class Cancelled(Exception):
    """A request given up: the run stops, or its endpoint was taken out (then it moves to another)."""


@dataclass
class Endpoint:
    url: str
    concurrency: int
    stats: Counter = field(default_factory=Counter)
    taken_out: dict | None = None  # when and why it left the pool
    error: TeacherError | None = None  # the failure that took it out
    halt: threading.Event = field(default_factory=threading.Event)  # its requests stop waiting and retrying

    def report(self) -> dict:
        return {"url": self.url, "concurrency": self.concurrency, **{k: self.stats[k] for k in STATS},
                "taken_out": self.taken_out}


def endpoints_of(spec_teacher) -> list[Endpoint]:
    if isinstance(spec_teacher.base_url, str):
        return [Endpoint(spec_teacher.base_url, spec_teacher.max_concurrency)]
    return [Endpoint(e.url, e.concurrency or spec_teacher.max_concurrency) for e in spec_teacher.base_url]


def urls_of(spec_teacher) -> str:
    return ", ".join(e.url for e in endpoints_of(spec_teacher))


class EndpointPool:
    def __init__(self, spec_teacher):
        self.endpoints = endpoints_of(spec_teacher)
        self.single = isinstance(spec_teacher.base_url, str)  # one URL: its own errors, as before pools
        self.lock = threading.Lock()

    def live(self) -> list[Endpoint]:
        return [e for e in self.endpoints if e.taken_out is None]

    def count(self, endpoint: Endpoint, **amounts: int) -> None:
        with self.lock:
            endpoint.stats.update(amounts)

    def report(self) -> list[dict]:
        with self.lock:
            return [e.report() for e in self.endpoints]

    def take_out(self, endpoint: Endpoint, error: TeacherError, during: str) -> None:
        with self.lock:
            if endpoint.taken_out is not None:
                return
            answered = sum(e.stats["answers"] for e in self.endpoints)
            endpoint.taken_out = {"during": during, "after_pool_answers": answered, "reason": str(error)}
            endpoint.error = error
        endpoint.halt.set()
        if not self.single:
            how = "left out of the pool: it does not answer" if during == "probe" else "taken out of the pool mid-run"
            log.warning("teacher endpoint %s %s: %s", endpoint.url, how, error)

    def none_left(self, during: str) -> TeacherError:
        """The run's error once every endpoint is out: a single URL's own, else one line naming them all."""
        if self.single:
            return self.endpoints[0].error
        said = "; ".join(f"{e.url} ({e.error})" for e in self.endpoints)
        verb = "answered" if during == "probe" else "is left"
        return TeacherError(f"teacher.base_url: no endpoint {verb}: {said}")

    # --- running requests -------------------------------------------------------

    def run(self, count: int, send: Callable[[int, Endpoint], object],
            on_result: Callable[[int, object], None]) -> None:
        """send(i, endpoint) for i in range(count) on the live endpoints' workers; on_result(i, result) here,
        on the caller's thread, as each answer arrives (the request cache's connection lives here).

        The first failure that is not the server's stops the rest (answers already in are still handed
        over) and is raised; so is the end of the pool when every endpoint has been taken out."""
        if self.single:  # one URL is asked again on each call, as it was before pools
            self.endpoints[0].taken_out = None
        if not self.live():
            raise self.none_left("run")
        run = _Run(count)
        workers = [e for e in self.live() for _ in range(e.concurrency)]
        for e in self.live():
            e.halt.clear()
        results: queue.Queue = queue.Queue()
        executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="teacher")
        for endpoint in workers:
            executor.submit(self._work, endpoint, run, send, results)
        error, done, exited = None, 0, 0
        try:
            while exited < len(workers):
                kind, i, value = results.get()
                if kind == "exit":
                    exited += 1
                elif kind == "error":
                    error = error or value
                else:
                    on_result(i, value)
                    done += 1
        except BaseException:  # Ctrl-C or on_result failing: nothing new starts; requests in flight end
            self._stop(run)
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        executor.shutdown(wait=True)
        if error is not None:
            raise error
        if done < count:
            raise self.none_left("run")

    def _work(self, endpoint: Endpoint, run: _Run, send, results: queue.Queue) -> None:
        try:
            while (i := run.take(endpoint)) is not None:
                try:
                    value = send(i, endpoint)
                except EndpointFailed as e:
                    self.take_out(endpoint, e, "run")
                    self._move(endpoint, run, i)
                except Cancelled:
                    if endpoint.taken_out is not None and not run.stopped:
                        self._move(endpoint, run, i)
                    else:
                        run.finish()
                except BaseException as e:  # the request's own fault (4xx, no logprobs): the run stops
                    self._stop(run)
                    results.put(("error", i, e))
                    run.finish()
                else:
                    results.put(("answer", i, value))
                    run.finish()
        finally:
            results.put(("exit", None, None))

    def _move(self, endpoint: Endpoint, run: _Run, i: int) -> None:
        if self.live():
            self.count(endpoint, retried_elsewhere=1)
        run.give_back(i)

    def _stop(self, run: _Run) -> None:
        run.stop()
        for e in self.endpoints:
            e.halt.set()


class _Run:
    """The queue of one run: what is still to ask, how many are being asked, whether it stops."""

    def __init__(self, count: int):
        self.todo = deque(range(count))
        self.in_flight = 0
        self.stopped = False
        self.cond = threading.Condition()

    def take(self, endpoint: Endpoint) -> int | None:
        """The next request for this endpoint's worker; None: it is done (nothing left, stop, taken out)."""
        with self.cond:
            # A request in flight elsewhere may still come back to the queue: wait for it.
            while not self.todo and self.in_flight and not self.stopped and endpoint.taken_out is None:
                self.cond.wait()
            if self.stopped or endpoint.taken_out is not None or not self.todo:
                return None
            self.in_flight += 1
            return self.todo.popleft()

    def finish(self) -> None:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def give_back(self, i: int) -> None:
        with self.cond:
            self.todo.appendleft(i)  # first in line: it has waited longest
            self.in_flight -= 1
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
