"""Classical lesion-load features of one lesion mask, in physical units.

Computed on the native-resolution mask (canonical RAS orientation, voxel sizes from the affine),
so they do not depend on the 100³ resize. Definitions (all documented in README):

- ``n_lesions``: connected components (26-connectivity) of at least ``min_mm3`` mm³ (24 mm³:
  three 2 mm voxels, 24 voxels at 1 mm, 133 at 0.47 × 0.47 × 0.8 mm).
- ``total_ml``, ``mean_lesion_ml``, ``max_lesion_ml``: volumes of those components.
- ``central_fraction``: share of lesion volume whose normalised distance from the centre of the
  brain box is below 0.5 (distance per axis divided by the box half-extent; 1 = box surface).
- ``lr_asymmetry``: |left - right| / (left + right) lesion volume about the brain-box centre.
- ``extent_x_mm``, ``extent_y_mm``, ``extent_z_mm``: extent of all lesions along R-L, A-P, S-I.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FEATURES = (
    "n_lesions",
    "total_ml",
    "mean_lesion_ml",
    "max_lesion_ml",
    "central_fraction",
    "lr_asymmetry",
    "extent_x_mm",
    "extent_y_mm",
    "extent_z_mm",
)


def lesion_features(
    mask: np.ndarray,
    zooms: np.ndarray,
    brain_lo: tuple[int, ...],
    brain_hi: tuple[int, ...],
    min_voxels: int | None = None,
    min_mm3: float = 24.0,
) -> dict[str, float]:
    """Features of a binary ``mask`` in canonical RAS orientation with voxel sizes ``zooms`` (mm).
    A lesion is a component of at least ``min_mm3`` mm³ (or ``min_voxels`` voxels if given)."""
    out = dict.fromkeys(FEATURES, 0.0)
    mask = mask > 0
    from ..spatial import bounding_box

    box = bounding_box(mask)
    if box is None:
        out["n_lesions"] = 0
        return out
    lo, hi = box
    sub = mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    labels, n = ndimage.label(sub, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())[1:]
    voxel_ml = float(np.prod(zooms)) / 1000.0
    if min_voxels is not None:
        keep = np.flatnonzero(sizes >= min_voxels) + 1
    else:  # in physical units, so counts compare across voxel sizes; 1e-4 relative: voxel
        # sizes from float32 headers (2 mm read as 1.9999999) must not drop a 24 mm³ component
        keep = np.flatnonzero(sizes * voxel_ml * 1000.0 >= min_mm3 * (1 - 1e-4)) + 1
    if keep.size == 0:
        return out
    kept = np.isin(labels, keep)
    vols = sizes[keep - 1] * voxel_ml
    out["n_lesions"] = int(keep.size)
    out["total_ml"] = float(vols.sum())
    out["mean_lesion_ml"] = float(vols.mean())
    out["max_lesion_ml"] = float(vols.max())

    idx = np.argwhere(kept) + np.asarray(lo)
    centre = (np.asarray(brain_lo) + np.asarray(brain_hi) - 1) / 2.0
    half = np.maximum((np.asarray(brain_hi) - np.asarray(brain_lo)) / 2.0, 1.0)
    r = np.sqrt((((idx - centre) / half) ** 2).sum(axis=1))
    out["central_fraction"] = float((r < 0.5).mean())
    right = float((idx[:, 0] > centre[0]).sum())  # RAS: larger x index = more to the right
    left = float((idx[:, 0] < centre[0]).sum())
    out["lr_asymmetry"] = abs(left - right) / max(left + right, 1.0)
    ext = (idx.max(axis=0) - idx.min(axis=0) + 1) * np.asarray(zooms)
    out["extent_x_mm"], out["extent_y_mm"], out["extent_z_mm"] = (float(v) for v in ext)
    return out
