"""Reading NIfTI images with the checks a cohort needs before any work starts."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import NmosdError

#: Rotation/zoom entries of two affines may differ by this much (relative) ...
AFFINE_TOLERANCE = 1e-3
#: ... and their origins by this fraction of a voxel. Half a voxel is allowed because exporters
#: disagree on voxel-centre vs voxel-corner origins (the public Lesjak 2017 brain masks sit
#: exactly half a voxel from their lesion masks); a real misregistration is larger.
ORIGIN_TOLERANCE_VOXELS = 0.51


@dataclass(frozen=True)
class Image:
    """A validated 3D image: data as stored on disk plus its affine, and the source path."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.zooms)) / 1000.0


def load(path: str | Path, what: str = "image", dtype=np.float32) -> Image:
    """Load a 3D NIfTI (a 4D image with a single volume is squeezed); refuse anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise NmosdError(f"{what} not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise NmosdError(f"cannot read {what} {path}: {exc}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise NmosdError(
            f"{what} {path} is {data.ndim}D with shape {data.shape}; a 3D image is needed"
        )
    if min(data.shape) < 2:
        raise NmosdError(f"{what} {path} has a degenerate shape {data.shape}")
    if not np.isfinite(data).all():
        raise NmosdError(f"{what} {path} contains NaN or Inf values")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise NmosdError(f"{what} {path} has an invalid affine")
    return Image(data=data, affine=affine, path=path)


def check_same_grid(ref: Image, other: Image, ref_what: str, other_what: str) -> None:
    """Refuse two images whose voxel grids (shape and affine) do not coincide."""
    if ref.shape != other.shape:
        raise NmosdError(
            f"{other_what} {other.path} has shape {other.shape} but {ref_what} {ref.path} has "
            f"{ref.shape}: they must be on the same grid"
        )
    tol = AFFINE_TOLERANCE * max(1.0, float(np.abs(ref.affine[:3, :3]).max()))
    linear_ok = np.allclose(ref.affine[:3, :3], other.affine[:3, :3], atol=tol)
    shift_vox = np.linalg.solve(ref.affine[:3, :3], other.affine[:3, 3] - ref.affine[:3, 3])
    if not linear_ok or np.abs(shift_vox).max() > ORIGIN_TOLERANCE_VOXELS:
        raise NmosdError(
            f"{other_what} {other.path} and {ref_what} {ref.path} have different affines "
            "(not on the same grid)"
        )


def save(path: str | Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI atomically."""
    from ..io import atomic_path

    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
