"""Repeated stratified k-fold cross-validation on a prepared cohort (the paper's protocol).

Planner: scikit-learn's ``RepeatedStratifiedKFold`` on subjects, one plan shared by every model
(paired comparisons). Each (model, repeat, fold) is an independent task with a seed derived from
(seed, model, repeat, fold), so the local and the Dask executors give the same numbers.

Run folder::

    RUN_DIR/run.json                       options, versions, cohort hash, models, times
    RUN_DIR/splits.tsv                     repeat, fold, participant_id, diagnosis, part
    RUN_DIR/folds/<model>/repeat-<r>/fold-<k>.json   one finished fold (the resume marker)
    RUN_DIR/models/<model>/repeat-<r>/fold-<k>.safetensors (+ .json)  final weights
    RUN_DIR/results/{folds,predictions,curves}.tsv   tables rebuilt after every fold
    RUN_DIR/README.md                      what the files are
    RUN_DIR/claims/<model>/repeat-<r>/fold-<k>.lock   held while a writer trains that fold
    RUN_DIR/writers/<host>-<pid>.lock      held by each running writer (named in refusals)
    RUN_DIR/.nmosd-ms.lock                 held while run.json or the tables are written

Every file is written atomically; a fold counts as done only once its JSON exists, so a run
killed at any moment resumes by redoing the unfinished folds. Several writers may work on one
run folder at once (a second terminal, a job array) when their options are the same: each fold
is claimed by one writer (an ``flock``, released by the kernel when a writer dies, even by
``kill -9``), the others skip it and wait for it, so no fold is trained twice and no table mixes
options. A writer with other options is refused with one line naming the writers at work.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from sklearn.model_selection import RepeatedStratifiedKFold

from .. import LABELS, __version__
from ..config import CVConfig, TrainConfig
from ..data.features import FEATURES
from ..data.ingest import check_trainable
from ..data.preprocess import PreparedCohort, load_prepared
from ..data.spatial import resize
from ..errors import NmosdError
from ..evaluation.metrics import METRICS, binary_metrics
from ..io import (
    atomic_path,
    inside,
    read_json,
    read_tsv,
    remove_stale_temporaries,
    sha256_file,
    write_json,
    write_text,
    write_tsv,
)
from ..locking import LOCK_NAME, Lock, check_own_folder, describe, exclusive
from ..models import get_spec, model_weights
from ..models.complexity import count_flops, count_parameters
from .loop import FoldOutput, resolve_device, train_sklearn_fold, train_torch_fold

Progress = Callable[[int, int, str], None]

FOLD_COLUMNS = [
    "model",
    "repeat",
    "fold",
    "n_train",
    "n_fit",
    "n_test",
    *METRICS,
    "train_seconds",
    "epochs",
    "seconds_per_epoch",
    "inference_ms",
    "peak_memory_mb",
]
PRED_COLUMNS = ["model", "repeat", "fold", "participant_id", "diagnosis", "prob_nmosd"]
CURVE_COLUMNS = [
    "model",
    "repeat",
    "fold",
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "seconds",
]
#: Columns that are identical between reruns with the same seed and threads per fold (and between
#: a resumed and an uninterrupted run); the timing and memory columns are not.
DETERMINISTIC_COLUMNS = [
    "model",
    "repeat",
    "fold",
    "n_train",
    "n_fit",
    "n_test",
    *METRICS,
    "epochs",
]


def fold_seed(seed: int, model: str, repeat: int, fold: int) -> int:
    """A seed that is a pure function of (seed, model, repeat, fold)."""
    digest = hashlib.sha256(f"{seed}|{model}|{repeat}|{fold}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Split:
    repeat: int
    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def plan_splits(labels: np.ndarray, folds: int, repeats: int, seed: int) -> list[Split]:
    """Subject-level repeated stratified k-fold; repeat and fold are numbered from 0."""
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    plan = []
    dummy = np.zeros((len(labels), 1))
    for i, (tr, te) in enumerate(splitter.split(dummy, labels)):
        split = Split(i // folds, i % folds, np.sort(tr), np.sort(te))
        assert not np.intersect1d(split.train_idx, split.test_idx).size, "leak between parts"
        plan.append(split)
    for r in range(repeats):
        tests = np.concatenate([s.test_idx for s in plan if s.repeat == r])
        assert np.array_equal(np.sort(tests), np.arange(len(labels))), "a subject is never tested"
    return plan


def splits_frame(ids: list[str], diagnoses: list[str], plan: list[Split]) -> pd.DataFrame:
    rows = []
    for s in plan:
        for part, idx in (("train", s.train_idx), ("test", s.test_idx)):
            rows += [(s.repeat, s.fold, ids[i], diagnoses[i], part) for i in idx]
    df = pd.DataFrame(rows, columns=["repeat", "fold", "participant_id", "diagnosis", "part"])
    return df.sort_values(["repeat", "fold", "part", "participant_id"], ignore_index=True)


def check_no_leak(splits: pd.DataFrame) -> None:
    """Guard: no participant is in the training and the test part of one fold."""
    for (_r, _k), g in splits.groupby(["repeat", "fold"]):
        both = set(g.loc[g.part == "train", "participant_id"]) & set(
            g.loc[g.part == "test", "participant_id"]
        )
        if both:
            raise AssertionError(f"participants in both parts of a fold: {sorted(both)}")


@dataclass(frozen=True)
class FoldTask:
    model: str
    repeat: int
    fold: int
    seed: int
    size: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def run_fold_task(
    task: FoldTask,
    volumes: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    train: TrainConfig,
    device: str,
    threads: int,
    on_epoch=None,
) -> FoldOutput:
    """Train and evaluate one fold (the unit of work for every executor)."""
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run_fold(task, volumes, labels, features, train, device, on_epoch)
    finally:
        torch.set_num_threads(previous)


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


def _run_fold(task, volumes, labels, features, train, device, on_epoch=None) -> FoldOutput:
    if get_spec(task.model).is_torch:
        torch.use_deterministic_algorithms(True, warn_only=True)
        vols = torch.from_numpy(np.ascontiguousarray(volumes))
        return train_torch_fold(
            task.model,
            vols,
            labels,
            task.train_idx,
            task.test_idx,
            train,
            task.seed,
            device,
            on_epoch,
        )
    return train_sklearn_fold(
        task.model, features, labels, task.train_idx, task.test_idx, task.seed
    )


class RunStore:
    """Paths, atomic writes and the writers' locks of one run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def meta_lock(self, wait: float = 120) -> Lock:
        """Held while run.json, splits.tsv, README.md or the result tables are written."""
        return exclusive(self.root / LOCK_NAME, f"run folder {self.root}", wait=wait)

    def claim(self, model: str, repeat: int, fold: int) -> Lock | None:
        """The claim of one fold for this writer, or ``None`` when another writer holds it."""
        lock = Lock(inside(self.root, "claims", model, f"repeat-{repeat}", f"fold-{fold}.lock"))
        if not lock.acquire():
            return None
        # leftovers of a writer killed while it wrote this fold's files: nobody else writes them
        for folder in (
            self.weights(model, repeat, fold).parent,
            self.fold_json(model, repeat, fold).parent,
        ):
            for p in folder.glob(f".fold-{fold}.*tmp*"):
                p.unlink(missing_ok=True)
        return lock

    def register_writer(self) -> Lock:
        import secrets

        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}.lock"
        lock = Lock(inside(self.root, "writers", name))
        lock.acquire()
        return lock

    def active_writers(self, own: Lock | None = None) -> list[dict]:
        """Records of the writers working on this folder now (stale files are removed)."""
        found = []
        folder = self.root / "writers"
        for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
            if own is not None and path == own.path:
                continue
            lock = Lock(path)
            holder = lock.holder()
            if holder is None:
                lock.remove()
            else:
                found.append(holder)
        return found

    def fold_json(self, model: str, repeat: int, fold: int) -> Path:
        return inside(self.root, "folds", model, f"repeat-{repeat}", f"fold-{fold}.json")

    def weights(self, model: str, repeat: int, fold: int) -> Path:
        return inside(self.root, "models", model, f"repeat-{repeat}", f"fold-{fold}.safetensors")

    def is_done(self, model: str, repeat: int, fold: int) -> bool:
        return self.fold_json(model, repeat, fold).is_file()

    def save_fold(
        self, task: FoldTask, out: FoldOutput, cohort: PreparedCohort, train: TrainConfig
    ) -> dict:
        ids, labels = cohort.ids, cohort.labels
        y = labels[task.test_idx]
        metrics = binary_metrics(y, out.prob_nmosd)
        weights_info = None
        if out.state_dict is not None:
            wpath = self.weights(task.model, task.repeat, task.fold)
            with atomic_path(wpath, suffix=".safetensors") as tmp:
                save_file(out.state_dict, str(tmp), metadata={"model": task.model})
            weights_info = {
                "file": wpath.name,
                "sha256": sha256_file(wpath),
            }
            spec = get_spec(task.model)
            write_json(
                wpath.with_suffix(".json"),
                {
                    "model": task.model,
                    "family": spec.family,
                    "views": list(spec.views),
                    "size": task.size,
                    "repeat": task.repeat,
                    "fold": task.fold,
                    "seed": task.seed,
                    "labels": list(LABELS),
                    "train_ids": [ids[i] for i in task.train_idx],
                    "test_ids": [ids[i] for i in task.test_idx],
                    "train_config": train.model_dump(mode="json"),
                    "metrics": metrics,
                    **weights_info,
                },
            )
        n_epochs = max(out.epochs, 1)
        record = {
            "model": task.model,
            "repeat": task.repeat,
            "fold": task.fold,
            "n_train": len(task.train_idx),
            "n_fit": out.n_fit if out.n_fit is not None else len(task.train_idx),
            "n_test": len(task.test_idx),
            **metrics,
            "train_seconds": out.train_seconds,
            "epochs": out.epochs,
            "seconds_per_epoch": out.train_seconds / n_epochs if out.epochs else float("nan"),
            "inference_ms": out.inference_ms,
            "peak_memory_mb": out.peak_memory_mb,
            "predictions": [
                {"participant_id": ids[i], "diagnosis": LABELS[labels[i]], "prob_nmosd": float(p)}
                for i, p in zip(task.test_idx, out.prob_nmosd, strict=True)
            ],
            "curves": out.curves,
            "weights": weights_info,
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        write_json(self.fold_json(task.model, task.repeat, task.fold), record)
        return record

    def aggregate(self, models: list[str]) -> dict[str, pd.DataFrame]:
        folds, preds, curves = [], [], []
        for model in models:
            for path in sorted((self.root / "folds" / model).glob("repeat-*/fold-*.json")):
                rec = read_json(path, "fold record")
                key = {k: rec[k] for k in ("model", "repeat", "fold")}
                rec.setdefault("n_fit", rec["n_train"])  # folds written before n_fit existed
                folds.append({c: rec[c] for c in FOLD_COLUMNS})
                preds += [{**key, **p} for p in rec["predictions"]]
                curves += [{**key, **c} for c in rec["curves"]]
        order = {m: i for i, m in enumerate(models)}
        tables = {
            "folds": pd.DataFrame(folds, columns=FOLD_COLUMNS),
            "predictions": pd.DataFrame(preds, columns=PRED_COLUMNS),
            "curves": pd.DataFrame(curves, columns=CURVE_COLUMNS),
        }
        for name, df in tables.items():
            keys = ["repeat", "fold"] + (["participant_id"] if name == "predictions" else [])
            keys += ["epoch"] if name == "curves" else []
            df = df.assign(_m=df["model"].map(order)).sort_values(["_m", *keys])
            tables[name] = df.drop(columns="_m").reset_index(drop=True)
            write_tsv(self.root / "results" / f"{name}.tsv", tables[name])
        return tables


RUN_README = """# nmosd-ms cross-validation run

Written by `nmosd-ms cv` (version {version}). Options, package versions and the cohort hash are
in `run.json`; re-running the same command resumes; `nmosd-ms report {root}` turns it into tables
and figures.

| file | content |
|---|---|
| `splits.tsv` | repeat, fold, participant_id, diagnosis, part (train/test): identical for every model |
| `results/folds.tsv` | one row per (model, repeat, fold): metrics on the held-out part, timings |
| `results/predictions.tsv` | held-out probability of NMOSD per subject and fold |
| `results/curves.tsv` | per-epoch training and held-out loss/accuracy (held-out curves are descriptive only) |
| `models/<model>/repeat-<r>/fold-<k>.safetensors` | final weights (+ `.json` metadata) |
| `folds/<model>/repeat-<r>/fold-<k>.json` | the raw record of one finished fold |

NMOSD is the positive class: sensitivity = NMOSD recall, specificity = MS recall. Repeats and
folds are numbered from 0. A threshold of 0.5 on prob_nmosd gives the predicted class.
"""


def _environment(device: torch.device) -> dict:
    import monai
    import sklearn

    return {
        "nmosd_ms": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "scikit_learn": sklearn.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _model_info(name: str, size: int, default_weights: str) -> dict:
    """What run.json records of one model. Building it with its weights is also the check that
    the weights exist and fit, before anything is written."""
    spec = get_spec(name)
    weights = model_weights(name, default_weights) if spec.is_torch else None
    info = {
        "family": spec.family,
        "size": size if spec.is_torch else None,
        "weights": weights,
        "description": spec.description,
    }
    if spec.is_torch:
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


def _read_run_json(path: Path) -> dict:
    """run.json as written (options compared as stored), once it validates as a run record."""
    from ..records import RunRecord, validate_record

    meta = read_json(path, "run record")
    validate_record(meta, RunRecord, "run record", path)
    return meta


def run_cv(
    cache_dir: str | Path,
    out_dir: str | Path,
    config: CVConfig,
    device: str = "auto",
    executor: str = "local",
    scheduler: str | None = None,
    workers: int = 2,
    progress: Progress | None = None,
    threads: int = 0,
) -> dict:
    """Run (or resume, or join) a cross-validation; returns the run.json content.

    ``threads`` is the number of torch threads per fold: 0 means all cores for the local
    executor and cores // workers for a Dask LocalCluster. Floating-point reductions depend on
    it, so two runs agree bit for bit when they use the same number of threads per fold.

    Several calls may work on one ``out_dir`` at once when their options agree (see the module
    docstring); everything is validated before the first write.
    """
    models = config.run_models
    for name in models:
        get_spec(name)
    unknown = set(config.model_sizes) - set(models)
    if unknown:
        raise NmosdError(f"--model-size names a model that is not run: {', '.join(unknown)}")
    if executor not in ("local", "dask"):
        raise NmosdError(f"--executor must be local or dask, not {executor}")
    root = Path(out_dir)
    check_own_folder(root, "run.json", "a cv run folder")
    cohort = load_prepared(cache_dir)
    check_trainable(cohort.diagnoses, config.folds)
    cache_size = int(cohort.volumes.shape[-1])
    sizes = {m: config.model_sizes.get(m, cache_size) for m in models}
    for m, s in sizes.items():
        if s > cache_size or s < 8:
            raise NmosdError(
                f"--model-size {m}={s}: must be between 8 and the cache size {cache_size}"
            )
    dev = resolve_device(device)
    store = RunStore(root)
    options = {
        "cohort_hash": cohort.cohort_hash,
        "n_subjects": len(cohort.ids),
        "repeats": config.repeats,
        "folds": config.folds,
        "seed": config.seed,
        "train": config.train.model_dump(mode="json"),
        "prepare": cohort.params,
    }
    plan = plan_splits(cohort.labels, config.folds, config.repeats, config.seed)
    splits = splits_frame(cohort.ids, cohort.diagnoses, plan)
    check_no_leak(splits)
    new_models = {m: _model_info(m, sizes[m], config.train.weights) for m in models}

    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    writer = store.register_writer()
    try:
        with store.meta_lock():
            meta = _open_run(store, writer, options, splits, new_models, sizes, cache_dir, cohort)
            meta["executor"] = {
                "name": executor,
                "scheduler": scheduler,
                "workers": workers,
                "threads_per_fold": threads or "auto",
            }
            meta["environment"] = _environment(dev)
            write_json(root / "run.json", meta)
        created = False  # a run folder now: kept whatever happens next
        trained = _train_all(
            store,
            cohort,
            config,
            plan,
            sizes,
            dev,
            executor,
            scheduler,
            workers,
            threads,
            progress,
        )
        with store.meta_lock():
            meta = _read_run_json(root / "run.json")
            all_models = list(meta["models"])
            store.aggregate(all_models)
            if all(_complete(store, m, meta) for m in all_models):
                meta["finished"] = _now()
            write_json(root / "run.json", meta)
        # what this call did (not written to run.json: other writers may share the folder)
        return {**meta, "trained_here": trained}
    finally:
        writer.remove()
        if created:  # refused before anything of the run was written
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def _complete(store: RunStore, model: str, meta: dict) -> bool:
    opts = meta["options"]
    return all(
        store.is_done(model, r, k) for r in range(opts["repeats"]) for k in range(opts["folds"])
    )


def _open_run(store, writer, options, splits, new_models, sizes, cache_dir, cohort) -> dict:
    """Create run.json, or check this writer's options against it (under the meta lock)."""
    root = store.root
    remove_stale_temporaries(root, recursive=False)
    remove_stale_temporaries(root / "results", recursive=False)
    run_json = root / "run.json"
    if run_json.is_file():
        old = _read_run_json(run_json)
        diff = sorted(
            k for k in set(options) | set(old["options"]) if old["options"].get(k) != options.get(k)
        )
        if diff:
            others = store.active_writers(own=writer)
            held = (
                f"is being written by {describe(others[0])}"
                + (f" and {len(others) - 1} more writer(s)" if len(others) > 1 else "")
                if others
                else "holds a run"
            )
            raise NmosdError(
                f"{root} {held} with different options ({', '.join(diff)}); use a new --out "
                "folder, or the same options to join it"
            )
        models_info = old["models"]
        for m, info in new_models.items():
            if m in models_info and get_spec(m).is_torch and models_info[m].get("size") != sizes[m]:
                raise NmosdError(
                    f"{root}: {m} was run at size {models_info[m].get('size')}, not {sizes[m]}"
                )
            models_info.setdefault(m, info)
        started = old.get("started") or _now()
    else:
        models_info, started = dict(new_models), _now()
    if (root / "splits.tsv").is_file():
        old_splits = read_tsv(root / "splits.tsv")
        if not old_splits.equals(splits):
            raise NmosdError(
                f"{root}/splits.tsv differs from this cohort's splits; use a new --out"
            )
    else:
        write_tsv(root / "splits.tsv", splits)
    write_text(root / "README.md", RUN_README.format(version=__version__, root=root))
    return {
        "tool": "nmosd-ms cv",
        "version": __version__,
        "options": options,
        "models": models_info,
        "cohort": {
            "path": str(Path(cache_dir).resolve()),
            "counts": cohort.counts,
            "lesion_source": cohort.lesion_sources,
            "segmented": cohort.segmented_ids,
        },
        "started": started,
        "finished": None,
    }


def _train_all(
    store,
    cohort,
    config,
    plan,
    sizes,
    dev,
    executor,
    scheduler,
    workers,
    threads,
    progress,
) -> int:
    """Train every fold of this writer's models that no writer has finished, claiming each;
    returns how many folds this writer trained."""
    tasks = [
        FoldTask(
            m,
            s.repeat,
            s.fold,
            fold_seed(config.seed, m, s.repeat, s.fold),
            sizes[m],
            s.train_idx,
            s.test_idx,
        )
        for m in config.run_models
        for s in plan
    ]
    total = len(tasks)
    pending = [t for t in tasks if not store.is_done(t.model, t.repeat, t.fold)]
    done = total - len(pending)
    if progress:
        progress(done, total, "cv")
    trained = 0
    if not pending:
        return trained

    cache_size = int(cohort.volumes.shape[-1])
    volumes: dict[int, np.ndarray] = {}
    for s in {t.size for t in pending if get_spec(t.model).is_torch}:
        vols = cohort.volumes
        if s != cache_size:
            vols = np.stack([resize(v, s) for v in vols])
        volumes[s] = vols[:, None].astype(np.float32)
    features = cohort.features()[list(FEATURES)].to_numpy(dtype=np.float64)
    labels = cohort.labels
    last_tables = time.monotonic()

    def finish(task: FoldTask, out: FoldOutput) -> None:
        nonlocal done, last_tables, trained
        store.save_fold(task, out, cohort, config.train)
        trained += 1
        # The result tables are rebuilt from every fold JSON: at most once a minute while the
        # run goes (each rebuild reads all folds so far), and always at the end.
        if time.monotonic() - last_tables >= 60:
            with store.meta_lock():
                store.aggregate(list(_read_run_json(store.root / "run.json")["models"]))
            last_tables = time.monotonic()
        done += 1
        if progress:
            progress(done, total, _label(task))

    def report_epoch(label: str, epoch: int, epochs: int) -> None:
        progress(done, total, f"{label} epoch {epoch}/{epochs}")

    empty = np.zeros((0,), dtype=np.float32)
    while pending:
        held: dict[tuple, tuple[FoldTask, Lock]] = {}  # dask: the folds claimed for the cluster
        claimed_any = False
        for t in pending:
            if store.is_done(t.model, t.repeat, t.fold):
                continue
            claim = store.claim(t.model, t.repeat, t.fold)
            if claim is None:
                continue
            if store.is_done(t.model, t.repeat, t.fold):  # finished while we looked
                claim.release()
                continue
            claimed_any = True
            if executor != "local":
                held[_key(t)] = (t, claim)
                continue
            # local: one fold at a time, the next one claimed only when this one is written
            vols = volumes.get(t.size, empty)
            on_epoch = functools.partial(report_epoch, _label(t)) if progress else None
            try:
                out = run_fold_task(
                    t, vols, labels, features, config.train, str(dev), threads, on_epoch
                )
                finish(t, out)
            finally:
                claim.release()
        if held:  # every fold claimed above runs on the cluster at once

            def finish_and_release(t: FoldTask, out: FoldOutput, held=held) -> None:
                finish(t, out)
                held.pop(_key(t))[1].release()

            try:
                _run_dask(
                    [t for t, _ in held.values()],
                    volumes,
                    labels,
                    features,
                    config.train,
                    str(dev),
                    scheduler,
                    workers,
                    threads or max(1, (os.cpu_count() or 1) // workers),
                    finish_and_release,
                    report_epoch if progress else None,
                )
            finally:
                for _, claim in held.values():
                    claim.release()
        before = len(pending)
        pending = [t for t in pending if not store.is_done(t.model, t.repeat, t.fold)]
        if pending and len(pending) == before and not claimed_any:
            # every remaining fold is being trained by another writer: wait for them (a writer
            # that dies releases its claims, and this loop then takes them over)
            if progress:
                progress(done, total, f"waiting for {len(pending)} fold(s) of other writers")
            time.sleep(POLL_SECONDS)
        done = total - len(pending)
    return trained


def _key(task: FoldTask) -> tuple[str, int, int]:
    return (task.model, task.repeat, task.fold)


def _label(task: FoldTask) -> str:
    return f"{task.model} r{task.repeat} f{task.fold}"


def _run_dask(
    todo, volumes, labels, features, train, device, scheduler, workers, threads, finish, on_epoch
):
    """One Dask task per fold; the cohort is scattered once; the client writes the results.
    ``on_epoch(label, epoch, epochs)`` hears each finished epoch of every running fold."""
    from dask.distributed import Client, LocalCluster, as_completed

    if scheduler:
        client, cluster = Client(scheduler), None
    else:
        import dask

        # Dask's default worker environment sets MALLOC_TRIM_THRESHOLD_, which freezes glibc's
        # mmap threshold: every large tensor is then a fresh mmap, and training ran 2-3x slower
        # (measured: 3.0 s vs 1.2 s per epoch, mostly system time). Keep glibc's defaults.
        environ = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=threads,
                processes=True,
                dashboard_address=None,
            )
        client = Client(cluster)
    try:
        if on_epoch is not None:
            # called on the client's event-loop thread, once per epoch of any running fold
            client.subscribe_topic(
                DaskEpochEvents.TOPIC,
                lambda event: on_epoch(event[1]["fold"], event[1]["epoch"], event[1]["epochs"]),
            )
        scattered = {s: client.scatter(v, broadcast=True) for s, v in volumes.items()}
        empty = client.scatter(np.zeros((0,), dtype=np.float32), broadcast=True)
        futures = {}
        for t in todo:
            vols = scattered.get(t.size, empty)
            fut = client.submit(
                run_fold_task,
                t,
                vols,
                labels,
                features,
                train,
                device,
                threads,
                DaskEpochEvents(_label(t)) if on_epoch is not None else None,
                pure=False,
                key=f"fold-{t.model}-{t.repeat}-{t.fold}",
            )
            futures[fut] = t
        for fut in as_completed(futures):
            # Drop the client's reference once written, so the worker frees the fold's result
            # (its weights are ~45 MB; otherwise every worker keeps all its folds' results
            # until the run ends).
            finish(futures.pop(fut), fut.result())
            fut.release()
    finally:
        if on_epoch is not None:
            client.unsubscribe_topic(DaskEpochEvents.TOPIC)
        client.close()
        if cluster is not None:
            cluster.close()
