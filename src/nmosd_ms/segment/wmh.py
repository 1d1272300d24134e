"""WMH segmentation from a FLAIR, in the spirit of the coarse-to-fine morphological method the
paper's commercial tool uses (Shi et al. 2013): local contrast, seeds, reconstruction, cleaning.

1. Brain mask: the given one; otherwise Otsu threshold + largest component + hole filling,
   eroded by 6 mm to drop skull and scalp (limits: a skull-stripped FLAIR is best; on a raw scan
   with skull, lesions within 6 mm of the brain surface are lost with the scalp).
2. Tissue level: the mode of the smoothed intensity histogram inside the brain (normal-appearing
   tissue). Voxels darker than ``csf_fraction`` × mode are CSF (ventricles, sulci).
3. Local contrast: the background is a Gaussian average (``background_mm``) of the voxels
   brighter than ``background_fraction`` × mode only, re-estimated three times without the
   voxels that stand out from it, so lesions, CSF and residual bias field do not shift it.
   z = (I − background) / (1.4826 × MAD of the residual).
4. Candidates: hysteresis (binary reconstruction by dilation, scipy's
   ``binary_propagation``) — seeds z ≥ ``high`` at least ``csf_margin_mm``
   from CSF, grown through z ≥ ``low`` tissue. The margin keeps the bright cortical ribbon along
   the sulci and the ependyma along the ventricles from seeding; periventricular lesions still
   grow up to the ventricle wall from a seed in the white matter.
5. Cleaning: nothing within ``edge_mm`` of the brain surface (partial volume, artefacts), then
   components smaller than ``min_volume_mm3``.
6. Border: each lesion takes in the voxels within ``rim_mm`` of it whose z ≥ ``rim_low`` — its
   partial-volume edge, which raters include (a geodesic dilation of one step).
7. Symmetry (``drop_symmetric``): normal FLAIR-bright anatomy — the caps at the frontal horns,
   the bands along the atria, the corticospinal tract in the internal capsule — is bilateral and
   mirror-symmetric, while lesions are mostly not. The mid-sagittal plane is found by maximal
   self-symmetry; a lesion is dropped when its mirror image is on average at least as bright
   (z, with 1.5 mm of tolerance) as the lesion itself. Kept anyway: lesions that straddle the
   plane (their mirror is themselves: callosal, diencephalic, brainstem lesions) and lesions of
   ``max_pair_mm3`` or more whose mirror image is also a lesion (bilateral confluent lesions at
   high load). Limit: a bilateral, mirror-symmetric pair of small lesions (< 2 ml each) is
   dropped — turn the step off when such pairs are expected (README).

The defaults were chosen on the two public FLAIRs with consensus masks that the tests use, so
those Dice figures are optimistic (README, WMH segmentation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import minimize

from ..config import SegmentConfig
from ..spatial import otsu_threshold


def brain_mask_from_flair(flair: np.ndarray, zooms) -> np.ndarray:
    """Otsu + largest connected component + hole filling (a head mask on raw scans)."""
    values = flair[flair > 0]
    if values.size < 10:
        return np.zeros(flair.shape, bool)
    fg = flair > otsu_threshold(values)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == sizes.argmax()
    fg = ndimage.binary_closing(fg, iterations=2)
    return ndimage.binary_fill_holes(fg)


def tissue_mode(values: np.ndarray, bins: int = 256) -> float:
    """Peak of the smoothed intensity histogram: the normal-appearing tissue level."""
    hist, edges = np.histogram(values, bins=bins)
    smooth = ndimage.gaussian_filter1d(hist.astype(float), 2)
    peak = int(smooth.argmax())
    return float((edges[peak] + edges[peak + 1]) / 2)


def _ball(radius_mm: float, zooms) -> np.ndarray:
    r = np.maximum(np.round(radius_mm / np.asarray(zooms, float)).astype(int), 0)
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g * z) ** 2 for g, z in zip(grid, zooms, strict=True)) <= radius_mm**2 + 1e-6


def local_contrast(
    flair: np.ndarray, tissue: np.ndarray, zooms, sigma_mm: float, iterations: int = 3
) -> np.ndarray:
    """z-score of each voxel against a robust local average of the tissue around it."""
    sigma = sigma_mm / np.asarray(zooms, float)
    weight = tissue.astype(np.float32)
    for _ in range(iterations):
        # normalised convolution: the Gaussian average over the weighted voxels only
        num = ndimage.gaussian_filter(flair * weight, sigma)
        den = ndimage.gaussian_filter(weight, sigma)
        residual = flair - num / np.maximum(den, 1e-3)
        r = residual[weight > 0]
        if r.size == 0:  # nothing brighter than the CSF level: no contrast to measure
            return np.zeros(flair.shape, np.float32)
        centre = np.median(r)
        scale = 1.4826 * np.median(np.abs(r - centre)) or 1.0
        weight = (tissue & (np.abs(residual - centre) < 2 * scale)).astype(np.float32)
    return (residual - centre) / scale


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel()) >= min_voxels
    keep[0] = False
    return keep[labels]


def midsagittal_plane(image: np.ndarray, brain: np.ndarray, zooms) -> tuple[np.ndarray, float]:
    """The plane the brain is most symmetric about, as (unit normal, offset) in voxel-mm
    coordinates (index × zoom): the reflection that best correlates the smoothed image with
    itself. Needs no affine: the left-right axis is the voxel axis whose flip correlates best.

    Written here because no maintained Python library estimates a mid-sagittal plane; the method
    is the classic maximal-symmetry one (Liu, Collins & Rothfus 2001; Tuzikov et al. 2003).
    """
    zooms = np.asarray(zooms, float)
    smooth = ndimage.gaussian_filter(image.astype(np.float32), 2.0 / zooms)
    step = np.maximum(np.round(3.0 / zooms).astype(int), 1)  # ~3 mm sample grid
    pts = np.argwhere(brain[tuple(slice(None, None, s) for s in step)]) * step
    if len(pts) > 40000:
        pts = pts[:: len(pts) // 40000 + 1]
    q = pts * zooms
    values = smooth[tuple(pts.T)]

    def cost(theta, axis):
        n = _plane_normal(axis, theta[:2])
        mirrored = ndimage.map_coordinates(smooth, (_reflect(q, n, theta[2]) / zooms).T, order=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant image: no symmetry
            c = np.corrcoef(values, mirrored)[0, 1]
        return 1.0 - (c if np.isfinite(c) else -1.0)

    best = None
    for axis in range(3):
        start = np.array([0.0, 0.0, q[:, axis].mean()])
        result = minimize(cost, start, args=(axis,), method="Powell", options={"xtol": 1e-3})
        if best is None or result.fun < best[0]:
            best = (result.fun, axis, result.x)
    _, axis, theta = best
    return _plane_normal(axis, theta[:2]), float(theta[2])


def _reflect(q: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Points ``q`` (N × 3, voxel-mm) mirrored across the plane ``normal · q = offset``."""
    return q - 2 * (q @ normal - offset)[:, None] * normal


def _plane_normal(axis: int, tilt) -> np.ndarray:
    n = np.zeros(3)
    n[axis] = 1.0
    others = [i for i in range(3) if i != axis]
    n[others] = tilt
    return n / np.linalg.norm(n)


def drop_symmetric(
    lesions: np.ndarray,
    z: np.ndarray,
    brain: np.ndarray,
    flair: np.ndarray,
    zooms,
    max_pair_mm3: float = 2000.0,
) -> np.ndarray:
    """Remove lesions whose mirror image across the mid-sagittal plane is at least as bright as
    they are (step 7 of the module docstring)."""
    labels, n = ndimage.label(lesions, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return lesions
    zooms = np.asarray(zooms, float)
    normal, offset = midsagittal_plane(flair, brain, zooms)
    # 1.5 mm of tolerance for an imperfect plane and imperfect symmetry
    size = 2 * np.maximum(np.round(1.5 / zooms).astype(int), 0) + 1
    brightest = ndimage.maximum_filter(z, size=tuple(size))
    idx = np.argwhere(lesions)
    mirror = (_reflect(idx * zooms, normal, offset) / zooms).T
    mirror_z = ndimage.map_coordinates(brightest, mirror, order=0, cval=-np.inf)
    lab = labels[tuple(idx.T)]
    mirror_label = ndimage.map_coordinates(labels, mirror, order=0)
    count = np.bincount(lab, minlength=n + 1)
    own = np.bincount(lab, weights=z[tuple(idx.T)], minlength=n + 1)
    other = np.bincount(lab, weights=np.maximum(mirror_z, -10.0), minlength=n + 1)
    straddles = np.bincount(lab, weights=mirror_label == lab, minlength=n + 1)
    paired = np.bincount(lab, weights=(mirror_label > 0) & (mirror_label != lab), minlength=n + 1)
    big = count * np.prod(zooms) >= max_pair_mm3
    symmetric = (other >= own) & (straddles < 0.05 * count) & ((paired < 0.05 * count) | ~big)
    symmetric[0] = True
    return ~symmetric[labels]


#: The largest grid the segmentation works on: 2^26 voxels is 256 x 512 x 512, eight times a
#: 1 mm head (182 x 218 x 182); the steps hold about twenty float32 copies of it.
MAX_WORKING_VOXELS = 2**26


def segment_wmh(
    flair: np.ndarray, zooms, brain: np.ndarray | None = None, params: SegmentConfig | None = None
) -> np.ndarray:
    """Binary WMH mask on the FLAIR's grid, from the array ``flair`` with voxel sizes ``zooms``
    (mm) and an optional ``brain`` mask (else found from the FLAIR); ``params`` are the
    method's thresholds (:class:`~nmosd_ms.config.SegmentConfig`).

    Scans with voxels smaller than half a ``params.working_mm`` cube (a native 3D FLAIR at
    0.8 × 0.47 × 0.47 mm: 0.18 mm³) are first box-averaged to about that spacing on their finer
    axes: the method's thresholds are per-voxel z-scores chosen at 1 mm, and small voxels carry
    more noise each (and 5× the voxels). Each fine voxel then takes the mask value of the coarse
    voxel it lies in.
    """
    params = params or SegmentConfig()
    flair = np.asarray(flair, dtype=np.float32)
    zooms = np.asarray(zooms, dtype=float)
    target = np.maximum(zooms, params.working_mm)
    shape = np.maximum(np.round(np.array(flair.shape) * zooms / target).astype(int), 1)
    # voxel volume sets the per-voxel noise: at half the working voxel's or more, work as is
    small_voxels = np.prod(zooms) < 0.5 * params.working_mm**3
    work = shape if small_voxels else np.array(flair.shape)
    if int(np.prod(work, dtype=np.int64)) > MAX_WORKING_VOXELS:
        from ..errors import NmosdError

        raise NmosdError(
            f"the FLAIR's working grid {tuple(int(n) for n in work)} at "
            f"{', '.join(f'{z:.2g}' for z in zooms)} mm is larger than any head "
            f"({MAX_WORKING_VOXELS:,} voxels at most; segmentation needs ~20 copies of it)"
        )
    if not small_voxels or np.array_equal(shape, flair.shape):
        return _segment(flair, zooms, brain, params)
    from ..spatial import resize  # area averaging

    small_zooms = zooms * np.array(flair.shape) / shape
    small_brain = None if brain is None else resize(brain.astype(np.float32), shape) >= 0.5
    mask = _segment(resize(flair, shape), small_zooms, small_brain, params)
    full = _nearest(mask, flair.shape)
    return full if brain is None else full & brain.astype(bool)


def _nearest(mask: np.ndarray, shape) -> np.ndarray:
    """A mask onto a finer grid of the same extent, each voxel taking the value of the coarse
    voxel it lies in (torch's "nearest-exact"; plain "nearest" is off by half a voxel)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None]
    return (
        F.interpolate(t, size=tuple(int(n) for n in shape), mode="nearest-exact")[0, 0].numpy() > 0
    )


def _segment(
    flair: np.ndarray, zooms, brain: np.ndarray | None, params: SegmentConfig
) -> np.ndarray:
    given = brain is not None
    brain = brain.astype(bool) if given else brain_mask_from_flair(flair, zooms)
    if not given:  # a head mask: strip a rim so the scalp does not count as brain
        brain = ndimage.binary_erosion(brain, _ball(max(params.edge_mm, 6.0), zooms))
    if brain.sum() < 100:
        return np.zeros(flair.shape, bool)
    mode = tissue_mode(flair[brain])
    tissue = brain & (flair > params.csf_fraction * mode)
    z = local_contrast(
        flair, brain & (flair > params.background_fraction * mode), zooms, params.background_mm
    )
    inside = tissue
    if params.edge_mm > 0:  # the rim under the brain surface: partial volume, cortex, artefacts
        inside = tissue & ndimage.binary_erosion(brain, _ball(params.edge_mm, zooms))
    from_csf = ndimage.distance_transform_edt(tissue, sampling=zooms)
    seeds = (z >= params.high) & inside & (from_csf > params.csf_margin_mm)
    seeds = _drop_small(seeds, params.min_seed_mm3 / float(np.prod(zooms)))  # lone noisy voxels
    cand = ndimage.binary_propagation(seeds, mask=(z >= params.low) & inside)
    cand = _drop_small(cand, params.min_volume_mm3 / float(np.prod(zooms)))
    if params.rim_mm > 0:  # the partial-volume border of each lesion, one step deep
        rim = ndimage.binary_dilation(cand, _ball(params.rim_mm, zooms))
        cand |= rim & (z >= params.rim_low) & inside
    if params.drop_symmetric:
        cand = drop_symmetric(cand, z, brain, flair, zooms, params.max_pair_mm3)
    return cand
