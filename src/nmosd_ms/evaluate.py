"""External validation (``nmosd-ms evaluate``): score a bundle on a labelled second cohort.

Each subject is preprocessed with the bundle's own preprocessing (a FLAIR without a lesion mask
is segmented, as in ``predict``) and scored by the fold ensemble; the lesion-load models the
bundle carries (fitted on its training cohort) score the same subjects from their lesion-load
features. Metrics, stratified bootstrap intervals, calibration, ROC and the confusion matrix are
:mod:`nmosd_ms.evaluation.external`'s; the page is :mod:`nmosd_ms.report.external`'s.

An evaluation folder holds::

    DIR/predictions.tsv   one row per subject: label, P(NMOSD) of the network and each baseline
    DIR/metrics.tsv       model, metric, value, ci_low, ci_high
    DIR/comparison.tsv    network minus each baseline (paired bootstrap intervals)
    DIR/calibration.tsv   reliability-diagram bins per model
    DIR/roc.tsv           ROC points per model
    DIR/evaluation.json   everything above in one record, with the method and the cohort
                          differences; written last (a folder with it is complete)
    DIR/report/index.html the page, with its figures
    DIR/segmentations/    the WMH masks made here for subjects without a lesion mask, as a BIDS
                          derivative dataset (:mod:`nmosd_ms.derivatives`, as ``predict``
                          writes them), for review; the predictions' ``segmentation`` column
                          names each (relative to DIR)

A cohort that shares participants or input files with the bundle's training cohort is refused
(the leakage check) unless ``allow_overlap`` is given; the page then says so at the top.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .bundle import Bundle
from .constants import LABELS, POSITIVE, __version__
from .data.features import FEATURES
from .data.ingest import Cohort, Subject, scan_key
from .data.preprocess import PreparedSubject
from .derivatives import DerivativeDataset
from .errors import NmosdError
from .evaluation.external import (
    BOOTSTRAP_METHOD,
    bootstrap_metrics,
    calibration,
    confusion,
    reliability,
    roc_points,
)
from .io import inside, read_tsv, sha256_file, write_json, write_tsv
from .locking import writing_folder
from .models.lesionload import SHORTCUT_MODELS
from .predict import prepare_for_bundle, save_segmentation

__all__ = [
    "Evaluation",
    "check_overlap",
    "evaluate_cohort",
    "find_overlap",
    "read_tables",
    "RECORD",
    "TABLES",
]

#: The file whose presence marks a complete evaluation folder.
RECORD = "evaluation.json"
#: The folder's tables, ``<name>.tsv`` each (the attributes of :class:`Evaluation` they hold)
TABLES = ("predictions", "metrics", "comparison", "calibration", "roc")
#: The threshold the lesion-load baselines call NMOSD at (their predict_proba >= 0.5).
BASELINE_THRESHOLD = 0.5
#: The BIDS derivative dataset of the WMH masks made here, inside the evaluation folder.
SEGMENTATIONS = "segmentations"


@dataclass
class Evaluation:
    """What ``evaluate`` measured (the tables are those written to the folder)."""

    network: str
    predictions: pd.DataFrame
    metrics: pd.DataFrame
    comparison: pd.DataFrame
    calibration: pd.DataFrame
    roc: pd.DataFrame
    record: dict
    path: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    #: subjects segmented here, with what was prepared from them (their masks are written)
    segmented: list[tuple[Subject, PreparedSubject]] = field(default_factory=list, repr=False)

    def value(self, model: str, metric: str) -> float:
        row = self.metrics[(self.metrics["model"] == model) & (self.metrics["metric"] == metric)]
        return float(row["value"].iloc[0])


def _input_hashes(subject: Subject) -> dict[str, str]:
    # FLAIRs and lesion masks only: a brain mask may legitimately be one template file shared by
    # every subject of both cohorts (data in MNI space)
    return {
        what: sha256_file(p)
        for what, p in (("FLAIR", subject.flair), ("lesion mask", subject.lesion_mask))
        if p is not None
    }


def check_overlap(bundle: Bundle, subjects: list[Subject]) -> dict:
    """Which of ``subjects`` the bundle's training cohort, or the maps its prior was pretrained
    on, holds: participant IDs it recorded, and input files (FLAIR, lesion mask) whose sha256 it
    recorded."""
    training = bundle.info.training
    ids, files = list(training.participant_ids), list(training.input_sha256)
    if training.pretraining is not None:  # the prior's maps were seen too
        ids += training.pretraining.participant_ids
        files += training.pretraining.input_sha256
    return find_overlap(ids, files, subjects)


def find_overlap(participant_ids, input_sha256, subjects: list[Subject]) -> dict:
    """Which of ``subjects`` a training cohort holds, given its participant IDs and the sha256 of
    its input files (as :attr:`~nmosd_ms.data.cache.PreparedCohort.inputs` gives them)."""
    trained_ids = set(participant_ids)
    trained_files = set(input_sha256)
    ids = sorted({s.participant_id for s in subjects} & trained_ids)
    files, scans = [], {s.key for s in subjects if s.participant_id in trained_ids}
    for s in subjects:
        for what, digest in _input_hashes(s).items():
            if digest in trained_files:
                files.append(f"{s.key} {what}")
                scans.add(s.key)
    return {
        "participants": ids,
        "files": files,
        "scans": sorted(scans),  # every scan of the cohort that either check flags
        "checked": {
            "participant_ids": bool(trained_ids),
            "input_sha256": bool(trained_files),
        },
    }


def _overlap_error(overlap: dict) -> str:
    parts = []
    if overlap["participants"]:
        ids = overlap["participants"]
        parts.append(
            f"{len(ids)} participant ID(s) ({', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})"
        )
    if overlap["files"]:
        f = overlap["files"]
        parts.append(f"{len(f)} identical input file(s) ({', '.join(f[:2])}{', …' * (len(f) > 2)})")
    return (
        f"the cohort overlaps the bundle's training cohort (or its prior's maps): "
        f"{' and '.join(parts)}; scores on "
        "training subjects are not an external validation. If they are other people who share "
        "IDs (another site's numbering), rename them, or give --allow-overlap to evaluate anyway"
    )


def evaluate_cohort(
    bundle: Bundle,
    cohort: Cohort,
    out_dir: str | Path | None = None,
    allow_overlap: bool = False,
    n_resamples: int = 9999,
    confidence: float = 0.95,
    seed: int = 0,
    progress=None,
) -> Evaluation:
    """Score ``bundle`` on the labelled ``cohort`` and (with ``out_dir``) write the folder.

    Parameters
    ----------
    bundle : Bundle
        From :func:`~nmosd_ms.bundle.load_bundle`.
    cohort : Cohort
        Labelled subjects (:func:`~nmosd_ms.data.dataset.load_cohort`, as ``prepare`` reads);
        a subject without a lesion mask is segmented from its FLAIR.
    out_dir : path, optional
        A new evaluation folder (see the module docstring); refused if it holds an evaluation.
        It is locked before any work, so an unwritable or busy folder is refused at once.
    allow_overlap : bool
        Evaluate even if participants or input files are in the training cohort (flagged).
    n_resamples : int
        Bootstrap resamples (at least 1000).
    confidence : float
        Level of the intervals, in (0.5, 1).
    seed : int
        Seed of the bootstrap's generator (same seed, same intervals).
    """
    if n_resamples < 1000:
        raise NmosdError("at least 1000 bootstrap resamples are needed", option="n_resamples")
    if not 0.5 < confidence < 1:
        raise NmosdError("the confidence level must be in (0.5, 1)", option="confidence")
    subjects = list(cohort.subjects)
    if not subjects:
        raise NmosdError("the cohort is empty")
    bad = sorted({s.diagnosis for s in subjects} - set(LABELS))
    if bad:
        raise NmosdError(f"every subject needs a diagnosis NMOSD or MS, not {', '.join(bad)}")
    keys = [s.key for s in subjects]
    if len(set(keys)) != len(keys):
        raise NmosdError("a participant (and session) is given twice")
    overlap = check_overlap(bundle, subjects)
    if (overlap["participants"] or overlap["files"]) and not allow_overlap:
        raise NmosdError(_overlap_error(overlap))
    if out_dir is None:
        return _evaluate(bundle, cohort, subjects, overlap, n_resamples, confidence, seed, progress)
    out = Path(out_dir)
    if (out / RECORD).exists():
        raise NmosdError(f"{out} already holds an evaluation; choose a new folder", option="out")
    with writing_folder(out, "evaluation folder"):
        segmentations = _segmentations(out, subjects)  # before any work: IDs it refuses
        ev = _evaluate(bundle, cohort, subjects, overlap, n_resamples, confidence, seed, progress)
        _write(ev, out, segmentations)
    return ev


def _segmentations(out: Path, subjects: list[Subject]) -> DerivativeDataset:
    """The derivative dataset of the WMH masks this evaluation will make (for the subjects
    without a lesion mask), their BIDS labels taken now: two IDs that would share a label are
    refused before any subject is prepared, not after."""
    dataset = DerivativeDataset(
        inside(out, SEGMENTATIONS),
        "nmosd-ms segmentations",
        "evaluate: the WMH masks it made for subjects without a lesion mask",
    )
    for s in subjects:
        if s.lesion_mask is None:
            dataset.label(s.participant_id)
    return dataset


def _evaluate(bundle, cohort, subjects, overlap, n_resamples, confidence, seed, progress):
    from .data.summary import describe_difference, summarise

    prepared = [prepare_for_bundle(bundle, s) for s in subjects]  # validates every input first
    network = bundle.info.model
    y = np.array([s.label for s in subjects])
    rows, p_net = [], []
    for i, prep in enumerate(prepared):
        probs = bundle.predict_volume(prep.array)
        p_net.append(float(probs.mean()))
        if progress:
            progress(i + 1, len(subjects))
    p_net = np.asarray(p_net)
    features = np.array([[prep.features[f] for f in FEATURES] for prep in prepared], dtype=float)
    probs = {network: p_net}
    probs.update({n: m.predict_proba(features) for n, m in bundle.baselines.items()})
    thresholds = {n: BASELINE_THRESHOLD for n in probs} | {network: bundle.info.threshold}
    in_training = set(overlap["scans"])
    for i, (s, prep) in enumerate(zip(subjects, prepared, strict=True)):
        rows.append(
            {
                "participant_id": s.participant_id,
                **({"session_id": s.session_id} if any(t.session_id for t in subjects) else {}),
                "diagnosis": s.diagnosis,
                "lesion_source": prep.row["lesion_source"],
                "segmentation": "",  # filled in when the folder is written
                "n_lesions": prep.features["n_lesions"],
                "total_ml": prep.features["total_ml"],
                "in_training": s.key in in_training,
                **{f"prob_{n}": float(p[i]) for n, p in probs.items()},
                **{
                    f"call_{n}": POSITIVE if p[i] >= thresholds[n] else "MS"
                    for n, p in probs.items()
                },
            }
        )
    metrics, comparison = bootstrap_metrics(
        y, probs, thresholds, network, n_resamples, confidence, seed
    )
    kinds = {network: "network"} | {
        n: "shortcut" if n in SHORTCUT_MODELS else "classical" for n in bundle.baselines
    }
    metrics.insert(1, "kind", metrics["model"].map(kinds))
    calib = pd.concat(
        [reliability(y, p).assign(model=n) for n, p in probs.items()], ignore_index=True
    )
    roc = pd.concat([roc_points(y, p).assign(model=n) for n, p in probs.items()], ignore_index=True)
    external = summarise(  # from what was prepared: no stacked copy of the volumes
        [s.diagnosis for s in subjects],
        pd.DataFrame([p.features for p in prepared]),
        [p.record for p in prepared],
    )
    training = bundle.info.training.summary
    record = {
        "nmosd_ms_version": __version__,
        "bundle": {
            "path": str(bundle.path.resolve()),
            "name": bundle.info.name,
            "model": network,
            "threshold": bundle.info.threshold,
            "n_fold_models": len(bundle.models),
            "training_counts": bundle.info.training.counts,
            "training_kind": bundle.info.training.kind,
            "baselines": sorted(bundle.baselines),
        },
        "cohort": {"source": cohort.source, "counts": cohort.counts, "n_subjects": len(subjects)},
        "method": {
            "bootstrap": (
                f"scipy.stats.bootstrap, {BOOTSTRAP_METHOD} intervals, {n_resamples} resamples "
                "of subjects drawn with replacement within each class (class counts fixed), one "
                "set of resamples for every model (paired differences)"
            ),
            "n_resamples": n_resamples,
            "confidence": confidence,
            "seed": seed,
            "thresholds": thresholds,
            "calibration": (
                "Brier score; slope: logistic regression of the outcome on logit(P); "
                "intercept: the same with logit(P) as an offset (slope 1)"
            ),
        },
        "metrics": _records(metrics),
        "comparison": _records(comparison),
        "calibration": {n: calibration(y, p) for n, p in probs.items()},
        "confusion": {n: confusion(y, p, thresholds[n]) for n, p in probs.items()},
        "overlap": overlap,
        "cohort_summary": external,
        "training_summary": training,
        "differences": (
            describe_difference(training, external)
            if training
            else [
                "The bundle records no summary of its training cohort (made by an older "
                "nmosd-ms, or exported when its prepared cache was gone), so the cohorts "
                "cannot be compared."
            ]
        ),
    }
    segmented = [
        (s, p) for s, p in zip(subjects, prepared, strict=True) if p.segmentation_bits is not None
    ]
    return Evaluation(
        network, pd.DataFrame(rows), metrics, comparison, calib, roc, record, segmented=segmented
    )


def _records(df: pd.DataFrame) -> list[dict]:
    return _clean(df.to_dict(orient="records"))


def _clean(obj):
    """NaN (an undefined metric) as JSON null; numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def read_tables(out_dir: str | Path) -> dict[str, pd.DataFrame] | None:
    """The tables of the finished evaluation in ``out_dir``, by name (:data:`TABLES`), or
    ``None`` when the folder holds none (``evaluation.json`` is written last)."""
    folder = Path(out_dir)
    if not (folder / RECORD).is_file():
        return None
    return {name: read_tsv(inside(folder, f"{name}.tsv", action="read")) for name in TABLES}


def _write(ev: Evaluation, out: Path, dataset: DerivativeDataset) -> None:
    from .report.external import write_page

    made: dict[str, str] = {}
    if ev.segmented:
        dataset.start()
        made = {
            s.key: f"{SEGMENTATIONS}/{save_segmentation(dataset, s, p)}" for s, p in ev.segmented
        }
        dataset.write_participants([s.participant_id for s, _ in ev.segmented])
        sessions = ev.predictions.get("session_id", [""] * len(ev.predictions))
        ev.predictions["segmentation"] = [
            made.get(scan_key(pid, ses), "")
            for pid, ses in zip(ev.predictions["participant_id"], sessions, strict=True)
        ]
    tables = {name: getattr(ev, name) for name in TABLES}
    for name, table in tables.items():
        write_tsv(inside(out, f"{name}.tsv"), table)
    files = [f"{name}.tsv" for name in tables] + [RECORD] + ([f"{SEGMENTATIONS}/"] if made else [])
    ev.figures = write_page(ev, inside(out, "report"), files, made)
    ev.path = out
    write_json(inside(out, RECORD), _clean(ev.record))  # last: the folder is complete
