"""Worker pools that stop when their caller stops.

``with ProcessPoolExecutor() as pool: pool.map(...)`` waits, on leaving the block, for every item
already submitted, also when the block is left by Ctrl-C or an error: an interrupted ``phantom
--workers 2`` generated the rest of the cohort before it could exit. :func:`stopping_pool` cancels
the pending items instead and ends the worker processes, so an interrupt returns at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor

#: The signals that stop a command; only the main thread handles them.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def threads_without_stop_signals() -> Iterator[None]:
    """Threads (and processes) started in the block inherit a mask that blocks SIGINT and
    SIGTERM, so the kernel delivers those signals to the main thread, the one Python handles
    them in. Otherwise a Ctrl-C that the kernel hands to a pool's or a progress display's thread
    leaves the main thread asleep in a lock wait, and in ``phantom --workers 2`` it was never
    acted on at all (the run went on to the end; reproduced in benchmarks/interrupt.py)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_signals() -> None:
    """For a process pool's initializer: the worker ignores SIGINT (a terminal's Ctrl-C reaches
    the whole process group; the parent handles it and ends the workers) and takes SIGTERM again
    (it inherited the block of :func:`threads_without_stop_signals` from the parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def pool_map(pool: Executor, fn: Callable, items: Iterable) -> Iterator:
    """``pool.map(fn, items)``, every item submitted (which starts the pool's threads and
    processes) with the stop signals blocked in them: see :func:`threads_without_stop_signals`."""
    with threads_without_stop_signals():
        return pool.map(fn, items)


@contextlib.contextmanager
def stopping_pool(pool: Executor) -> Iterator[Executor]:
    """Use ``pool`` in the block; on success wait for it as usual, on any exception (Ctrl-C
    included) cancel what has not started and, for a process pool, end the workers that run."""
    try:
        yield pool
    except BaseException:
        # the workers are read before shutdown, which forgets them
        workers = _workers(pool) if isinstance(pool, ProcessPoolExecutor) else []
        pool.shutdown(wait=False, cancel_futures=True)
        _end(workers)
        raise
    else:
        pool.shutdown(wait=True)


def _workers(pool: ProcessPoolExecutor) -> list:
    """A process pool's worker processes. concurrent.futures has no public handle on them
    before Python 3.14 (``terminate_workers``): its ``_processes`` map is read defensively."""
    return list((getattr(pool, "_processes", None) or {}).values())


def _end(workers: list) -> None:
    """Terminate and reap ``workers``: one busy with an item would otherwise finish it (and
    write its files after the caller has cleared its temporary folder)."""
    for proc in workers:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in workers:
        with contextlib.suppress(Exception):
            proc.join(timeout=5)
            if proc.is_alive():  # SIGTERM blocked or ignored by the task: no second chance
                proc.kill()
                proc.join(timeout=5)
