"""Images over a pool of RPC servers: one worker thread per server session.

Each worker asks the tracker for a free server of the key (``rpc.Tracker.request``: the tracker
does the scheduling), opens a ``rpc.RemoteBackend`` on it and takes images off a shared queue
until none is left, running the sampler here with that backend. The RPC calls release the
GIL, so N workers keep N servers busy from one process. Given each job's width (its tiles per
DDIM step), no more workers start than the jobs' widths add up to: a session beyond that would
upload the artifact and never get a tile.

Fewer images than servers (one large photo; the last images of a folder): a worker that finds
the queue empty joins an image in progress and evaluates its tiles (:class:`_Share`). Within
a DDIM step the tiles are independent network calls, so each session takes the next tile not
yet taken; the sampler gets the outputs back in tile order and blends them as a local run does,
so the bytes do not depend on which server computed what. Outputs that arrive ahead of an
earlier tile wait for it: at most one step's tiles.

Faults: work whose server fails (``rpc.ServerLost``: died, hung past the timeout, dropped the
link) goes back: a tile to the image's other sessions, an image with no other session to the
front of the queue; the worker asks the tracker for another server. A worker whose request
times out leaves quietly while others still hold a session; the last one raises
``rpc.NoServer``. Results come back to the calling thread, which writes them, so a file is
written once, whole, or not at all.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from .api import Upscaler
from .artifact import Artifact
from .rpc import NoServer, RemoteBackend, ServerLost, Tracker, no_server
from .sampler import TileInput

Job = TypeVar("Job")
Result = TypeVar("Result")
JOIN_S = 10.0          # how long stopped workers get to leave
_Task = tuple[int, int, int, np.ndarray, np.ndarray, np.ndarray]   # step, tile, group, x_t, cond, t


class _Stopped(Exception):
    """The pool stopped (a fatal error elsewhere, or the caller left) while an image waited."""


@dataclass(eq=False)
class _Worker:
    tracker: Tracker | None = None
    backend: RemoteBackend | None = None
    alive: bool = True
    thread: threading.Thread | None = field(default=None, repr=False)


class _Share:
    """One image's network calls, open to every idle session of the pool: the sampler's model.

    The image's worker runs the sampler with this as its backend; per step, :meth:`run_tiles`
    posts the step's tiles and yields their outputs in tile order, meanwhile taking tiles itself
    on its own server. Helpers (:meth:`help`) take tiles in their own worker threads. All
    state is guarded by the pool's condition. ``calls``: network calls per server, the report.
    """

    def __init__(self, pool: "Pool", own: RemoteBackend) -> None:
        self.pool, self.own = pool, own
        self.name, self.tile, self.input_multiple = own.name, own.tile, own.input_multiple
        self.calls: dict[str, int] = {own.where: 0}
        self.own_lost = False            # the own server failed; the image went on with helpers
        self.helpers = 0
        self.finished = False
        self._step = 0                   # tags tiles, so a late output never lands in another step
        self._todo: deque[int] = deque()
        self._out: dict[int, np.ndarray] = {}
        self._input: tuple[int, np.ndarray, TileInput] | None = None

    def run(self, group: int, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> np.ndarray:
        """One tile (``EpsModel``), through the shared path like every other."""
        return list(self.run_tiles(group, t, 1, lambda k: (x_t, cond)))[0]

    def run_tiles(self, group: int, t: np.ndarray, n: int, tile_input: TileInput) -> Iterator[np.ndarray]:
        """``sampler.run_in_turn``'s contract, over this session and the helpers'."""
        cv = self.pool._cv
        with cv:
            self._step += 1
            self._input = (group, t.copy(), tile_input)
            self._todo.extend(range(n))
            self._out.clear()
            cv.notify_all()
        try:
            for k in range(n):
                while True:
                    with cv:
                        while k not in self._out:
                            if self.pool._cancelled():
                                raise _Stopped
                            if self._todo and not self.own_lost:
                                break
                            if self.own_lost and not self.helpers:
                                raise ServerLost(f"server {self.own.where} failed earlier and the "
                                                 "servers helping with its image left")
                            cv.wait()
                        out = self._out.pop(k, None)
                        task = self._take() if out is None else None
                    if out is not None:
                        yield out
                        break
                    try:
                        self._run(self.own, task)
                    except ServerLost as e:
                        with cv:
                            self.own_lost, alone = True, not self.helpers
                        if alone:
                            raise
                        self.pool.log(f"{e}; its tiles go to the image's other servers")
        finally:
            with cv:
                self._todo.clear()
                self._out.clear()
                self._input = None

    def help(self, backend: RemoteBackend) -> None:
        """Take this image's tiles on ``backend`` (an idle worker's session) until the image is
        done or whole images wait in the queue again. ServerLost: the tile went back."""
        cv = self.pool._cv
        with cv:
            self.helpers += 1
            self.calls.setdefault(backend.where, 0)
        try:
            while True:
                with cv:
                    cv.wait_for(lambda: self._todo or self.finished or self.pool._pending
                                or self.pool._cancelled())
                    if self.finished or self.pool._pending or self.pool._cancelled():
                        return
                    task = self._take()
                self._run(backend, task)
        finally:
            with cv:
                self.helpers -= 1
                cv.notify_all()

    def _take(self) -> _Task:
        """The next tile with its inputs (under the lock: the step's arrays are read here only)."""
        k = self._todo.popleft()
        group, t, tile_input = self._input
        return (self._step, k, group, *tile_input(k), t)

    def _run(self, backend: RemoteBackend, task: _Task) -> None:
        step, k, group, x_t, cond, t = task
        cv = self.pool._cv
        try:
            out = backend.run(group, x_t, cond, t)
        except ServerLost:
            with cv:
                if step == self._step and self._input is not None:
                    self._todo.appendleft(k)
                cv.notify_all()
            raise
        with cv:
            if step == self._step and self._input is not None:
                self._out[k] = out
                self.calls[backend.where] += 1
            cv.notify_all()

    def close(self) -> None:
        """Nothing: the sessions belong to the workers."""


class Pool(Generic[Job, Result]):
    """``run(jobs, work, done, started)``: ``work(upscaler, job)`` on a server's session, in a
    worker; ``done(job, result, calls)`` in the calling thread, once per job, with the network
    calls each server made for it (HOST:PORT -> count, the image's own server first);
    ``started(job, where)`` in the worker, each time a server (HOST:PORT) takes the job, so a
    run without progress bars still shows what each server holds (a job put back starts again).
    ``width(job)``: the job's tiles per step, the most sessions it can keep busy at once (None,
    or no ``width``: unknown); the pool opens at most their sum, else one per server."""

    def __init__(self, artifact: Artifact, tracker: tuple[str, int], key: str, *,
                 devices: int | None, timeout: float,
                 log: Callable[[str], None] = lambda msg: None) -> None:
        self.artifact, self.address, self.key = artifact, tracker, key
        self.devices, self.timeout, self.log = devices, timeout, log
        self._cv = threading.Condition()
        self._pending: deque[int] = deque()
        self._shares: list[_Share] = []
        self._results: deque[tuple[int, Any, dict[str, int]]] = deque()
        self._workers: list[_Worker] = []
        self._fatal: BaseException | None = None
        self._stopped = False

    def run(self, jobs: Sequence[Job], work: Callable[[Upscaler, Job], Result],
            done: Callable[[Job, Result, dict[str, int]], None],
            started: Callable[[Job, str], None] = lambda job, where: None, *,
            width: Callable[[Job], int | None] | None = None) -> None:
        probe = Tracker(self.address, self.timeout)
        try:
            servers = probe.wait_for_servers(self.key, self.timeout)
        finally:
            probe.close()
        n = self.devices or len(servers)            # more servers than images share tiles,
        useful = _total_width(jobs, width)          # up to the images' tiles per step
        n = max(1, n if useful is None else min(n, useful))
        self._pending.extend(range(len(jobs)))
        self._workers = [_Worker() for _ in range(n)]
        for w in self._workers:
            w.thread = threading.Thread(target=self._work, args=(w, jobs, work, started), daemon=True,
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
                for idx, result, calls in batch:
                    done(jobs[idx], result, calls)
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

    def _cancelled(self) -> bool:
        return self._stopped or self._fatal is not None

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            if self._fatal is None:
                self._fatal = e
            self._cv.notify_all()

    def _work(self, w: _Worker, jobs: Sequence[Job], work: Callable[[Upscaler, Job], Result],
              started: Callable[[Job, str], None]) -> None:
        try:
            while True:
                with self._cv:
                    if self._cancelled() or not (self._pending or self._shares):
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
                if self._serve(w, jobs, work, started):
                    return
                self._close(w)
        except _Stopped:
            pass
        except BaseException as e:          # noqa: BLE001 (handed to the calling thread)
            self._fail(e)
        finally:
            self._close(w)
            with self._cv:
                w.alive = False
                self._cv.notify_all()

    def _serve(self, w: _Worker, jobs: Sequence[Job], work: Callable[[Upscaler, Job], Result],
               started: Callable[[Job, str], None]) -> bool:
        """Work on ``w``'s session: whole images off the queue, else the tiles of one in
        progress (the one with the fewest helpers). True when nothing is left to do, False when
        the session was lost (the worker asks for another server)."""
        while True:
            with self._cv:
                if self._cancelled():
                    return True
                if self._pending:
                    idx = self._pending.popleft()
                    share = _Share(self, w.backend)
                    self._shares.append(share)
                elif self._shares:
                    idx, share = None, min(self._shares, key=lambda s: s.helpers)
                else:
                    return True
            if idx is None:
                self.log(f"server {w.backend.where} takes tiles of the image on {share.own.where}")
                try:
                    share.help(w.backend)
                except ServerLost as e:
                    self.log(f"{e}; its tiles go to the image's other servers")
                    return False
                continue
            started(jobs[idx], w.backend.where)
            try:
                result = work(Upscaler(self.artifact, share), jobs[idx])
            except ServerLost as e:
                self._end(share, requeue=idx)
                self.log(f"{e}; its image goes to another server")
                return False
            except BaseException:
                self._end(share)
                raise
            self._end(share, result=(idx, result, {k: v for k, v in share.calls.items() if v}))
            if share.own_lost:
                return False

    def _end(self, share: _Share, *, requeue: int | None = None,
             result: tuple[int, Any, dict[str, int]] | None = None) -> None:
        """An image leaves the set in progress: done (``result``), or back to the queue."""
        with self._cv:
            share.finished = True
            self._shares.remove(share)
            if requeue is not None:
                self._pending.appendleft(requeue)
            if result is not None:
                self._results.append(result)
            self._cv.notify_all()

    @staticmethod
    def _close(w: _Worker) -> None:
        b, w.backend = w.backend, None
        if b is not None:
            b.close()


def _total_width(jobs: Sequence[Job], width: Callable[[Job], int | None] | None) -> int | None:
    """The tiles per step of all ``jobs`` together (each at least 1), or None if any is unknown."""
    if width is None:
        return None
    total = 0
    for job in jobs:
        w = width(job)
        if w is None:
            return None
        total += max(1, int(w))
    return total


__all__ = ["Pool"]
