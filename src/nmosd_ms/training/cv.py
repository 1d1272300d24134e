"""Repeated stratified k-fold cross-validation on a prepared cohort (the paper's protocol).

:func:`run_cv` coordinates three parts, each with its own module: the plan (:mod:`.plan`: one
subject-level split plan shared by every model, a seed per (model, repeat, fold)), the executor
(:mod:`.executors`: where folds are trained, locally or on Dask, behind one ``run(tasks)``) and
the run folder (:mod:`.runfolder`: its layout, records, tables and the writers' locks; several
writers with the same options may share one folder, each fold trained once).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import CVConfig
from ..data.cache import PreparedCohort, load_prepared
from ..data.features import FEATURES
from ..data.ingest import check_trainable
from ..errors import NmosdError
from ..locking import Lock
from ..models import get_spec, model_weights
from ..models.complexity import count_flops, count_parameters
from ..records import MIN_SIZE
from ..spatial import resize
from .device import environment, resolve_device
from .executors import DaskExecutor, FoldInputs, LocalExecutor, make_executor
from .loop import FoldOutput
from .plan import FoldTask, check_no_leak, plan_splits, plan_tasks, splits_frame
from .pretrain import check_pretraining, prior_reference
from .runfolder import DETERMINISTIC_COLUMNS, RunFolder, now

__all__ = ["DETERMINISTIC_COLUMNS", "collect_cv", "run_cv"]

Progress = Callable[[int, int, str], None]


def _model_info(name: str, size: int, default_weights: str, prior=None) -> dict:
    """What run.json records of one model (``prior``: the record :func:`check_pretraining`
    returned for its weights, if any). Building it with its weights is also the check that the
    weights exist and fit, before anything is written."""
    spec = get_spec(name)
    weights = model_weights(name, default_weights) if spec.is_torch else None
    info = {
        "family": spec.family,
        "size": size if spec.is_torch else None,
        "weights": weights,
        "description": spec.description,
    }
    if spec.is_torch:
        info["pretraining"] = prior_reference(prior)
        net = spec.build(size=size, weights=weights)
        info["parameters"] = count_parameters(net)
        info["flops"] = count_flops(net, size)
        info["views"] = list(spec.views)
    else:
        info["parameters"] = None
        info["flops"] = None
        info["features"] = list(FEATURES)
    return info


#: Seconds between two looks at folds that other writers of the same run folder hold.
POLL_SECONDS = 2.0


def executor_for(
    name: str,
    scheduler: str | None = None,
    workers: int = 2,
    threads: int = 0,
    device: str = "auto",
    folds_per_device: int = 1,
) -> LocalExecutor | DaskExecutor:
    """The executor ``run_cv`` uses for these options (:func:`.executors.make_executor`), its
    refusals as user errors."""
    try:
        return make_executor(name, scheduler, workers, threads, device, folds_per_device)
    except ValueError as exc:
        option = "folds_per_device" if "per device" in str(exc) else "executor"
        raise NmosdError(str(exc), option=option) from None


Executor = LocalExecutor | DaskExecutor


@dataclass
class CVPlan:
    """Everything a cv call checked and computed before its first write: the run folder, the
    cohort, the options that identify the run (``options``, which every writer of one folder
    must share), the subject-level split plan and its table, the models' records and input
    sizes, and where the client computes (``device``)."""

    folder: RunFolder
    cohort: PreparedCohort
    config: CVConfig
    options: dict
    plan: list
    splits: pd.DataFrame
    models: dict[str, dict]
    sizes: dict[str, int]
    device: torch.device


def check_cv_request(config: CVConfig, shard: tuple[int, int] | None = None) -> None:
    """Refuse unknown models, a size given for a model that is not run, and a shard that is not
    i/n with 1 <= i <= n, before anything is read."""
    for name in config.run_models:
        get_spec(name)
    unknown = set(config.model_sizes) - set(config.run_models)
    if unknown:
        raise NmosdError(
            f"a model size is given for a model that is not run: {', '.join(unknown)}",
            option="model_sizes",
        )
    if shard is not None:
        i, n = shard
        if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
            raise NmosdError(f"a shard is i/n with 1 <= i <= n, not {i}/{n}", option="shard")


def model_sizes(config: CVConfig, cache_size: int) -> dict[str, int]:
    """Each run model's input size: its ``model_sizes`` entry, else the cache's."""
    sizes = {m: config.model_sizes.get(m, cache_size) for m in config.run_models}
    for m, s in sizes.items():
        if s > cache_size or s < MIN_SIZE:
            raise NmosdError(
                f"model size {m}={s}: must be between {MIN_SIZE} and the cache size {cache_size}",
                option="model_sizes",
            )
    return sizes


def plan_cv(
    cohort: str | Path | PreparedCohort, out_dir: str | Path, config: CVConfig, device: torch.device
) -> CVPlan:
    """Check the cohort, sizes and weights and plan the splits; writes nothing."""
    folder = RunFolder(out_dir)
    folder.check_own()
    cohort = cohort if isinstance(cohort, PreparedCohort) else load_prepared(cohort)
    check_trainable(cohort.diagnoses, config.folds)
    sizes = model_sizes(config, int(cohort.volumes.shape[-1]))
    priors = {  # weights pretrained on this cohort's own maps would leak its folds
        m: check_pretraining(model_weights(m, config.train.weights), cohort, m, sizes[m])
        for m in sizes
        if get_spec(m).is_torch
    }
    try:  # one person's sessions never on both sides of a fold
        plan = plan_splits(
            cohort.labels, config.folds, config.repeats, config.seed, groups=cohort.participants
        )
    except ValueError as exc:
        raise NmosdError(f"cannot plan the folds: {exc}") from None
    sessions = cohort.sessions if cohort.has_sessions else None
    splits = splits_frame(cohort.participants, cohort.diagnoses, plan, sessions)
    check_no_leak(splits)
    models = {m: _model_info(m, sizes[m], config.train.weights, priors.get(m)) for m in sizes}
    options = {
        "cohort_hash": cohort.cohort_hash,
        "n_subjects": len(cohort.ids),
        "repeats": config.repeats,
        "folds": config.folds,
        "seed": config.seed,
        "train": config.train.model_dump(mode="json"),
        "prepare": cohort.params,
    }
    return CVPlan(folder, cohort, config, options, plan, splits, models, sizes, device)


def _cohort_record(cohort: PreparedCohort) -> dict:
    return {
        "path": str(cohort.path.resolve()) if cohort.path is not None else "in memory",
        "counts": cohort.counts,
        "lesion_source": cohort.lesion_sources,
        "segmented": cohort.segmented_ids,
    }


def _client_device(executor: Executor, device: str) -> torch.device:
    if isinstance(executor, LocalExecutor):
        return resolve_device(device)  # folds run in this process: resolve (and check) here
    # folds run on workers, which resolve "auto"/"cuda" themselves (a login node has no GPU);
    # each fold records the device it used
    return resolve_device("cpu" if device == "auto" else device, check=False)


def run_cv(
    cohort: str | Path | PreparedCohort,
    out_dir: str | Path,
    config: CVConfig,
    *,
    device: str = "auto",
    executor: Executor | None = None,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Run (or resume, or join) a cross-validation; returns the run.json content.

    Parameters
    ----------
    cohort : path or PreparedCohort
        A prepared cache (``nmosd-ms prepare``, :func:`nmosd_ms.prepare`) or a cohort already
        in memory (:func:`nmosd_ms.load_prepared`).
    out_dir : path
        The run folder: created, resumed, or joined when another writer with the same options
        works on it (see :mod:`.runfolder`).
    config : CVConfig
        Models, repeats, folds, seed, per-model sizes and the training options.
    device : {"auto", "cpu", "cuda"}
        Where torch models train.
    executor : LocalExecutor or DaskExecutor, optional
        Where folds are trained (default: ``LocalExecutor()``, one after another here with all
        cores); :func:`executor_for` makes one from the command line's options. The executor's
        ``threads`` per fold matter to the last bits: two runs agree bit for bit when they use
        the same number of threads per fold.
    progress : callable, optional
        ``progress(done, total, label)`` after each fold and epoch.
    shard : (i, n), optional
        Train only shard ``i`` of ``n`` (1 <= i <= n): every n-th (model, repeat, fold) task,
        from the i-th, of the plan every shard computes identically (a job array's task i).
        Shards share the run folder as any writers with the same options do;
        :func:`collect_cv` writes the tables once all are done.

    Several calls may work on one ``out_dir`` at once when their options agree; everything is
    validated before the first write. The returned dict adds ``trained_here`` (how many folds
    this call trained) and ``folds_table`` (the path of the per-fold result table).
    """
    check_cv_request(config, shard)
    executor = executor if executor is not None else LocalExecutor()
    run = plan_cv(cohort, out_dir, config, _client_device(executor, device))
    worker_device = str(run.device) if isinstance(executor, LocalExecutor) else device

    def train(tasks: list[FoldTask]) -> int:
        if shard is not None:
            tasks = [t for k, t in enumerate(tasks) if k % shard[1] == shard[0] - 1]
        return _train_all(run, tasks, worker_device, executor, progress)

    return _in_run_folder(run, train, executor={**executor.describe(), "shard": list(shard or ())})


def collect_cv(cohort: str | Path | PreparedCohort, out_dir: str | Path, config: CVConfig) -> dict:
    """Train nothing: check that every fold of the run in ``out_dir`` is finished (else refuse,
    naming how many are not), then write the result tables and the finish time (a job array's
    last step, after the shards of :func:`run_cv`). Returns the run.json content, as
    :func:`run_cv` does.

    Parameters
    ----------
    cohort : path or PreparedCohort
        The prepared cohort the shards ran on.
    out_dir : path
        The run folder the shards filled.
    config : CVConfig
        The options the shards ran with (the run folder refuses others).
    """
    check_cv_request(config)
    if not RunFolder(out_dir).has_run():
        raise NmosdError(f"{Path(out_dir)} holds no run to collect (run the shards first)")
    run = plan_cv(cohort, out_dir, config, resolve_device("cpu"))

    def check_finished(tasks: list[FoldTask]) -> int:
        unfinished = sum(not run.folder.is_done(t) for t in tasks)
        if unfinished:
            raise NmosdError(
                f"{run.folder.root}: {unfinished} of {len(tasks)} folds are unfinished; run "
                "(or resubmit) the shards that hold them, then collect again"
            )
        return 0

    return _in_run_folder(run, check_finished, executor=None)


def _in_run_folder(
    run: CVPlan, work: Callable[[list[FoldTask]], int], executor: dict | None
) -> dict:
    """Register as a writer of the run folder, open (or join) the run, do ``work`` on the
    plan's tasks, then rebuild the tables; a folder this call created is removed again if it
    is refused before the run was recorded. ``executor``: what run.json records of the
    executor (None for a collect step, which trains nothing)."""
    folder, root = run.folder, run.folder.root
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    writer = folder.register_writer()
    try:
        _open_run(run, writer, executor)
        created = False  # a run folder now: kept whatever happens next
        tasks = plan_tasks(run.plan, list(run.sizes), run.sizes, run.config.seed)
        trained = work(tasks)
        meta = _aggregate(folder)
        # what this call did (not written to run.json: other writers may share the folder)
        return {**meta, "trained_here": trained, "folds_table": str(folder.table_path("folds"))}
    finally:
        writer.remove()
        if created:  # refused before anything of the run was written
            shutil.rmtree(root, ignore_errors=True)


def _open_run(run: CVPlan, writer: Lock, executor: dict | None) -> None:
    """Create the run's records, or check that this call's options equal the folder's."""
    folder = run.folder
    with folder.meta_lock():
        meta = folder.open(
            writer, run.options, run.splits, run.models, run.sizes, _cohort_record(run.cohort)
        )
        if executor is not None:  # the last writer's (a collect step trains nothing)
            meta["executor"] = executor
            # the client's device (folds record their own) and the folds' threads ("auto":
            # torch's setting in this process, where local folds run)
            folds = executor.get("threads_per_fold")
            meta["environment"] = environment(run.device, folds if isinstance(folds, int) else None)
        folder.write_meta(meta)


def _aggregate(folder: RunFolder) -> dict:
    """Rebuild the result tables from every finished fold; the run is finished when every
    model of it is complete."""
    with folder.meta_lock():
        meta = folder.read_meta()
        all_models = list(meta["models"])
        folder.aggregate(all_models)
        if all(folder.complete(m, meta) for m in all_models):
            meta["finished"] = now()
        folder.write_meta(meta)
    return meta


def _fold_inputs(cohort: PreparedCohort, tasks: list[FoldTask], config: CVConfig, device: str):
    """The arrays the pending folds read: volumes at each torch model's size, features, labels."""
    cache_size = int(cohort.volumes.shape[-1])
    volumes: dict[int, np.ndarray] = {}
    for s in {t.size for t in tasks if get_spec(t.model).is_torch}:
        vols = cohort.volumes
        if s != cache_size:
            vols = np.stack([resize(v, s) for v in vols])
        volumes[s] = vols[:, None].astype(np.float32)
    features = cohort.features()[list(FEATURES)].to_numpy(dtype=np.float64)
    return FoldInputs(volumes, cohort.labels, features, config.train, device)


def _train_all(
    run: CVPlan,
    tasks: list[FoldTask],
    device: str,
    executor: Executor,
    progress: Progress | None,
) -> int:
    """Train every fold that no writer has finished, claiming each as the executor asks for it;
    returns how many folds this writer trained."""
    folder, cohort, config = run.folder, run.cohort, run.config
    total = len(tasks)
    pending = [t for t in tasks if not folder.is_done(t)]
    done = total - len(pending)
    if progress:
        progress(done, total, "cv")
    if not pending:
        return 0
    inputs = _fold_inputs(cohort, pending, config, device)
    trained = 0
    last_tables = time.monotonic()
    claims: dict[tuple, Lock] = {}

    def claimed(candidates: list[FoldTask]) -> Iterator[FoldTask]:
        # Claimed one at a time, when the executor has room: the other folds stay free for
        # other writers of this run folder.
        for t in candidates:
            if folder.is_done(t):
                continue
            claim = folder.claim(t)
            if claim is None:
                continue
            if folder.is_done(t):  # finished while we looked
                claim.release()
                continue
            claims[t.key] = claim
            yield t

    def finish(task: FoldTask, out: FoldOutput) -> None:
        nonlocal done, last_tables, trained
        try:
            folder.save_fold(task, out, cohort, config.train)
        finally:
            claims.pop(task.key).release()
        trained += 1
        # The result tables are rebuilt from every fold JSON: at most once a minute while the
        # run goes (each rebuild reads all folds so far), and always at the end.
        if time.monotonic() - last_tables >= 60:
            with folder.meta_lock():
                folder.aggregate()
            last_tables = time.monotonic()
        done += 1
        if progress:
            progress(done, total, task.label)

    def report_epoch(label: str, epoch: int, epochs: int) -> None:
        progress(done, total, f"{label} epoch {epoch}/{epochs}")

    with executor:
        while pending:
            before = len(pending)
            trained_before = trained
            try:
                executor.run(claimed(pending), inputs, finish, report_epoch if progress else None)
            finally:
                for claim in claims.values():
                    claim.release()
                claims.clear()
            pending = [t for t in pending if not folder.is_done(t)]
            if pending and len(pending) == before and trained == trained_before:
                # every remaining fold is being trained by another writer: wait for them (a
                # writer that dies releases its claims, and this loop then takes them over)
                if progress:
                    progress(done, total, f"waiting for {len(pending)} fold(s) of other writers")
                time.sleep(POLL_SECONDS)
            done = total - len(pending)
    return trained
