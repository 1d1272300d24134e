"""Prediction on new patients with a model bundle (``nmosd-ms predict``): each subject is
preprocessed exactly as the bundle's training cohort was, scored by every fold model, and
optionally explained by an occlusion saliency map. The bundle format is :mod:`nmosd_ms.bundle`'s.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .bundle import Bundle, load_bundle
from .config import PrepareConfig
from .constants import __version__
from .data.ingest import Subject, load_manifest
from .data.preprocess import PreparedSubject, prepare_subject, preprocess_arrays
from .derivatives import DerivativeDataset, wmh_sidecar
from .errors import NmosdError
from .io import inside
from .locking import writing_folder
from .spatial import resize

__all__ = [
    "Bundle",
    "load_bundle",
    "predict_arrays",
    "predict_subjects",
    "prepare_for_bundle",
    "saliency_volume",
    "scope_note",
    "subjects_from_manifest",
]


def _bundle_config(bundle: Bundle) -> PrepareConfig:
    # A FLAIR without a lesion mask is segmented (nmosd_ms.segment), as prepare's segment_missing.
    return bundle.info.prepare.model_copy(update={"segment_missing": True})


def _to_model_size(bundle: Bundle, prep: PreparedSubject) -> PreparedSubject:
    if bundle.info.size != bundle.info.cache_size:
        prep.array = resize(prep.array, bundle.info.size).astype(np.float32)
    return prep


def prepare_for_bundle(bundle: Bundle, subject: Subject) -> PreparedSubject:
    """Exactly the bundle's preprocessing (at the cache size, then the model size if smaller)."""
    return _to_model_size(bundle, prepare_subject(subject, _bundle_config(bundle)))


def predict_arrays(
    bundle: Bundle,
    affine: np.ndarray,
    lesion: np.ndarray | None = None,
    flair: np.ndarray | None = None,
    brain: np.ndarray | None = None,
    participant_id: str = "subject",
) -> dict:
    """Predict one subject given as arrays on one grid, with the bundle's preprocessing.

    ``affine``, ``lesion``, ``flair``, ``brain`` and ``participant_id`` are those of
    :func:`~nmosd_ms.data.preprocess.preprocess_arrays` (a FLAIR without a lesion mask is
    segmented, as ``predict`` does).

    Returns a dict: ``prob_nmosd`` (the fold models' mean), ``predicted`` (the label at the
    bundle's threshold), ``fold_probs`` (each fold model's P(NMOSD)) and ``prepared`` (the
    :class:`~nmosd_ms.data.preprocess.PreparedSubject` the networks saw).
    """
    prep = preprocess_arrays(
        affine, lesion, flair, brain, _bundle_config(bundle), participant_id=participant_id
    )
    prep = _to_model_size(bundle, prep)
    probs = bundle.predict_volume(prep.array)
    mean = float(probs.mean())
    label = bundle.info.positive_class if mean >= bundle.info.threshold else "MS"
    return {"prob_nmosd": mean, "predicted": label, "fold_probs": probs, "prepared": prep}


def saliency_volume(bundle: Bundle, volume: np.ndarray, occlusion_size: int = 16) -> np.ndarray:
    """Occlusion saliency of a prepared volume at the bundle's size (see
    :func:`nmosd_ms.interpret.occlusion_map`): how much hiding each region lowers the ensemble's
    log-odds of the predicted class. ``occlusion_size`` is the occluding cube's edge in voxels."""
    from .interpret import occlusion_map

    volume = np.asarray(volume, dtype=np.float32)
    if volume.shape != (bundle.info.size,) * 3:
        raise NmosdError(f"the bundle takes a {bundle.info.size}³ volume, not {volume.shape}")
    return occlusion_map(bundle.models, volume, occlusion_size)


def subjects_from_manifest(path: str | Path) -> list[Subject]:
    """Prediction manifest: participant_id, lesion_mask and/or flair[, brain_mask] (no labels)."""
    return list(load_manifest(path, labelled=False).subjects)


def predict_subjects(
    bundle: Bundle,
    subjects: list[Subject],
    out_dir: str | Path | None = None,
    saliency: bool = False,
    occlusion_size: int = 16,
    progress=None,
) -> pd.DataFrame:
    """Predict every subject (all inputs validated first); write predictions and saliency maps.

    Parameters
    ----------
    bundle : Bundle
        From :func:`~nmosd_ms.bundle.load_bundle`.
    subjects : list of Subject
        New patients (a lesion mask and/or a FLAIR each; a FLAIR alone is segmented).
    out_dir : path, optional
        A BIDS derivative dataset (:mod:`nmosd_ms.derivatives`): ``phenotype/predictions.tsv``
        (+ ``.json``), segmentations and saliency maps with sidecars. It is created
        and locked before any work, so an unwritable or busy folder is refused at once; it must
        not already hold predictions. Every file written is named from a validated participant
        ID and checked to stay inside it.
    saliency : bool
        Also write occlusion saliency maps (needs ``out_dir``).
    occlusion_size : int
        Edge of the occluding cube, in voxels of the model grid.

    Returns the predictions table (one row per subject).
    """
    if saliency and out_dir is None:
        raise NmosdError("saliency maps need an output folder")
    if out_dir is None:
        return _predict(bundle, subjects, None, saliency, occlusion_size, progress)
    out = Path(out_dir)
    if (out / PREDICTIONS).exists() or any(out.glob("predictions.*")):
        raise NmosdError(
            f"the output {out} already holds predictions; choose a new folder", option="out"
        )
    with writing_folder(out, "prediction folder"):
        return _predict(bundle, subjects, out, saliency, occlusion_size, progress)


#: The prediction table inside a prediction folder (a BIDS derivative dataset).
PREDICTIONS = DerivativeDataset.table_path("predictions")

PREDICTION_COLUMNS = {
    "participant_id": "participant (BIDS label)",
    "session_id": "session (BIDS label; n/a without sessions)",
    "prob_nmosd": "P(NMOSD): mean of the fold models' softmax probabilities",
    "predicted": "NMOSD when prob_nmosd >= the bundle's threshold, else MS",
    "lesion_source": "given: the lesion mask was given; segmented: made from the FLAIR by nmosd-ms",
    "segmentation": "the WMH mask the model saw when it was segmented here (path in this dataset)",
    "saliency": "the occlusion saliency map (path in this dataset), when asked for",
    "n_lesions": "lesions (components of at least 24 mm³) in the map the model saw",
    "lesion_ml": "their total volume (ml)",
    "note": "why this prediction deserves caution, if it does (see scope_note); empty otherwise",
    "fold_spread": "standard deviation of the fold models' probabilities",
    "fold_min": "smallest fold-model probability",
    "fold_max": "largest fold-model probability",
}


def scope_note(features: dict, summary: dict | None) -> str:
    """Why a prediction from lesion-load ``features`` (``data.features``) lies outside what the
    bundle's training cohort (its ``summary``, :mod:`nmosd_ms.data.summary`) covered; "" if not.

    A map with no lesion is always flagged: the paper, like the built-in cohort, enrolled only
    patients with brain lesions, so a network trained on such a cohort says nothing on an empty
    map (a cohort made with lesion-free subjects, which the summary counts, is named instead).
    A lesion volume below the 10th (above the 90th) percentile of every training class is
    flagged too, since the model saw few maps like it."""
    if features["n_lesions"] == 0:
        seen = sum(((summary or {}).get("no_lesion") or {}).values())
        if seen:
            return f"no lesion of 24 mm³ or more (as {seen} maps of the training cohort)"
        return "no lesion of 24 mm³ or more: the model's output on such a map is not evidence"
    load = (summary or {}).get("load") or {}
    quantiles = (summary or {}).get("quantiles") or []
    if not load or 0.1 not in quantiles or 0.9 not in quantiles:
        return ""
    lo = min(q["total_ml"][quantiles.index(0.1)] for q in load.values())
    hi = max(q["total_ml"][quantiles.index(0.9)] for q in load.values())
    ml = features["total_ml"]
    if ml < lo:
        return f"lesion volume {ml:.2g} ml, below the 10th percentile of every training class"
    if ml > hi:
        return f"lesion volume {ml:.3g} ml, above the 90th percentile of every training class"
    return ""


def _predict(bundle, subjects, out, saliency, occlusion_size, progress) -> pd.DataFrame:
    keys = [s.key for s in subjects]
    if len(set(keys)) != len(keys):
        raise NmosdError("a participant (and session) is given twice")
    prepared = [prepare_for_bundle(bundle, s) for s in subjects]  # validates everything first
    with_sessions = any(s.session_id for s in subjects)
    dataset = None
    if out is not None:
        dataset = DerivativeDataset(
            out,
            "nmosd-ms predictions",
            f"predict with the bundle {bundle.info.name}",
            {"Description": f"bundle {bundle.path.resolve()} ({bundle.info.model})"},
        )
        for s in subjects:
            dataset.label(s.participant_id)  # two IDs that map to one label: refused up front
    rows, maps = [], {}
    for i, (s, prep) in enumerate(zip(subjects, prepared, strict=True)):
        probs = bundle.predict_volume(prep.array)
        mean = float(probs.mean())
        seg = sal = ""
        if dataset is not None and prep.segmentation_bits is not None:
            seg = _relative(dataset, s, "mask", space="orig", label="WMH")
        if dataset is not None and saliency:
            sal = _relative(dataset, s, "FLAIR", space="orig", desc="saliency")
        rows.append(
            {
                "participant_id": s.participant_id,
                **({"session_id": s.session_id} if with_sessions else {}),
                "prob_nmosd": mean,
                "predicted": bundle.info.positive_class if mean >= bundle.info.threshold else "MS",
                "lesion_source": prep.row["lesion_source"],
                "n_lesions": int(prep.features["n_lesions"]),
                "lesion_ml": round(float(prep.features["total_ml"]), 4),
                "note": scope_note(prep.features, bundle.info.training.summary),
                "segmentation": seg,
                **({"saliency": sal} if saliency else {}),
                "fold_spread": float(probs.std(ddof=1)) if len(probs) > 1 else math.nan,
                "fold_min": float(probs.min()),
                "fold_max": float(probs.max()),
                **{
                    f"prob_{Path(f.file).stem}": float(p)
                    for f, p in zip(bundle.info.files, probs, strict=True)
                },
            }
        )
        if saliency:
            maps[s.key] = saliency_volume(bundle, prep.array, occlusion_size)
        if progress:
            progress(i + 1, len(subjects))
    df = pd.DataFrame(rows)
    if dataset is not None:
        _write(dataset, bundle, subjects, prepared, rows, maps, df)
    return df


def save_segmentation(dataset: DerivativeDataset, subject: Subject, prep: PreparedSubject) -> str:
    """Write the WMH mask made for ``subject`` (its review montage and sidecar beside it) into
    ``dataset``; returns its path relative to the dataset."""
    relative = _relative(dataset, subject, "mask", space="orig", label="WMH")
    mask = inside(dataset.root, relative)
    prep.save_segmentation(mask)
    dataset.sidecar(mask, wmh_sidecar(subject.flair, "nmosd-ms segment (defaults)"))
    return relative


def _relative(dataset, subject, suffix: str, **entities) -> str:
    path = dataset.path(subject.participant_id, subject.session_id, suffix, **entities)
    return path.relative_to(dataset.root).as_posix()


def _write(dataset, bundle, subjects, prepared, rows, maps, df) -> None:
    dataset.start()
    root = dataset.root
    for s, prep, row in zip(subjects, prepared, rows, strict=True):
        source = s.flair or s.lesion_mask
        if row["segmentation"]:  # what the model saw, for review (+ PNG)
            save_segmentation(dataset, s, prep)
        if row.get("saliency"):
            from .interpret import save_saliency

            image = inside(root, row["saliency"])
            save_saliency(image, s, prep, maps[s.key])
            dataset.sidecar(
                image,
                {
                    "Description": (
                        "occlusion saliency: how much hiding a patch around each voxel lowers "
                        "the fold ensemble's log-odds of the predicted class (positive: the "
                        "region supports the prediction), mapped back onto the input's grid"
                    ),
                    "Units": "log-odds",
                    "SkullStripped": False,
                    "SpatialReference": Path(source).resolve().as_uri(),
                    "Sources": [Path(source).resolve().as_uri()],
                },
            )
    dataset.write_participants([s.participant_id for s in subjects])
    columns = {
        **PREDICTION_COLUMNS,
        **{
            c: f"P(NMOSD) of the fold model {c[5:]}"
            for c in df
            if c.startswith("prob_") and c != "prob_nmosd"
        },
    }
    meta = {
        "Description": "nmosd-ms predict",
        "bundle": str(bundle.path.resolve()),
        "model": bundle.info.model,
        "nmosd_ms_version": __version__,
        "threshold": bundle.info.threshold,
    }
    # the table last: a folder with its predictions table is complete
    dataset.write_table("predictions", df, columns, meta)
