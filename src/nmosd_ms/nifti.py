"""Reading NIfTI images with the checks a cohort needs before any work starts."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import NmosdError
from .io import atomic_path, available_memory_bytes, regular_file

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


#: The largest image read, in voxels: 2^28 (1 GiB as float32) is over five times a native
#: 0.8 x 0.47 x 0.47 mm 3D FLAIR (192 x 512 x 512); a header asking for more is refused before
#: any data are read, and so is one larger than a quarter of the memory available now.
MAX_VOXELS = 2**28


def _check_header(img, path: Path, what: str) -> tuple[int, ...]:
    """Shape checks from the header alone (nothing decompressed yet)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NmosdError(f"{what} {path} is {len(shape)}D with shape {shape}; a 3D image is needed")
    if min(shape) < 2:
        raise NmosdError(f"{what} {path} has a degenerate shape {shape}")
    n = int(np.prod(shape, dtype=np.int64))
    if n > MAX_VOXELS:
        raise NmosdError(
            f"{what} {path}: its header claims {shape} = {n:,} voxels, more than the "
            f"{MAX_VOXELS:,} accepted (a corrupt header?)"
        )
    avail = available_memory_bytes()
    if avail is not None and n * 8 > avail // 4:
        raise NmosdError(
            f"{what} {path}: {shape} needs {n * 8 / 2**30:.1f} GiB to process, more than a quarter "
            f"of the {avail / 2**30:.1f} GiB of memory available"
        )
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise NmosdError(f"{what} {path} has voxels of type {dtype}; a numeric image is needed")
    return shape


@contextlib.contextmanager
def _quiet_nibabel():
    """nibabel logs header repairs ("pixdim[1,2,3] should be non-zero; setting 0 dims to 1") and,
    at ERROR level, the header faults it then raises for ("vox offset 0 too low", "data code 7
    not recognized") to stderr; the checks here report what matters as the one error line
    instead, so nothing below CRITICAL gets through while a file is read."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load(path: str | Path, what: str = "image", dtype=np.float32) -> Image:
    """Load a 3D NIfTI (a 4D image with a single volume is squeezed); refuse anything unusable.

    The header is checked (dimensions, size against :data:`MAX_VOXELS` and the memory available,
    voxel type) before any voxel is read, so a corrupt or hostile header costs nothing.
    """
    path = regular_file(path, what)
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
            if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
                raise NmosdError(f"{what} {path} is not a NIfTI image ({type(img).__name__})")
            shape = _check_header(img, path, what)
            data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except NmosdError:
        raise
    except MemoryError:
        raise NmosdError(f"{what} {path}: not enough memory to read it") from None
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a damaged file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NmosdError(f"cannot read {what} {path}: {detail}") from None
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
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
