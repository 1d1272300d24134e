"""Saliency maps: MONAI occlusion sensitivity, mapped back onto the patient's original grid.

Occlusion works on the input volume itself, so the map is a genuine 3D map for every model
family (Grad-CAM on the two-view model would give a 2D map smeared along the compressed axes).
The value at a voxel is P(NMOSD) of the intact input minus P(NMOSD) with a Gaussian-weighted
patch around it removed: positive = the region pushes towards NMOSD, negative = towards MS.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.visualize import OcclusionSensitivity  # noqa: E402

from .data import nifti  # noqa: E402
from .data.spatial import to_canonical, to_native  # noqa: E402
from .io import atomic_path  # noqa: E402


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
    base = nifti.load(base_path).data
    base_c, _ = to_canonical(base, affine)
    sal_c, _ = to_canonical(sal_native, affine)
    lesion_c = None
    if subject.lesion_mask is not None:
        lesion_c = to_canonical(nifti.load(subject.lesion_mask).data, affine)[0] > 0
    elif prepared.segmentation_bits is not None:  # a FLAIR alone: the WMH mask made for it
        lesion_c = to_canonical(prepared.segmentation, affine)[0] > 0
    rec = prepared.record
    zs = np.linspace(rec.box_lo[2], rec.box_hi[2] - 1, 14)[1:-1].round().astype(int)
    lim = float(np.abs(sal_c).max()) or 1.0
    fig, axes = plt.subplots(2, 6, figsize=(15, 5.6))
    for ax, z in zip(axes.ravel(), zs, strict=True):
        ax.imshow(base_c[:, :, z].T, origin="lower", cmap="gray")
        ax.imshow(
            np.ma.masked_where(np.abs(sal_c[:, :, z]) < 0.05 * lim, sal_c[:, :, z]).T,
            origin="lower",
            cmap="coolwarm",
            vmin=-lim,
            vmax=lim,
            alpha=0.6,
        )
        if lesion_c is not None and lesion_c[:, :, z].any():
            ax.contour(
                lesion_c[:, :, z].T.astype(float),
                levels=[0.5],
                colors="yellow",
                linewidths=0.6,
                origin="lower",
            )
        ax.set_title(f"z = {z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(
        f"{subject.participant_id}: occlusion saliency (red → NMOSD, blue → MS), "
        "lesion outline in yellow; axial slices, neurological view (patient's right on the right)",
        fontsize=10,
    )
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)


__all__ = ["occlusion_map", "save_saliency"]
