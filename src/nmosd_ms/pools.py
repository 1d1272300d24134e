"""Worker pools that stop when their caller stops.

``with ProcessPoolExecutor() as pool: pool.map(...)`` waits, on leaving the block, for every item
already submitted, also when the block is left by Ctrl-C or an error: an interrupted ``phantom
--workers 2`` generated the rest of the cohort before it could exit. :func:`stopping_pool` cancels
the pending items instead and ends the worker processes, so an interrupt returns at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor


@contextlib.contextmanager
def stopping_pool(pool: Executor) -> Iterator[Executor]:
    """Use ``pool`` in the block; on success wait for it as usual, on any exception (Ctrl-C
    included) cancel what has not started and, for a process pool, end the workers that run."""
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(pool, ProcessPoolExecutor):
            _end_workers(pool)
        raise
    else:
        pool.shutdown(wait=True)


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate and reap a process pool's workers (a worker busy with one item would otherwise
    finish it first). Python 3.14 has ``terminate_workers``; before it the only handle on the
    processes is the executor's ``_processes`` map, read defensively here."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = dict(getattr(pool, "_processes", None) or {})
    for proc in processes.values():
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in processes.values():
        with contextlib.suppress(Exception):
            proc.join(timeout=10)
