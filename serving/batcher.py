"""Micro-batching: concurrent requests share one forward pass.

Requests put their validated rows on a queue. One worker task takes the first waiting request,
adds every request already queued (they arrived while the previous forward pass ran), gives the
event loop ``gather_turns`` turns to bring in requests whose bytes have already arrived in their
sockets (read, parsed and queued: no timer, no waiting for traffic that is not there), waits up
to ``max_wait`` seconds for more while the batch is under ``max_batch_size`` rows, runs the model
once in a single inference thread (off the event loop), and hands each request its own rows back.
With ``max_wait = 0`` (the default) a lone request never waits on a clock, and batches still form
under load.
Scores are batch-invariant (``detector.score``), so batching changes latency, never results.

A request that is alone (``submit(..., alone=True)``: no other request in flight in this worker,
nothing queued, no batch running) and small is scored on the event loop's thread instead: with
nobody to batch with, the hop to the inference thread and back only costs time (about 0.1 ms of
CPU and latency per request at one client). Scoring there blocks the loop, so requests that
arrive meanwhile cannot show up as in flight: they are read only once it ends. So a request from
another connection (``source``) that comes within one scoring time of the previous one's end is
taken for a sign of such traffic and queued, and batches still form. The next request on the
same connection is not: a client waiting for its answer sends nothing meanwhile, and any other
connection's request that arrived during the scoring would have been read before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from detector.detector import Detector
from serving.errors import ModelNotReady

Parts = dict[str, npt.NDArray[np.float64]]
INLINE_ROWS = 8  # a lone request this small is scored on the event loop's thread
# Turns of the event loop a batch waits for company before it is scored: a request whose bytes
# are already in its socket reaches the queue within 2-3 turns (read and parsed, then its
# endpoint's first step), so 4 turns gather what is there without waiting for what is not.
GATHER_TURNS = 4


@dataclass
class _Job:
    x: npt.NDArray[np.float32]
    future: asyncio.Future[tuple[Parts, Detector]]


class MicroBatcher:
    def __init__(
        self,
        get_detector: Callable[[], Detector],
        *,
        max_batch_size: int = 64,
        max_wait: float = 0.002,
        on_batch: Callable[[int, float], None] | None = None,
        threads: int | None = None,
        gather_turns: int = GATHER_TURNS,
    ) -> None:
        self._get_detector = get_detector
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.gather_turns = gather_turns
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()

        # OpenMP's thread count is per calling thread: set it in the inference thread itself, or
        # its parallel regions use every core whatever the main thread was told.
        def init_thread() -> None:
            if threads:
                torch.set_num_threads(threads)

        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="inference", initializer=init_thread
        )
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False  # a batch is being gathered or scored
        self._last_end = 0.0  # when the last scoring ended (perf_counter) ...
        self._last_cost = 0.0  # ... and how long it took
        self._last_source: object = None  # the connection of the last request scored inline

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish every queued request, then stop."""
        self._closing = True
        if self._task is not None:
            await self._queue.put(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(
        self, x: npt.NDArray[np.float32], *, alone: bool = False, source: object = None
    ) -> tuple[Parts, Detector]:
        """Score validated rows; returns their score parts and the detector that scored them.
        ``alone``: no other request is in flight (the caller knows); then a small request is
        scored right here. ``source``: the request's connection (the client's address), if
        known."""
        if self._closing or self._task is None:
            raise ModelNotReady("the service is shutting down")
        t0 = time.perf_counter()
        # nothing arrived hard on the last one, or it is the same client's next request
        quiet = t0 - self._last_end > self._last_cost or (
            source is not None and source == self._last_source
        )
        if alone and quiet and not self._busy and self._queue.empty() and len(x) <= INLINE_ROWS:
            detector = self._get_detector()
            parts = detector.score_validated(x)
            self._last_end = time.perf_counter()
            self._last_cost = self._last_end - t0
            self._last_source = source
            if self._on_batch is not None:
                self._on_batch(x.shape[0], self._last_cost)
            return parts, detector
        fut: asyncio.Future[tuple[Parts, Detector]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(x, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._busy = False
            first = await self._queue.get()
            self._busy = True
            if first is None:
                return
            jobs, rows = [first], first.x.shape[0]
            deadline = loop.time() + self.max_wait
            stop_after = False
            turns = self.gather_turns
            while rows < self.max_batch_size:
                try:  # greedy: everything that queued while the last forward pass ran
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if turns > 0:  # requests whose bytes have arrived: let the loop bring them
                        turns -= 1
                        await asyncio.sleep(0)
                        continue
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:  # then wait up to max_wait for company
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if job is None:
                    stop_after = True
                    break
                jobs.append(job)
                rows += job.x.shape[0]
            await self._score(loop, jobs, rows)
            if stop_after:
                # drain whatever is still queued, then stop
                while not self._queue.empty():
                    job = self._queue.get_nowait()
                    if job is not None:
                        await self._score(loop, [job], job.x.shape[0])
                return

    async def _score(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], rows: int) -> None:
        detector = self._get_detector()
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        t0 = time.perf_counter()
        try:
            parts = await loop.run_in_executor(self._executor, detector.score_validated, x)
        except Exception as e:  # hand the error to every waiting request
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - t0
        self._last_source = None
        if self._on_batch is not None:
            self._on_batch(rows, self._last_cost)
        start = 0
        for j in jobs:
            n = j.x.shape[0]
            if not j.future.done():  # the client may have gone away
                j.future.set_result(({k: v[start : start + n] for k, v in parts.items()}, detector))
            start += n
