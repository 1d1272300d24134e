"""The cross-validation run folder: its one owner.

Layout::

    RUN_DIR/run.json                       options, versions, cohort hash, models, times
    RUN_DIR/splits.tsv                     repeat, fold, participant_id, diagnosis, part
    RUN_DIR/folds/<model>/repeat-<r>/fold-<k>.json   one finished fold (the resume marker)
    RUN_DIR/models/<model>/repeat-<r>/fold-<k>.safetensors (+ .json)  final weights
    RUN_DIR/results/{folds,predictions,curves}.tsv   tables rebuilt from the fold records
    RUN_DIR/README.md                      what the files are
    RUN_DIR/claims/<model>/repeat-<r>/fold-<k>.lock   held while a writer trains that fold
    RUN_DIR/writers/<host>-<pid>-<token>.lock        held by each running writer (named in refusals)
    RUN_DIR/.nmosd-ms.lock                 held while run.json or the tables are written

Every file is written atomically; a fold counts as done only once its JSON exists, so a run
killed at any moment resumes by redoing the unfinished folds. Several writers may work on one
run folder at once (a second terminal, a job array) when their options are the same: each fold
is claimed by one writer (an ``flock``, released by the kernel when a writer dies, even by
``kill -9``), the others skip it and wait for it, so no fold is trained twice and no table mixes
options. A writer with other options is refused with one line naming the writers at work.

Everything that reads or writes these files goes through :class:`RunFolder`: cross-validation
writes it, the report and the bundle export read it (:meth:`RunFolder.load`,
:meth:`RunFolder.fold_weights`, :meth:`RunFolder.training_config`).
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import TrainConfig
from ..constants import LABELS, __version__
from ..errors import NmosdError
from ..evaluation.metrics import METRICS, binary_metrics
from ..io import (
    inside,
    read_json,
    read_tsv,
    remove_stale_temporaries,
    save_tensors,
    sha256_file,
    write_json,
    write_text,
    write_tsv,
)
from ..locking import LOCK_NAME, Lock, check_own_folder, describe, exclusive
from ..models import get_spec
from .loop import FoldOutput
from .plan import SPLIT_COLUMNS, FoldTask

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
RESULT_TABLES = {"folds": FOLD_COLUMNS, "predictions": PRED_COLUMNS, "curves": CURVE_COLUMNS}

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


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """A run folder as read for reporting: ``meta`` is run.json (validated), the tables are
    ``results/*.tsv`` and ``splits.tsv``."""

    root: Path
    meta: dict
    folds: pd.DataFrame
    predictions: pd.DataFrame
    curves: pd.DataFrame
    splits: pd.DataFrame

    @property
    def models(self) -> list[str]:
        present = set(self.folds["model"])
        return [m for m in self.meta["models"] if m in present]


@dataclass(frozen=True)
class FoldWeights:
    """One fold model's weight file in a run folder, checked against its recorded sha256."""

    repeat: int
    fold: int
    path: Path
    sha256: str
    test_ids: list[str]


class RunFolder:
    """Paths, records, tables and the writers' locks of one cross-validation run folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- locks ----------------------------------------------------------------------------------
    def check_own(self) -> None:
        """Refuse a folder that holds something else than a run (it is never written into)."""
        check_own_folder(self.root, "run.json", "a cv run folder")

    def meta_lock(self, wait: float = 120) -> Lock:
        """Held while run.json, splits.tsv, README.md or the result tables are written."""
        return exclusive(self.root / LOCK_NAME, f"run folder {self.root}", wait=wait)

    def claim(self, task: FoldTask) -> Lock | None:
        """The claim of one fold for this writer, or ``None`` when another writer holds it."""
        model, repeat, fold = task.key
        lock = Lock(inside(self.root, "claims", model, f"repeat-{repeat}", f"fold-{fold}.lock"))
        if not lock.acquire():
            return None
        # leftovers of a writer killed while it wrote this fold's files: nobody else writes them
        for folder in (self._weights(*task.key).parent, self._fold_json(*task.key).parent):
            for p in folder.glob(f".fold-{fold}.*tmp*"):
                p.unlink(missing_ok=True)
        return lock

    def register_writer(self) -> Lock:
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

    # -- run.json ----------------------------------------------------------------------------
    def has_run(self) -> bool:
        """Whether a run was started here (run.json exists)."""
        return (self.root / "run.json").is_file()

    def read_meta(self) -> dict:
        """run.json as written (options compared as stored), once it validates as a run record."""
        from ..records import RunRecord, validate_record

        path = self.root / "run.json"
        meta = read_json(path, "run record")
        validate_record(meta, RunRecord, "run record", path)
        return meta

    def write_meta(self, meta: dict) -> None:
        write_json(self.root / "run.json", meta)

    def open(
        self,
        writer: Lock,
        options: dict,
        splits: pd.DataFrame,
        models: dict,
        sizes: dict,
        cohort: dict,
    ) -> dict:
        """Create the run's records, or check this writer's options against them; returns the
        run.json content to write (call under :meth:`meta_lock`)."""
        root = self.root
        remove_stale_temporaries(root, recursive=False)
        remove_stale_temporaries(root / "results", recursive=False)
        if self.has_run():
            old = self.read_meta()
            from ..records import RunOptions

            # the stored options as the run record reads them: a field added since the run was
            # written takes its default, which keeps the old behaviour
            stored = RunOptions.model_validate(old["options"]).model_dump(mode="json")
            diff = sorted(k for k in set(options) | set(stored) if stored.get(k) != options.get(k))
            if diff:
                others = self.active_writers(own=writer)
                held = (
                    f"is being written by {describe(others[0])}"
                    + (f" and {len(others) - 1} more writer(s)" if len(others) > 1 else "")
                    if others
                    else "holds a run"
                )
                raise NmosdError(
                    f"{root} {held} with different options ({', '.join(diff)}); use a new output "
                    "folder, or the same options to join it"
                )
            models_info = old["models"]
            for m, info in models.items():
                old_size = models_info.get(m, {}).get("size")
                if m in models_info and get_spec(m).is_torch and old_size != sizes[m]:
                    raise NmosdError(f"{root}: {m} was run at size {old_size}, not {sizes[m]}")
                old_prior = (models_info.get(m, {}).get("pretraining") or {}).get("weights_sha256")
                new_prior = (info.get("pretraining") or {}).get("weights_sha256")
                if m in models_info and old_prior != new_prior:  # same path, other weights
                    raise NmosdError(f"{root}: {m} was run from other pretrained weights")
                models_info.setdefault(m, info)
            started = old.get("started") or now()
        else:
            models_info, started = dict(models), now()
        if (root / "splits.tsv").is_file():
            if not read_tsv(root / "splits.tsv").equals(splits):
                raise NmosdError(
                    f"{root}/splits.tsv differs from this cohort's splits; use a new output folder"
                )
        else:
            write_tsv(root / "splits.tsv", splits)
        write_text(root / "README.md", RUN_README.format(version=__version__, root=root))
        return {
            "tool": "nmosd-ms cv",
            "version": __version__,
            "options": options,
            "models": models_info,
            "cohort": cohort,
            "started": started,
            "finished": None,
        }

    def table_path(self, name: str) -> Path:
        """Where result table ``name`` ("folds", "predictions", "curves") is written."""
        if name not in RESULT_TABLES:
            raise ValueError(f"no result table {name!r} (have {', '.join(RESULT_TABLES)})")
        return self.root / "results" / f"{name}.tsv"

    # -- folds ---------------------------------------------------------------------------------
    def _fold_json(self, model: str, repeat: int, fold: int) -> Path:
        return inside(self.root, "folds", model, f"repeat-{repeat}", f"fold-{fold}.json")

    def _weights(self, model: str, repeat: int, fold: int) -> Path:
        return inside(self.root, "models", model, f"repeat-{repeat}", f"fold-{fold}.safetensors")

    def is_done(self, task: FoldTask) -> bool:
        return self._fold_json(*task.key).is_file()

    def complete(self, model: str, meta: dict) -> bool:
        """Whether every fold of ``model`` is finished."""
        opts = meta["options"]
        return all(
            self._fold_json(model, r, k).is_file()
            for r in range(opts["repeats"])
            for k in range(opts["folds"])
        )

    def save_fold(self, task: FoldTask, out: FoldOutput, cohort, train: TrainConfig) -> dict:
        """Write one finished fold of ``cohort`` (a PreparedCohort): its weights (+ metadata)
        first, its record last."""
        ids, labels = cohort.ids, cohort.labels
        people, sessions = cohort.participants, cohort.sessions
        with_sessions = cohort.has_sessions
        y = labels[task.test_idx]
        metrics = binary_metrics(y, out.prob_nmosd)
        weights_info = None
        if out.state_dict is not None:
            wpath = self._weights(*task.key)
            save_tensors(wpath, out.state_dict, {"model": task.model})
            weights_info = {"file": wpath.name, "sha256": sha256_file(wpath)}
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
                {
                    "participant_id": people[i],
                    **({"session_id": sessions[i]} if with_sessions else {}),
                    "diagnosis": LABELS[labels[i]],
                    "prob_nmosd": float(p),
                }
                for i, p in zip(task.test_idx, out.prob_nmosd, strict=True)
            ],
            "curves": out.curves,
            "weights": weights_info,
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            "device": {"name": out.device, "host": out.host or socket.gethostname()},
        }
        write_json(self._fold_json(*task.key), record)
        return record

    def aggregate(self, models: list[str] | None = None) -> dict[str, pd.DataFrame]:
        """Rebuild ``results/*.tsv`` from every fold record (call under :meth:`meta_lock`);
        ``models`` defaults to those of run.json, in its order."""
        tables = self._tables_from_records(models)
        for name, df in tables.items():
            write_tsv(self.table_path(name), df)
        return tables

    def _fold_records(self, models: list[str]) -> list[Path]:
        return [
            path
            for model in models
            for path in sorted((self.root / "folds" / model).glob("repeat-*/fold-*.json"))
        ]

    def _tables_from_records(self, models: list[str] | None = None) -> dict[str, pd.DataFrame]:
        """The result tables of every fold record, in memory (run.json's model order)."""
        if models is None:
            models = list(self.read_meta()["models"])
        folds, preds, curves = [], [], []
        for path in self._fold_records(models):
            rec = read_json(path, "fold record")
            key = {k: rec[k] for k in ("model", "repeat", "fold")}
            rec.setdefault("n_fit", rec["n_train"])  # folds written before n_fit existed
            folds.append({c: rec[c] for c in FOLD_COLUMNS})
            preds += [{**key, **p} for p in rec["predictions"]]
            curves += [{**key, **c} for c in rec["curves"]]
        order = {m: i for i, m in enumerate(models)}
        pred_columns = list(PRED_COLUMNS)
        if any("session_id" in p for p in preds):  # a cohort with sessions
            pred_columns.insert(pred_columns.index("participant_id") + 1, "session_id")
        tables = {
            "folds": pd.DataFrame(folds, columns=FOLD_COLUMNS),
            "predictions": pd.DataFrame(preds, columns=pred_columns),
            "curves": pd.DataFrame(curves, columns=CURVE_COLUMNS),
        }
        for name, df in tables.items():
            keys = ["repeat", "fold"]
            if name == "predictions":
                keys += [c for c in ("participant_id", "session_id") if c in df]
            keys += ["epoch"] if name == "curves" else []
            df = df.assign(_m=df["model"].map(order)).sort_values(["_m", *keys])
            tables[name] = df.drop(columns="_m").reset_index(drop=True)
        return tables

    # -- readers -------------------------------------------------------------------------------
    def load(self) -> Run:
        """The run as the report reads it: run.json validated, every table's columns checked."""
        from ..records import RunRecord, load_record

        root = self.root
        needed = ["run.json", "splits.tsv"]
        missing = [n for n in needed if not (root / n).is_file()]
        if missing:
            raise NmosdError(f"{root} is not a cv run folder (missing {', '.join(missing)})")
        meta = load_record(root / "run.json", RunRecord, "run record").model_dump(mode="json")
        try:
            tables = self._result_tables(list(meta["models"]))
            tables.append(read_tsv(root / "splits.tsv"))
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise NmosdError(f"{root}: a result table cannot be read ({exc})") from None
        run = Run(root, meta, *tables)
        self._check_tables(run)
        if run.folds.empty:
            raise NmosdError(f"{root} has no finished folds yet")
        return run

    def _result_tables(self, models: list[str]) -> list[pd.DataFrame]:
        """``results/*.tsv``, or the same tables from the fold records when those tables lag
        behind them: while cv runs it rebuilds the tables at most once a minute, and a run
        stopped early may have none yet. The records are what cv itself aggregates."""
        paths = [self.table_path(n) for n in RESULT_TABLES]
        records = self._fold_records(models)
        if all(p.is_file() for p in paths):
            folds = read_tsv(paths[0])  # the others are read only if these are current
            if len(folds) >= len(records):
                return [folds, *(read_tsv(p) for p in paths[1:])]
        elif not records:
            missing = [f"results/{p.name}" for p in paths if not p.is_file()]
            if len(missing) < len(paths):  # some tables and no record: a damaged folder
                raise NmosdError(
                    f"{self.root} is not a cv run folder (missing {', '.join(missing)})"
                )
            # run.json and nothing else: a run stopped (or still running) before its first fold
            raise NmosdError(f"{self.root} has no finished folds yet")
        return list(self._tables_from_records(models).values())

    @staticmethod
    def _check_tables(run: Run) -> None:
        """The columns the report reads; a table edited by hand is refused with one line."""
        needed = {
            "results/folds.tsv": (run.folds, [c for c in FOLD_COLUMNS if c != "n_fit"]),
            "results/predictions.tsv": (run.predictions, PRED_COLUMNS),
            "results/curves.tsv": (run.curves, CURVE_COLUMNS),
            "splits.tsv": (run.splits, SPLIT_COLUMNS),
        }
        for name, (df, cols) in needed.items():
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise NmosdError(f"{run.root}/{name} lacks column(s) {', '.join(missing)}")
        if "n_fit" not in run.folds.columns:  # runs written before n_fit was recorded
            run.folds["n_fit"] = run.folds["n_train"]

    def training_config(self, model: str) -> tuple[TrainConfig, int]:
        """The training options and the input size ``model`` had in this run, so that a model
        fitted on the whole cohort is trained exactly as the folds that were evaluated."""
        from ..records import RunRecord, load_record

        record = load_record(self.root / "run.json", RunRecord, "run record")
        if model not in record.models:
            raise NmosdError(f"{self.root} did not run {model} (it ran {', '.join(record.models)})")
        size = record.models[model].size
        if size is None:
            raise NmosdError(f"{model}: only neural-network models can be fitted into a bundle")
        return record.options.train, int(size)

    def fold_weights(self, model: str, folds: pd.DataFrame) -> list[FoldWeights]:
        """The weight files of the finished folds listed in ``folds`` (rows of results/folds.tsv),
        each checked against the sha256 recorded beside it."""
        found = []
        for _, row in folds.sort_values(["repeat", "fold"]).iterrows():
            repeat, fold = int(row["repeat"]), int(row["fold"])
            path = self._weights(model, repeat, fold)
            meta = read_json(path.with_suffix(".json"), "fold weights record")
            expected = str(meta.get("sha256")) if isinstance(meta, dict) else ""
            if not path.is_file() or sha256_file(path) != expected:
                raise NmosdError(f"{path} does not match its recorded sha256")
            test_ids = [str(i) for i in meta.get("test_ids", [])]
            found.append(FoldWeights(repeat, fold, path, expected, test_ids))
        return found
