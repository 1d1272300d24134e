"""WMH segmentation from a FLAIR, in the spirit of the coarse-to-fine morphological method the
paper's commercial tool uses (Shi et al. 2013): threshold, reconstruction, cleaning.

1. Brain mask: the given one; otherwise Otsu threshold + largest component + hole filling,
   eroded by ``edge_mm`` to drop skull and scalp (limits: a skull-stripped FLAIR is best; on a
   raw scan with skull, bright scalp fat near the brain edge is removed by the edge rule, and
   lesions within ``edge_mm`` of the brain surface are lost with it).
2. Robust normalisation inside the brain: z = (I − mode) / σ, where the mode is the peak of the
   smoothed intensity histogram (normal-appearing tissue) and σ comes from the half width at
   half maximum on the peak's dark side (lesions sit in the bright tail, CSF in the dark one,
   so neither inflates σ).
3. Candidates: hysteresis thresholding on z (grey-scale reconstruction by dilation of the
   strong seeds z ≥ ``high`` under the mask z ≥ ``low``), after a small grey-scale closing.
4. Cleaning: candidates within ``edge_mm`` of the brain surface (partial volume, cortex and
   artefacts live there) are discarded, then components smaller than ``min_volume_mm3``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu


@dataclass(frozen=True)
class WMHParams:
    low: float = 3.0  # z threshold of the reconstruction mask
    high: float = 4.0  # z threshold of the seeds
    min_volume_mm3: float = 10.0
    edge_mm: float = 2.0
    closing_mm: float = 0.0


def brain_mask_from_flair(flair: np.ndarray, zooms) -> np.ndarray:
    """Otsu + largest connected component + hole filling (a head mask on raw scans)."""
    values = flair[flair > 0]
    if values.size < 10:
        return np.zeros(flair.shape, bool)
    fg = flair > threshold_otsu(values)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == sizes.argmax()
    fg = ndimage.binary_closing(fg, iterations=2)
    return ndimage.binary_fill_holes(fg)


def tissue_mode(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Peak of the smoothed histogram and σ from its dark-side half width at half maximum."""
    hist, edges = np.histogram(values, bins=bins)
    smooth = ndimage.gaussian_filter1d(hist.astype(float), 2)
    centres = (edges[:-1] + edges[1:]) / 2
    peak = int(smooth.argmax())
    i = peak
    while i > 0 and smooth[i] > smooth[peak] / 2:
        i -= 1
    sigma = (centres[peak] - centres[i]) / 1.1774  # HWHM of a Gaussian = 1.1774 σ
    return float(centres[peak]), float(sigma) if sigma > 0 else float(values.std() or 1.0)


def _ball(radius_mm: float, zooms) -> np.ndarray:
    r = np.maximum(np.round(radius_mm / np.asarray(zooms, float)).astype(int), 0)
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * z) ** 2 for g, z in zip(grid, zooms, strict=True)) <= radius_mm**2 + 1e-6


def segment_wmh(
    flair: np.ndarray, zooms, brain: np.ndarray | None = None, params: WMHParams = WMHParams()
) -> np.ndarray:
    """Binary WMH mask on the FLAIR's grid."""
    flair = np.asarray(flair, dtype=np.float32)
    zooms = np.asarray(zooms, dtype=float)
    given = brain is not None
    brain = brain.astype(bool) if given else brain_mask_from_flair(flair, zooms)
    if not brain.any():
        return np.zeros(flair.shape, bool)
    if not given:  # a head mask: strip a rim so the scalp does not count as brain
        brain = ndimage.binary_erosion(brain, _ball(max(params.edge_mm, 6.0), zooms))
    mode, sigma = tissue_mode(flair[brain])
    z = (flair - mode) / sigma
    if params.closing_mm > 0:
        z = ndimage.grey_closing(z, footprint=_ball(params.closing_mm, zooms))
    inside = brain
    if params.edge_mm > 0:  # the rim under the brain surface: partial volume, cortex, artefacts
        inside = ndimage.binary_erosion(brain, _ball(params.edge_mm, zooms))
    z[~inside] = -np.inf
    cand = apply_hysteresis_threshold(z, params.low, params.high)
    labels, n = ndimage.label(cand, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return cand
    voxel_mm3 = float(np.prod(zooms))
    sizes = np.bincount(labels.ravel()) * voxel_mm3
    keep = sizes >= params.min_volume_mm3
    keep[0] = False
    return keep[labels]
