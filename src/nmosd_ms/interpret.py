"""Saliency maps: MONAI occlusion sensitivity, mapped back onto the patient's original grid.

Occlusion works on the input volume itself, so the map is a genuine 3D map for every model
family (Grad-CAM on the two-view model would give a 2D map smeared along the compressed axes).
The value at a voxel is P(NMOSD) of the intact input minus P(NMOSD) with a Gaussian-weighted
patch around it removed: positive = the region pushes towards NMOSD, negative = towards MS.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.visualize import OcclusionSensitivity

from .data import nifti
from .data.spatial import to_canonical, to_native
from .io import atomic_path
from .viz import axial_montage


@torch.no_grad()
def occlusion_map(
    models, volume: np.ndarray, mask_size: int = 16, overlap: float = 0.25, n_batch: int = 16
) -> np.ndarray:
    """Mean over the ensemble of (P(NMOSD) intact − P(NMOSD) occluded), shape of ``volume``."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    maps = []
    for model in models:
        model.eval()
        base = float(torch.softmax(model(x), 1)[0, 1])
        occ = OcclusionSensitivity(
            model,
            mask_size=mask_size,
            n_batch=n_batch,
            verbose=False,
            mode="gaussian",
            overlap=overlap,
        )
        occ_map, _ = occ(x)
        maps.append(base - occ_map[0, 1].float().numpy())
    return np.mean(maps, axis=0).astype(np.float32)


def save_saliency(out_dir: Path, subject, prepared, saliency: np.ndarray) -> tuple[Path, Path]:
    """``<id>_saliency.nii.gz`` on the input's grid and affine, and a PNG montage."""
    pid = subject.participant_id
    data, affine = to_native(saliency, prepared.record)
    nii = out_dir / f"{pid}_saliency.nii.gz"
    with atomic_path(nii, suffix=".nii.gz") as tmp:
        img = nib.Nifti1Image(data.astype(np.float32), affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(tmp))
    png = out_dir / f"{pid}_saliency.png"
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
    title = (
        f"{subject.participant_id}: occlusion saliency (red → NMOSD, blue → MS), "
        "lesion outline in yellow"
    )
    axial_montage(path, base_c, zs, title, overlay=sal_c, outline=lesion_c)


__all__ = ["occlusion_map", "save_saliency"]
