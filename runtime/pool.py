"""Whole images over a pool of RPC servers: one worker thread per server session.

Each worker asks the tracker for a free server of the key (``rpc.Tracker.request``: the tracker
does the scheduling), opens a ``rpc.RemoteBackend`` on it and takes images off a shared queue
until none is left, running the sampler here with that backend. The RPC calls release the
GIL, so N workers keep N servers busy from one process.

Faults: work whose server fails (``rpc.ServerLost``: died, hung past the timeout, dropped the
link) goes back to the front of the queue and its worker asks the tracker for another server.
A worker whose request times out leaves quietly while others still hold a session; the last
one raises ``rpc.NoServer``. Results come back to the calling thread, which writes them, so
a file is written once, whole, or not at all.

One image is never split across servers: the sampler calls the network tile after tile and
needs each result before the next call, so a single large image runs on one server.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .api import Upscaler
from .artifact import Artifact
from .rpc import NoServer, RemoteBackend, ServerLost, Tracker, no_server

Job = TypeVar("Job")
Result = TypeVar("Result")
JOIN_S = 10.0          # how long stopped workers get to leave


@dataclass(eq=False)
class _Worker:
    tracker: Tracker | None = None
    backend: RemoteBackend | None = None
    alive: bool = True
    thread: threading.Thread | None = field(default=None, repr=False)


class Pool(Generic[Job, Result]):
    """``run(jobs, work, done)``: ``work(upscaler, job)`` on a server's session, in a worker;
    ``done(job, result, server)`` in the calling thread, once per job."""

    def __init__(self, artifact: Artifact, tracker: tuple[str, int], key: str, *,
                 devices: int | None, timeout: float,
                 log: Callable[[str], None] = lambda msg: None) -> None:
        self.artifact, self.address, self.key = artifact, tracker, key
        self.devices, self.timeout, self.log = devices, timeout, log
        self._cv = threading.Condition()
        self._pending: deque[int] = deque()
        self._results: deque[tuple[int, Any, str]] = deque()
        self._workers: list[_Worker] = []
        self._fatal: BaseException | None = None
        self._stopped = False

    def run(self, jobs: Sequence[Job], work: Callable[[Upscaler, Job], Result],
            done: Callable[[Job, Result, str], None]) -> None:
        probe = Tracker(self.address, self.timeout)
        try:
            servers = probe.wait_for_servers(self.key, self.timeout)
        finally:
            probe.close()
        n = max(1, min(len(jobs), self.devices or len(servers)))
        self._pending.extend(range(len(jobs)))
        self._workers = [_Worker() for _ in range(n)]
        for w in self._workers:
            w.thread = threading.Thread(target=self._work, args=(w, jobs, work), daemon=True,
                                        name="bidiff-rpc-worker")
            w.thread.start()
        left = len(jobs)
        try:
            while left:
                with self._cv:
                    self._cv.wait_for(lambda: self._results or self._fatal is not None
                                      or not any(w.alive for w in self._workers), timeout=0.5)
                    if self._fatal is not None:
                        raise self._fatal
                    batch = list(self._results)
                    self._results.clear()
                    if not batch and not any(w.alive for w in self._workers):
                        raise no_server(self.key, f"{self.address[0]}:{self.address[1]}",
                                        self.timeout)
                for idx, result, where in batch:
                    done(jobs[idx], result, where)
                    left -= 1
                for w in list(self._workers):
                    b = w.backend
                    if b is not None and b.abort():
                        self.log(f"server {b.where} gave no answer within {self.timeout:g} s: "
                                 "cut off")
        finally:
            self._stop()

    def _stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        for w in self._workers:
            if w.tracker is not None:
                w.tracker.abort()
        end = time.monotonic() + JOIN_S
        for w in self._workers:
            if w.thread is not None:
                w.thread.join(max(0.0, end - time.monotonic()))

    def _next(self) -> int | None:
        with self._cv:
            if self._stopped or self._fatal is not None or not self._pending:
                return None
            return self._pending.popleft()

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            if self._fatal is None:
                self._fatal = e
            self._cv.notify_all()

    def _work(self, w: _Worker, jobs: Sequence[Job], work: Callable[[Upscaler, Job], Result]) -> None:
        try:
            while True:
                with self._cv:
                    if self._stopped or self._fatal is not None or not self._pending:
                        return
                try:
                    w.tracker = Tracker(self.address, self.timeout)
                    host, port, matchkey = w.tracker.request(self.key, self.timeout)
                    w.backend = RemoteBackend(self.artifact, host, port, matchkey, timeout=self.timeout)
                    w.backend.start()          # watched: a server that hangs here is cut off
                except NoServer as e:
                    with self._cv:
                        if self._stopped or any(o.backend is not None for o in self._workers if o is not w):
                            return              # the others carry on
                    self._fail(e)
                    return
                except ServerLost as e:
                    self._close(w)
                    self.log(f"{e}; asking for another server")
                    continue
                finally:
                    if w.tracker is not None:
                        w.tracker.close()
                        w.tracker = None
                up = Upscaler(self.artifact, w.backend)
                while (idx := self._next()) is not None:
                    try:
                        result = work(up, jobs[idx])
                    except ServerLost as e:
                        with self._cv:
                            self._pending.appendleft(idx)
                        self.log(f"{e}; its image goes to another server")
                        break
                    with self._cv:
                        self._results.append((idx, result, w.backend.where))
                        self._cv.notify_all()
                else:
                    return
                self._close(w)
        except BaseException as e:          # noqa: BLE001 (handed to the calling thread)
            self._fail(e)
        finally:
            self._close(w)
            with self._cv:
                w.alive = False
                self._cv.notify_all()

    @staticmethod
    def _close(w: _Worker) -> None:
        b, w.backend = w.backend, None
        if b is not None:
            b.close()


__all__ = ["Pool"]
