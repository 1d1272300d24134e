"""Spatial steps of preprocessing and their inverse: canonical orientation, crop box, resize.

A :class:`SpatialRecord` holds everything needed to send a map computed on the S³ model grid back
onto the subject's original voxel grid and affine (:func:`to_native`), e.g. a saliency map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio
from scipy import ndimage
from skimage.filters import threshold_otsu

RAS = nio.axcodes2ornt("RAS")


@dataclass(frozen=True)
class SpatialRecord:
    """Source grid, canonical orientation and crop box (canonical voxels, half-open)."""

    source_shape: tuple[int, int, int]
    source_affine: tuple[tuple[float, ...], ...]
    box_lo: tuple[int, int, int]
    box_hi: tuple[int, int, int]
    size: tuple[int, int, int]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SpatialRecord:
        return cls(
            source_shape=tuple(d["source_shape"]),
            source_affine=tuple(tuple(r) for r in d["source_affine"]),
            box_lo=tuple(d["box_lo"]),
            box_hi=tuple(d["box_hi"]),
            size=tuple(d["size"]),
        )

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.source_affine, dtype=np.float64)

    @property
    def to_canonical(self) -> np.ndarray:
        return nio.ornt_transform(nio.io_orientation(self.affine), RAS)

    def source_box(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """The crop box expressed in source voxel indices (half-open), for index.tsv."""
        # inv_ornt_aff maps canonical voxel indices to source voxel indices.
        m = nio.inv_ornt_aff(self.to_canonical, self.source_shape)
        corners = np.array([[*self.box_lo, 1.0], [*(np.array(self.box_hi) - 1), 1.0]]).T
        src = (m @ corners)[:3].round().astype(int)
        lo, hi = src.min(axis=1), src.max(axis=1) + 1
        return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def canonical_shape(shape, transform) -> tuple[int, int, int]:
    return tuple(int(shape[int(ax)]) for ax in transform[:, 0].argsort())


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient to RAS+ by axis permutation and flips only (no resampling)."""
    transform = nio.ornt_transform(nio.io_orientation(affine), RAS)
    out = nio.apply_orientation(data, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, data.shape)
    return out, new_affine


def from_canonical(data: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical` for the data array."""
    back = nio.ornt_transform(RAS, nio.io_orientation(source_affine))
    return nio.apply_orientation(data, back)


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Half-open bounding box of the non-zero voxels, or None for an empty mask."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        if nz.size == 0:
            return None
        lo.append(int(nz[0]))
        hi.append(int(nz[-1]) + 1)
    return tuple(lo), tuple(hi)


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold computed on values scaled to [0, 1] in float64: the threshold is
    scale-free, and scanner values near float32's range (seen: 1e32) overflow its sums."""
    scale = float(np.abs(values).max()) or 1.0
    return float(threshold_otsu(np.asarray(values, np.float64) / scale)) * scale


def head_mask(flair: np.ndarray, max_voxels: int = 2_000_000) -> tuple[np.ndarray, int]:
    """Foreground of a FLAIR: Otsu threshold, then the largest connected component.

    Works on a strided copy with at most ``max_voxels`` voxels (the box only needs the extent);
    returns the strided mask and the stride so that callers can scale the box back.
    """
    stride = max(1, int(np.ceil((flair.size / max_voxels) ** (1 / 3))))
    small = flair[::stride, ::stride, ::stride]
    values = small[small > 0] if (small > 0).any() else small.ravel()
    if values.size < 2 or values.min() == values.max():
        return np.ones_like(small, dtype=bool), stride
    sample = values if values.size < 4_000_000 else values[:: values.size // 4_000_000]
    fg = small > otsu_threshold(sample)
    fg = ndimage.binary_opening(fg, iterations=1) if fg.sum() > 1000 else fg
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == sizes.argmax()
    return fg, stride


def crop_box(
    foreground: np.ndarray, stride: int, shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box of a (possibly strided) foreground mask on the full grid; whole image if empty."""
    box = bounding_box(foreground)
    if box is None:
        return (0, 0, 0), tuple(shape)
    lo = tuple(max(0, v * stride - (stride - 1)) for v in box[0])
    hi = tuple(min(s, v * stride + (stride - 1)) for v, s in zip(box[1], shape, strict=True))
    return lo, hi


def resize(
    volume: np.ndarray | torch.Tensor, size, interpolation: str = "antialiased"
) -> np.ndarray:
    """Resize a 3D volume to ``size`` with torch (7 ms vs 79 ms for scipy.ndimage.zoom at 100³).

    ``antialiased``: axes that shrink are first box-averaged (``area`` mode = adaptive average
    pooling) so small structures keep their mass; then trilinear for axes that grow. MONAI's
    ``Resize(anti_aliasing=True)`` does a Gaussian pre-filter instead, which spreads small
    lesions; area averaging conserves lesion volume, which the tests check.
    """
    size = tuple(int(s) for s in (size if np.ndim(size) else (size,) * 3))
    t = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)[None, None]
    if tuple(t.shape[2:]) == size:
        return t[0, 0].numpy().copy()
    if interpolation == "antialiased":
        mid = tuple(min(a, b) for a, b in zip(t.shape[2:], size, strict=True))
        if mid != tuple(t.shape[2:]):
            t = F.adaptive_avg_pool3d(t, mid)
    if tuple(t.shape[2:]) != size:
        t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    return t[0, 0].numpy().copy()


def to_native(volume: np.ndarray, record: SpatialRecord) -> tuple[np.ndarray, np.ndarray]:
    """Map an S³ model-grid volume back onto the subject's original grid; returns (data, affine).

    Undoes the resize (trilinear, onto the crop box), pads the box into the canonical volume with
    zeros, and undoes the reorientation, so the result has exactly the source shape and affine.
    """
    transform = record.to_canonical
    cshape = canonical_shape(record.source_shape, transform)
    box_shape = tuple(h - lo for lo, h in zip(record.box_lo, record.box_hi, strict=True))
    inner = resize(volume, box_shape, interpolation="trilinear")
    canon = np.zeros(cshape, dtype=np.float32)
    sl = tuple(slice(lo, h) for lo, h in zip(record.box_lo, record.box_hi, strict=True))
    canon[sl] = inner
    native = from_canonical(canon, record.affine)
    assert native.shape == tuple(record.source_shape)
    return np.ascontiguousarray(native), record.affine
