"""Timers shared by the benchmark scripts."""

from __future__ import annotations

import time

import numpy as np
import pyopencl as cl


def wall_ms(fn):
    """A timer for ``fn`` (which must block until its work is done): wall ms of one run."""
    def timed():
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return timed


def thread_ms(fn):
    """A timer: the calling thread's CPU ms in one run of ``fn`` (``time.thread_time``),
    the host work of a call without the wall-clock noise of the kernels it waits for."""
    def timed():
        t0 = time.thread_time()
        fn()
        return 1e3 * (time.thread_time() - t0)
    return timed


def event_ms(launch, queue):
    """A timer: summed ms of the OpenCL profiling events that ``launch(events)`` records."""
    def timed():
        events = []
        launch(events)
        queue.finish()
        return sum(e.profile.end - e.profile.start for e in events) * 1e-6
    return timed


#: Idle time before each contender's block.  Multithreaded BLAS and OpenMP pools (NumPy's
#: OpenBLAS, torch) keep their worker threads spinning for a while after a call returns;
#: whoever runs next on a small machine then competes with them.
SETTLE_S = 0.2


#: Least untimed running after each pause.  A core idle for SETTLE_S runs the next few
#: milliseconds of work slower: five runs of a 0.09 ms kernel right after one warm-up run
#: measured 0.13 ms, and 0.09 ms after 10 ms of warm-up (PoCL, 2-core host).  One warm-up
#: run covers that for a contender of 10 ms or more but not for a short one, which would
#: be measured while the core is still waking; so every contender runs untimed for at
#: least this long, alike.
WARMUP_S = 0.01


def warm_up(run, min_s: float = WARMUP_S) -> None:
    """Run ``run()`` untimed, once and then until ``min_s`` seconds have passed."""
    start = time.perf_counter()
    run()
    while time.perf_counter() - start < min_s:
        run()


def interleaved_medians(timers: dict, rounds: int, block: int = 3, slow=(),
                        settle_s: float = SETTLE_S) -> dict:
    """Median ms of each timer, measured in interleaved blocks.

    Each round runs every timer as a block: a pause of ``settle_s``, an untimed warm-up
    (:func:`warm_up`: one run, repeated until ``WARMUP_S`` has passed), then ``block``
    timed runs back to back (a library's threads stay warm within its
    block, as in real use).  Rotating the blocks over ``rounds`` lets a slow spell of a
    shared, noisy machine hit every contender alike.  Timers named in ``slow`` run one
    timed run a round.
    """
    samples = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            time.sleep(settle_s)
            warm_up(timer)
            samples[name].extend(timer() for _ in range(1 if name in slow else block))
    return {name: float(np.median(v)) for name, v in samples.items()}


def held_seconds(queue, fn, reps: int = 7) -> float:
    """Median seconds of the host's ``fn()`` with ``queue`` held back by a user event, so
    that no kernel competes with the host thread for the CPU while it is measured (on a
    CPU device they otherwise share the cores); the queue runs what ``fn`` enqueued
    afterwards."""
    times = []
    for _ in range(reps):
        queue.finish()
        gate = cl.UserEvent(queue.context)
        cl.enqueue_barrier(queue, wait_for=[gate])
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        gate.set_status(cl.command_execution_status.COMPLETE)
    queue.finish()
    return float(np.median(times))
