"""Split planning: which subjects train and which test in every (repeat, fold), and the seed of
every (model, repeat, fold) task.

One plan is shared by every model of a run (paired comparisons), planned once from the labels
and the seed alone, so every writer of a run folder (a second terminal, a job array) computes
the same plan independently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedGroupKFold

SPLIT_COLUMNS = ["repeat", "fold", "participant_id", "diagnosis", "part"]


def fold_seed(seed: int, model: str, repeat: int, fold: int) -> int:
    """A seed that is a pure function of (seed, model, repeat, fold), so that a fold trains the
    same wherever and whenever it runs."""
    digest = hashlib.sha256(f"{seed}|{model}|{repeat}|{fold}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class Split:
    """One (repeat, fold): indices into the cohort, sorted."""

    repeat: int
    fold: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def plan_splits(
    labels: np.ndarray, folds: int, repeats: int, seed: int, groups=None
) -> list[Split]:
    """Subject-level repeated stratified k-fold.

    Parameters
    ----------
    labels : array of shape (n_subjects,)
        Class of each subject (0 = MS, 1 = NMOSD); each class needs at least ``folds`` subjects.
    folds : int
        Number of folds per repeat (at least 2; the paper: 5).
    repeats : int
        Number of repeats, each with its own shuffle (at least 1; the paper: 15).
    seed : int
        Seed of scikit-learn's ``RepeatedStratifiedKFold``.
    groups : array of shape (n_subjects,), optional
        The person of each row. When a person has several rows (sessions), all of them fall
        on the same side of every fold (scikit-learn's ``StratifiedGroupKFold``, shuffled with
        a seed drawn from ``seed`` per repeat); with one row per person the plan is exactly
        the ungrouped one.

    Returns
    -------
    list of Split
        ``repeats * folds`` splits, repeat-major; repeat and fold are numbered from 0. Within a
        repeat every subject is tested exactly once and never trains in the fold that tests it.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer of at least 2, not {folds}")
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, not {repeats}")
    dummy = np.zeros((len(labels), 1))
    if groups is not None and len(set(groups)) < len(groups):
        groups = np.asarray(groups)
        if len(groups) != len(labels):
            raise ValueError("groups and labels differ in length")
        people = {g: labels[groups == g] for g in set(groups)}
        if any(len(set(v)) > 1 for v in people.values()):
            raise ValueError("a person has sessions with different diagnoses")
        per_class = np.bincount([int(v[0]) for v in people.values()], minlength=2)
        if per_class.min() < folds:
            raise ValueError(f"each class needs at least {folds} people for {folds} folds")
        seeds = np.random.RandomState(seed).randint(0, 2**31 - 1, size=repeats)
        pairs = (
            pair
            for r in range(repeats)
            for pair in StratifiedGroupKFold(
                n_splits=folds, shuffle=True, random_state=int(seeds[r])
            ).split(dummy, labels, groups)
        )
    else:
        groups = None
        pairs = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed).split(
            dummy, labels
        )
    plan = []
    for i, (tr, te) in enumerate(pairs):
        split = Split(i // folds, i % folds, np.sort(tr), np.sort(te))
        assert not np.intersect1d(split.train_idx, split.test_idx).size, "leak between parts"
        if groups is not None:
            both = set(groups[split.train_idx]) & set(groups[split.test_idx])
            assert not both, f"a person on both sides of a fold: {sorted(both)[:3]}"
        plan.append(split)
    for r in range(repeats):
        tests = np.concatenate([s.test_idx for s in plan if s.repeat == r])
        assert np.array_equal(np.sort(tests), np.arange(len(labels))), "a subject is never tested"
    return plan


def splits_frame(
    ids: list[str], diagnoses: list[str], plan: list[Split], sessions: list[str] | None = None
) -> pd.DataFrame:
    """The plan as a table (``SPLIT_COLUMNS``, plus ``session_id`` after ``participant_id``
    when ``sessions`` are given), one row per scan and (repeat, fold); ``ids`` are the people."""
    rows = []
    for s in plan:
        for part, idx in (("train", s.train_idx), ("test", s.test_idx)):
            rows += [(s.repeat, s.fold, ids[i], diagnoses[i], part) for i in idx]
    df = pd.DataFrame(rows, columns=SPLIT_COLUMNS)
    keys = ["repeat", "fold", "part", "participant_id"]
    if sessions is not None:
        df.insert(
            3,
            "session_id",
            [sessions[i] for s in plan for idx in (s.train_idx, s.test_idx) for i in idx],
        )
        keys.append("session_id")
    return df.sort_values(keys, ignore_index=True)


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
    """One unit of work for an executor: train ``model`` at input ``size`` on one split."""

    model: str
    repeat: int
    fold: int
    seed: int
    size: int
    train_idx: np.ndarray
    test_idx: np.ndarray

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.model, self.repeat, self.fold)

    @property
    def label(self) -> str:
        return f"{self.model} r{self.repeat} f{self.fold}"


def plan_tasks(
    plan: list[Split], models: list[str], sizes: dict[str, int], seed: int
) -> list[FoldTask]:
    """Every (model, repeat, fold) task of a run, model-major, each with its own seed."""
    return [
        FoldTask(
            m,
            s.repeat,
            s.fold,
            fold_seed(seed, m, s.repeat, s.fold),
            sizes[m],
            s.train_idx,
            s.test_idx,
        )
        for m in models
        for s in plan
    ]
