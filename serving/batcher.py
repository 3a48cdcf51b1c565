"""An asyncio queue in front of ONE compute thread, grouping compatible requests into one batch.

Each round takes the oldest job and every queued job with the same key (same loaded model,
sampler, steps, eta and guidance family: ``tasks.generation.batching.compat_key``) up to
``max_batch`` samples, and hands the group to the runner (``Service._run_group``: one
``sample_batch`` call). With batching off, a round is one job; keys starting with "solo"
never share. Jobs past their deadline are dropped from the queue, and a ``Cancellable``
payload learns when its job expired, so a batch whose jobs have all timed out stops between
sampler steps.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch


class Cancellable:
    """A payload whose ``cancelled()`` the batcher binds to its job's expiry."""

    cancelled: Callable[[], bool]


@dataclass(eq=False)
class Job:
    key: tuple
    samples: int
    payload: Any
    future: asyncio.Future
    deadline: float
    cancelled: bool = False
    batch_info: dict[str, int] = field(default_factory=dict)

    def expired(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


class Overloaded(Exception):
    pass


class Batcher:
    """Groups queued jobs by key and runs each group on the single compute thread."""

    def __init__(self, runner: Callable[[tuple, list[Job]], list[Any]], *, enabled: bool, max_batch: int,
                 wait_s: float, max_queue: int, threads: int = 1):
        self.runner = runner
        self.enabled, self.max_batch, self.wait_s, self.max_queue = enabled, max_batch, wait_s, max_queue
        self.queue: list[Job] = []
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="condgen-compute",
                                           initializer=lambda: torch.set_num_threads(threads))
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.batches = Counter()  # samples per batch -> count (for /metrics and the benchmark)

    def queued_samples(self) -> int:
        return sum(j.samples for j in self.queue)

    async def submit(self, key: tuple, samples: int, payload: Any, timeout_s: float) -> tuple[Any, dict]:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # First use, or a new event loop (tests' clients may start one per call).
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop())
        if self.queued_samples() + samples > self.max_queue:
            raise Overloaded(f"queue full ({self.queued_samples()} samples waiting); retry later")
        job = Job(key, samples, payload, loop.create_future(), time.monotonic() + timeout_s)
        if isinstance(payload, Cancellable):
            payload.cancelled = job.expired  # the sampler checks this between steps
        self.queue.append(job)
        self._wake.set()
        try:
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except TimeoutError:
            job.cancelled = True
            raise
        except asyncio.CancelledError:  # the client went away
            job.cancelled = True
            raise
        return result, job.batch_info

    def _take(self) -> list[Job]:
        now_live = [j for j in self.queue if not j.expired()]
        dropped = [j for j in self.queue if j.expired()]
        for j in dropped:
            if not j.future.done():
                j.future.set_exception(TimeoutError())
        self.queue = now_live
        if not self.queue:
            return []
        first = self.queue[0]
        group, total = [first], first.samples
        if self.enabled and first.key[0] != "solo":
            for j in self.queue[1:]:
                if j.key == first.key and total + j.samples <= self.max_batch:
                    group.append(j)
                    total += j.samples
        taken = set(map(id, group))
        self.queue = [j for j in self.queue if id(j) not in taken]
        return group

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if self.enabled and self.wait_s > 0 and self.queued_samples() < self.max_batch:
                await asyncio.sleep(self.wait_s)  # let concurrent requests join this batch
            group = self._take()
            if not group:
                continue
            info = {"requests": len(group), "samples": sum(j.samples for j in group)}
            self.batches[info["samples"]] += 1
            try:
                results = await loop.run_in_executor(self.executor, self.runner, group[0].key, group)
            except asyncio.CancelledError:  # the event loop is shutting down
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for j in group:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            for j, r in zip(group, results):
                j.batch_info = info
                if not j.future.done():
                    j.future.set_result(r)
