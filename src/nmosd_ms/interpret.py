"""Saliency maps: occlusion sensitivity, mapped back onto the patient's original grid.

Occlusion works on the input volume itself, so the map is a genuine 3D map for every model
family (Grad-CAM on the two-view model would give a 2D map smeared along the compressed axes).
The value at a voxel is the log-odds of NMOSD of the intact input minus that with a
Gaussian-weighted cube around it removed: positive = the region pushes towards NMOSD, negative =
towards MS.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from . import nifti
from .derivatives import montage_path
from .io import atomic_path
from .spatial import to_canonical, to_native
from .viz import axial_montage


def _log_odds(logits: torch.Tensor) -> torch.Tensor:
    """log P(NMOSD) / P(MS) from the two logits (labels order: MS, NMOSD)."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Window starts covering 0..n with the last window flush with the end."""
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] != max(n - size, 0):
        starts.append(n - size)
    return starts


@torch.no_grad()
def occlusion_map(
    models, volume: np.ndarray, mask_size: int = 16, overlap: float = 0.25, n_batch: int = 16
) -> np.ndarray:
    """Mean over the ensemble of (log-odds of NMOSD intact − log-odds with a patch occluded).

    The log-odds are the logit difference NMOSD − MS: unlike P(NMOSD), it does not saturate, so
    a model that is sure of its answer (P = 1.0 in float32) still gives a map. Cubes of
    ``mask_size`` voxels, on a grid of stride ``mask_size × (1 − overlap)`` covering the volume,
    are each multiplied by 1 − a Gaussian bump (0 at the cube's centre, 0.86 at the middle of its
    faces, σ = size / 4); a voxel's value is the Gaussian-weighted mean of the differences of the
    cubes that cover it, so a region whose occlusion changes nothing scores exactly 0.

    Written here rather than with MONAI's ``OcclusionSensitivity`` (1.6): with its
    sliding-window implementation, cubes that hold no signal still got a different probability
    than the intact input (measured with a model that sums its input: 0.73 instead of 0.88 at a
    far corner), so every map carried an offset over the whole box.
    """
    # computed where the networks are (a model without parameters: on the CPU)
    dev = next(iter(models[0].parameters()), torch.zeros(0)).device
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    shape = x.shape[2:]
    size = [min(mask_size, n) for n in shape]
    grids = [
        _starts(n, k, max(1, int(round(k * (1 - overlap)))))
        for n, k in zip(shape, size, strict=True)
    ]
    axes = [torch.arange(k, dtype=torch.float32) - (k - 1) / 2 for k in size]
    bump = torch.ones(size)
    for i, (ax, k) in enumerate(zip(axes, size, strict=True)):
        view = [1, 1, 1]
        view[i] = k
        bump = bump * torch.exp(-(ax**2) / (2 * (k / 4) ** 2)).view(view)
    bump = bump / bump.max()
    keep = 1.0 - bump  # multiplier of the occluded cube: 0 at its centre
    cubes = [
        tuple(slice(o, o + k) for o, k in zip(corner, size, strict=True))
        for corner in itertools.product(*grids)
    ]
    weight = torch.zeros(shape)
    for sl in cubes:
        weight[sl] += bump
    # a cube holding only zeros is unchanged by occlusion: it scores exactly 0 without a forward
    # pass (most cubes of a lesion-mask input)
    active = [sl for sl in cubes if x[(0, 0, *sl)].any()]
    x, keep, bump = x.to(dev), keep.to(dev), bump.to(dev)
    maps = []
    for model in models:
        model.eval()
        base = _log_odds(model(x))[0]
        total = torch.zeros(shape, device=dev)
        for first in range(0, len(active), n_batch):
            batch = active[first : first + n_batch]
            im = x.repeat(len(batch), 1, 1, 1, 1)
            for b, sl in enumerate(batch):
                im[(b, 0, *sl)] *= keep
            odds = _log_odds(model(im))
            for b, sl in enumerate(batch):
                total[sl] += (base - odds[b]) * bump
        maps.append((total.cpu() / weight).numpy())
    return np.mean(maps, axis=0).astype(np.float32)


def save_saliency(nii: Path, subject, prepared, saliency: np.ndarray) -> tuple[Path, Path]:
    """The map on the input's grid and affine at ``nii`` (the caller names it, inside its
    output folder), and a PNG montage beside it (same name, ``.png``)."""
    data, affine = to_native(saliency, prepared.record)
    with atomic_path(nii, suffix=".nii.gz") as tmp:
        img = nib.Nifti1Image(data.astype(np.float32), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(tmp))
    png = montage_path(nii)
    _montage(png, subject, prepared, data, affine)
    return nii, png


def _montage(path: Path, subject, prepared, sal_native: np.ndarray, affine: np.ndarray) -> None:
    """Axial slices (canonical RAS) of the FLAIR (or the lesion mask) with the map and the
    lesion outline."""
    base_path = subject.flair or subject.lesion_mask
    base_c, _ = to_canonical(nifti.load(base_path).data, affine)
    sal_c, _ = to_canonical(sal_native, affine)
    lesion_c = None
    if subject.lesion_mask is not None:
        lesion_c = to_canonical(nifti.load(subject.lesion_mask).data, affine)[0] > 0
    elif prepared.segmentation_bits is not None:  # a FLAIR alone: the WMH mask made for it
        lesion_c = to_canonical(prepared.segmentation, affine)[0] > 0
    rec = prepared.record
    zs = np.linspace(rec.box_lo[2], rec.box_hi[2] - 1, 14)[1:-1].round().astype(int)
    title = f"{subject.key}: occlusion saliency (red → NMOSD, blue → MS), lesion outline in yellow"
    axial_montage(path, base_c, zs, title, overlay=sal_c, outline=lesion_c)


__all__ = ["occlusion_map", "save_saliency"]
