"""Independent jobs (trainings, evaluations) run side by side in worker processes on a CPU.

The demo's models are tiny: two threads on one model's small matrices keep a 2-core machine only
partly busy (one tiny expert trains 1.36x faster on two threads than on one), while two single-threaded
processes on two jobs keep it full. ``JobPool`` runs a list of jobs over ``workers`` processes (spawned,
so nothing of the parent's state leaks in), each with its share of the cores, and returns their
results in order. One worker runs the jobs here, in this process, one after the other: the path a GPU
takes (one device, already busy) and the tests' default.

Jobs cross the process boundary by pickling (the standard library's ``multiprocessing``; no file is
read back): a job's function must be importable (a module-level function, or ``functools.partial`` of
one) and its arguments and result plain data.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Job:
    """``fn(*args, **kwargs)`` under a name that progress and timings report."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def usable_cpus() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(device: str) -> int:
    """Two workers on a CPU with two or more cores; one (in this process) on an accelerator."""
    return 2 if device == "cpu" and usable_cpus() >= 2 else 1


def on_loaded(fn: Callable[..., Any], load: Callable[[], Any], *args, **kwargs) -> Any:
    """``fn(load(), *args, **kwargs)``: a job that loads its model in the worker that runs it (``load``
    a ``functools.partial`` of a loader: paths cross the process boundary, models do not)."""
    return fn(load(), *args, **kwargs)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _timed(job: Job) -> tuple[Any, float]:
    t = time.perf_counter()
    out = job.fn(*job.args, **job.kwargs)
    return out, time.perf_counter() - t


class JobPool:
    """Run jobs over ``workers`` processes; ``workers=1`` runs them here, in order.

    The processes start on the first ``run`` that needs them and are reused until ``close``.
    ``on_start(job)`` and ``on_done(job, result, seconds)`` are called here as jobs start and finish.
    """

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = max(1, usable_cpus() // workers)
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads,),
            )
        return self._pool

    def run(
        self,
        jobs: list[Job],
        on_start: Callable[[Job], None] = lambda job: None,
        on_done: Callable[[Job, Any, float], None] = lambda job, out, s: None,
    ) -> list[Any]:
        """Results of ``jobs`` in their order. The first failure is raised once it is seen; jobs
        not yet started are cancelled (each job writes its outputs atomically, so a rerun resumes)."""
        if self.workers == 1 or len(jobs) < 2:
            return [self._here(job, on_start, on_done) for job in jobs]
        pool, results = self._executor(), [None] * len(jobs)
        waiting: dict[Future, int] = {}
        for i, job in enumerate(jobs):
            on_start(job)
            waiting[pool.submit(_timed, job)] = i
        try:
            while waiting:
                done, _ = wait(waiting, return_when=FIRST_COMPLETED)
                for f in done:
                    i = waiting.pop(f)
                    results[i], seconds = f.result()
                    on_done(jobs[i], results[i], seconds)
        finally:
            for f in waiting:
                f.cancel()
        return results

    @staticmethod
    def _here(job: Job, on_start, on_done) -> Any:
        on_start(job)
        out, seconds = _timed(job)
        on_done(job, out, seconds)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


@contextmanager
def job_pool(workers: int = 1) -> Iterator[JobPool]:
    pool = JobPool(workers)
    try:
        yield pool
    finally:
        pool.close()
