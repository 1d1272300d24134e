"""Executors: where the folds of a run are trained, behind one interface.

An executor has one method, ``run(tasks, on_done)``: it pulls :class:`~.plan.FoldTask` objects
from the iterable ``tasks`` only when it has room for one more (the local executor one at a time,
the Dask executor one per worker thread), trains each with :func:`run_fold_task`, and hands every
result to ``on_done(task, output)`` in the calling thread as soon as it is ready. Pulling lazily
is what lets several writers share one run folder: the caller claims a fold only when an executor
asks for the next one. Like ``concurrent.futures.Executor`` (and Dask's executor interface), an
executor is a context manager that owns its workers.

Every task is a pure function of its inputs and seed, so the executors give the same numbers when
each fold uses the same number of torch threads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..config import TrainConfig
from ..models import get_spec
from .device import torch_threads
from .loop import EpochCallback, FoldData, FoldOutput, train_sklearn_fold, train_torch_fold
from .plan import FoldTask

OnDone = Callable[[FoldTask, FoldOutput], None]
#: ``on_epoch(label, epoch, epochs)``: a fold named ``label`` finished an epoch.
OnEpoch = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FoldInputs:
    """What every fold of a run reads: the volumes at each model input size (N, 1, S, S, S),
    the labels (N,), the lesion-load features (N, F), the training options and the device."""

    volumes: dict[int, np.ndarray]
    labels: np.ndarray
    features: np.ndarray
    train: TrainConfig
    device: str = "cpu"


_EMPTY = np.zeros((0,), dtype=np.float32)


def run_fold_task(
    task: FoldTask,
    volumes: np.ndarray,
    inputs: FoldInputs,
    threads: int,
    on_epoch: EpochCallback | None = None,
) -> FoldOutput:
    """Train and evaluate one fold (the unit of work of every executor) with ``threads`` torch
    threads (0: leave torch's setting). ``volumes`` are the cohort's volumes at the task's
    input size; ``inputs`` gives the rest (its own ``volumes`` are not read, so an executor may
    send it without them)."""
    with torch_threads(threads):
        if get_spec(task.model).is_torch:
            torch.use_deterministic_algorithms(True, warn_only=True)
            vols = torch.from_numpy(np.ascontiguousarray(volumes))
            fold = FoldData(vols, inputs.labels, task.train_idx, task.test_idx)
            return train_torch_fold(
                task.model,
                fold,
                inputs.train,
                seed=task.seed,
                device=inputs.device,
                on_epoch=on_epoch,
            )
        return train_sklearn_fold(
            task.model, inputs.features, inputs.labels, task.train_idx, task.test_idx, task.seed
        )


class LocalExecutor:
    """Folds one after another in this process, each with ``threads`` torch threads (0: all
    cores)."""

    name = "local"

    def __init__(self, threads: int = 0):
        if threads < 0:
            raise ValueError(f"threads must be 0 (all cores) or more, not {threads}")
        self.threads = threads

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "scheduler": None,
            "workers": 1,
            "threads_per_fold": self.threads or "auto",
        }

    def run(
        self,
        tasks: Iterable[FoldTask],
        inputs: FoldInputs,
        on_done: OnDone,
        on_epoch: OnEpoch | None = None,
    ) -> None:
        for t in tasks:  # the next task is pulled (claimed) only once this one is handed over
            epoch_cb = None
            if on_epoch is not None:

                def epoch_cb(epoch, epochs, label=t.label):
                    on_epoch(label, epoch, epochs)

            out = run_fold_task(
                t,
                inputs.volumes.get(t.size, _EMPTY),
                inputs,
                self.threads,
                epoch_cb,
            )
            on_done(t, out)


class DaskEpochEvents:
    """``on_epoch`` for a fold running on a Dask worker: each finished epoch becomes a worker
    event on ``TOPIC``, which the client receives (``Client.subscribe_topic``) to show progress
    by epoch, as the local executor does. Picklable, so it travels with the task."""

    TOPIC = "nmosd-ms-epoch"

    def __init__(self, label: str):
        self.label = label

    def __call__(self, epoch: int, epochs: int) -> None:
        from distributed import get_worker

        get_worker().log_event(self.TOPIC, {"fold": self.label, "epoch": epoch, "epochs": epochs})


class DaskExecutor:
    """Folds on a Dask cluster: an existing one (``scheduler`` address) or a LocalCluster of
    ``workers`` processes started here. Each worker process trains one fold at a time (one Dask
    thread per worker) with ``threads`` torch threads (0: cores // workers); the cohort is
    scattered once; results come back to this process, which writes them."""

    name = "dask"

    def __init__(
        self,
        scheduler: str | None = None,
        workers: int = 2,
        threads: int = 0,
        gpus: list[str] | None = None,
        folds_per_device: int = 1,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if threads < 0:
            raise ValueError(f"threads must be 0 (automatic) or more, not {threads}")
        if folds_per_device < 1:
            raise ValueError(f"folds per device must be at least 1, not {folds_per_device}")
        if gpus is not None and scheduler:
            raise ValueError("gpus pins the workers this executor starts, not a running cluster's")
        if folds_per_device > 1 and not gpus:
            raise ValueError("several folds per device need the GPUs to pin them to")
        self.scheduler = scheduler
        self.gpus = list(gpus) if gpus is not None else None
        self.folds_per_device = folds_per_device
        self.workers = len(self.gpus) * folds_per_device if self.gpus else workers
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.workers)
        self.client = self.cluster = None

    def describe(self) -> dict:
        return {
            "name": self.name,
            "scheduler": self.scheduler,
            "workers": self.workers,
            "threads_per_fold": self.threads,
            "gpus": self.gpus,
            "folds_per_device": self.folds_per_device,
        }

    def __enter__(self) -> DaskExecutor:
        from dask.distributed import Client, LocalCluster

        if self.scheduler:
            self.client = Client(self.scheduler)
            return self
        import dask

        # Dask's default worker environment sets MALLOC_TRIM_THRESHOLD_, which freezes glibc's
        # mmap threshold: every large tensor is then a fresh mmap, and training ran 2-3x slower
        # (measured: 3.0 s vs 1.2 s per epoch, mostly system time). Keep glibc's defaults.
        environ = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.gpus:  # workers pinned to GPUs, each seeing only its own (its "cuda")
            from dask.distributed import Scheduler, SpecCluster

            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                self.cluster = SpecCluster(
                    workers=gpu_worker_specs(self.gpus, self.folds_per_device),
                    scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                )
            self.client = Client(self.cluster)
            return self
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            self.cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,  # one fold per worker process at a time
                processes=True,
                dashboard_address=None,
            )
        self.client = Client(self.cluster)
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    def _capacity(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def run(
        self,
        tasks: Iterable[FoldTask],
        inputs: FoldInputs,
        on_done: OnDone,
        on_epoch: OnEpoch | None = None,
    ) -> None:
        from dask.distributed import as_completed

        client = self.client
        if client is None:
            raise RuntimeError(
                "use the DaskExecutor as a context manager (with DaskExecutor() ...)"
            )
        if on_epoch is not None:
            # called on the client's event-loop thread, once per epoch of any running fold
            client.subscribe_topic(
                DaskEpochEvents.TOPIC,
                lambda event: on_epoch(event[1]["fold"], event[1]["epoch"], event[1]["epochs"]),
            )
        try:
            # hash=False: each call's data under keys of its own. With content-hashed keys a
            # second run() (cv calls it again while other writers hold folds) scattered under
            # the first one's keys, whose release then cancelled its folds ("lost dependencies")
            scattered = {
                s: client.scatter(v, broadcast=True, hash=False) for s, v in inputs.volumes.items()
            }
            empty = client.scatter(_EMPTY, broadcast=True, hash=False)
            without_volumes = dataclasses.replace(inputs, volumes={})  # those travel scattered
            source: Iterator[FoldTask] = iter(tasks)
            running = as_completed()
            futures = {}

            def submit_next() -> bool:
                t = next(source, None)
                if t is None:
                    return False
                fut = client.submit(
                    run_fold_task,
                    t,
                    scattered.get(t.size, empty),
                    without_volumes,
                    self.threads,
                    DaskEpochEvents(t.label) if on_epoch is not None else None,
                    pure=False,
                    key=f"fold-{t.model}-{t.repeat}-{t.fold}",
                )
                futures[fut] = t
                running.add(fut)
                return True

            def fill() -> None:
                # as many folds in flight as the cluster has worker slots now (workers of a
                # job queue arrive while the run goes)
                while len(futures) < self._capacity() and submit_next():
                    pass

            fill()
            for fut in running:
                # Drop the client's reference once written, so the worker frees the fold's
                # result (its weights are ~45 MB; otherwise every worker keeps all its folds'
                # results until the run ends).
                on_done(futures.pop(fut), fut.result())
                fut.release()
                fill()
        finally:
            if on_epoch is not None:
                client.unsubscribe_topic(DaskEpochEvents.TOPIC)


def gpu_worker_specs(gpus: list[str], per_device: int = 1) -> dict[str, dict]:
    """Dask worker specs (for ``SpecCluster``) of ``per_device`` worker processes per GPU: each
    sees only its GPU through ``CUDA_VISIBLE_DEVICES`` (so its ``cuda`` device is that GPU) and
    trains one fold at a time (one Dask thread). With ``per_device`` > 1 several folds share a
    card, each in its own process and CUDA context: a small network leaves most of a large GPU
    idle, and separate processes keep their kernel launches apart."""
    if len(set(gpus)) != len(gpus) or not gpus:
        raise ValueError(f"give distinct GPU indices or UUIDs, not {gpus}")
    if per_device < 1:
        raise ValueError(f"folds per device must be at least 1, not {per_device}")
    from dask.distributed import Nanny

    return {
        f"gpu-{g}" + (f"-{k}" if per_device > 1 else ""): {
            "cls": Nanny,
            "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(g)}},
        }
        for g in gpus
        for k in range(per_device)
    }


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device torch
    counts (read without initialising CUDA, so worker processes started later can)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


EXECUTORS = {"local": LocalExecutor, "dask": DaskExecutor}


def make_executor(
    name: str,
    scheduler: str | None = None,
    workers: int = 2,
    threads: int = 0,
    device: str = "cpu",
    folds_per_device: int = 1,
) -> LocalExecutor | DaskExecutor:
    """The executor called ``name`` ("local" or "dask"). A Dask cluster started here for
    ``device`` "cuda" (or "auto") on a machine with several visible GPUs, or with
    ``folds_per_device`` > 1, gets ``folds_per_device`` workers per GPU, each pinned to its own
    (``workers`` is then ignored)."""
    if folds_per_device > 1 and (name != "dask" or scheduler or device not in ("cuda", "auto")):
        raise ValueError(
            "several folds per device need --executor dask, no --scheduler and --device cuda"
        )
    if name == "local":
        return LocalExecutor(threads)
    if name == "dask":
        gpus = visible_gpus() if device in ("cuda", "auto") and not scheduler else []
        if folds_per_device > 1 and not gpus:
            raise ValueError("several folds per device need a GPU, and none is visible here")
        pinned = len(gpus) > 1 or folds_per_device > 1
        return DaskExecutor(
            scheduler, workers, threads, gpus=gpus if pinned else None,
            folds_per_device=folds_per_device,
        )  # fmt: skip
    raise ValueError(f"executor must be one of {sorted(EXECUTORS)}, not {name!r}")
