"""What a prepared cohort looks like, in a few numbers a bundle can carry and another cohort can be
compared with: class balance, lesion-load distributions per class, scanner grids and voxel sizes
(from the NIfTI headers). No subject-level value is kept, only counts and quantiles.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from ..constants import LABELS
from ..spatial import SpatialRecord
from .cache import PreparedCohort

#: Load features summarised per class (quantiles 10, 25, 50, 75, 90 %).
SUMMARY_FEATURES = ("n_lesions", "total_ml")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def cohort_summary(cohort: PreparedCohort) -> dict:
    """:func:`summarise` of a prepared cohort."""
    return summarise(cohort.diagnoses, cohort.features(), [cohort.spatial(k) for k in cohort.ids])


def summarise(diagnoses: list[str], features: pd.DataFrame, records: list[SpatialRecord]) -> dict:
    """Counts per class, maps without a lesion per class, per-class quantiles of
    :data:`SUMMARY_FEATURES`, the voxel sizes (median and range per axis, mm, sorted so that
    orientation does not matter) and the most common source grids, from each subject's
    diagnosis, lesion-load features (one row each, in the same order) and spatial record."""
    dx = np.asarray(diagnoses)
    load = {
        lab: {
            f: [float(v) for v in np.quantile(features[f].to_numpy(float)[dx == lab], QUANTILES)]
            for f in SUMMARY_FEATURES
        }
        for lab in LABELS
        if (dx == lab).any()
    }
    zooms, grids = [], Counter()
    for rec in records:
        zooms.append(sorted(np.sqrt((rec.affine[:3, :3] ** 2).sum(axis=0)).round(3)))
        grids["×".join(str(n) for n in sorted(rec.source_shape))] += 1
    z = np.asarray(zooms)
    empty = features["n_lesions"].to_numpy(float) == 0
    return {
        "counts": {lab: int((dx == lab).sum()) for lab in LABELS},
        "no_lesion": {lab: int((empty & (dx == lab)).sum()) for lab in LABELS},
        "quantiles": list(QUANTILES),
        "load": load,
        "voxel_mm": {
            "median": [float(v) for v in np.median(z, axis=0)],
            "min": [float(v) for v in z.min(axis=0)],
            "max": [float(v) for v in z.max(axis=0)],
        },
        "grids": dict(grids.most_common(3)),
        "n_grids": len(grids),
    }


def _median(summary: dict, label: str, feature: str) -> float | None:
    q = summary.get("load", {}).get(label, {}).get(feature)
    return q[summary["quantiles"].index(0.5)] if q else None


def _voxels(summary: dict) -> str:
    v = summary["voxel_mm"]["median"]
    return "×".join(f"{x:.2g}" for x in v) + " mm"


def _grids(summary: dict) -> str:
    top = ", ".join(summary["grids"])
    more = summary["n_grids"] - len(summary["grids"])
    return top + (f" and {more} more" if more > 0 else "")


def describe_difference(training: dict, external: dict) -> list[str]:
    """Plain sentences on what differs between the training cohort and an external one (class
    balance, median lesion count and volume per class, voxel sizes and grids)."""

    def balance(s):
        c = s["counts"]
        n = sum(c.values())
        return (
            f"{c.get('NMOSD', 0)} NMOSD / {c.get('MS', 0)} MS ({c.get('NMOSD', 0) / n:.0%} NMOSD)"
        )

    out = [f"Class balance: external {balance(external)}; training {balance(training)}."]
    for feature, what, fmt in (
        ("n_lesions", "median lesion count", "{:.0f}"),
        ("total_ml", "median lesion volume", "{:.1f} ml"),
    ):
        parts = []
        for lab in LABELS:
            a, b = _median(external, lab, feature), _median(training, lab, feature)
            if a is None:
                continue
            ratio = f", ×{a / b:.2f}" if b else ""
            train = fmt.format(b) if b is not None else "n/a"
            parts.append(f"{lab} {fmt.format(a)} (training {train}{ratio})")
        out.append(f"{what[0].upper()}{what[1:]}: " + "; ".join(parts) + ".")
    n_empty = sum(external.get("no_lesion", {}).values())
    if n_empty:
        seen = training.get("no_lesion")
        out.append(
            f"{n_empty} of {sum(external['counts'].values())} external maps hold no lesion of "
            f"24 mm³ or more (training: {sum(seen.values()) if seen is not None else 'n/a'}); "
            "a network's output on an empty map is no evidence (the paper enrolled only "
            "patients with lesions)."
        )
    same_vox = np.allclose(
        training["voxel_mm"]["median"], external["voxel_mm"]["median"], atol=0.05
    )
    out.append(
        f"Voxel size (median, sorted axes): external {_voxels(external)}, training "
        f"{_voxels(training)}{'' if same_vox else ' — a different resolution'}; grids: external "
        f"{_grids(external)}, training {_grids(training)}."
    )
    return out
