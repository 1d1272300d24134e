"""Axial montages for review: a FLAIR (or mask) with an optional signed overlay and an outline.

Used by ``predict --saliency`` (saliency over the FLAIR, lesion outline) and for WMH
segmentations (``segment --qc``, ``prepare --segment-missing``, ``predict`` with a FLAIR alone). Images are canonical RAS arrays; slices are shown in the
neurological view (the patient's right on the right).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .io import write_bytes


def axial_montage(path: Path, *args, **kwargs) -> None:
    """:func:`montage_png` written atomically to ``path``."""
    write_bytes(path, montage_png(*args, **kwargs))


def montage_png(
    base: np.ndarray,
    zs,
    title: str,
    overlay: np.ndarray | None = None,
    outline: np.ndarray | None = None,
    outline_color: str = "yellow",
) -> bytes:
    """PNG of twelve (or fewer) axial slices ``zs`` of ``base``; ``overlay`` is drawn in
    coolwarm, symmetric about 0, hiding values under 20 % of its largest magnitude. Uses a bare
    matplotlib ``Figure`` (no pyplot state), so threads may draw at the same time."""
    zs = list(zs)[:12]
    lim = 1.0
    if overlay is not None:
        lim = float(np.abs(overlay).max()) or 1.0
    # one grey scale for every slice: 0 (or the minimum) to the 99.5th percentile of the image
    vmin = min(float(base.min()), 0.0)
    vmax = float(np.percentile(base[base > 0], 99.5)) if (base > 0).any() else None
    fig = Figure(figsize=(15, 5.6))
    axes = fig.subplots(2, 6)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), zs, strict=False):
        ax.imshow(base[:, :, z].T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax)
        if overlay is not None:
            ax.imshow(
                np.ma.masked_where(np.abs(overlay[:, :, z]) < 0.2 * lim, overlay[:, :, z]).T,
                origin="lower",
                cmap="coolwarm",
                vmin=-lim,
                vmax=lim,
                alpha=0.6,
            )
        if outline is not None and outline[:, :, z].any():
            ax.contour(
                outline[:, :, z].T.astype(float),
                levels=[0.5],
                colors=outline_color,
                linewidths=0.6,
                origin="lower",
            )
        ax.set_title(f"z = {z}", fontsize=8)
    fig.suptitle(
        title + "; axial slices, neurological view (patient's right on the right)", fontsize=10
    )
    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, bbox_inches="tight", format="png")
    return buf.getvalue()


def wmh_montage_png(name: str, flair_c: np.ndarray, mask_c: np.ndarray, voxel_ml: float) -> bytes:
    """The review montage of a WMH segmentation: the slices holding lesions, outlined in red."""
    title = f"{name}: WMH segmentation by nmosd-ms (red outline), {mask_c.sum() * voxel_ml:.2f} ml"
    zs = lesion_slices(mask_c, flair_c > 0)
    return montage_png(flair_c, zs, title, outline=mask_c, outline_color="red")


def lesion_slices(mask: np.ndarray, extent: np.ndarray, n: int = 12) -> list[int]:
    """``n`` axial slices: every slice holding ``mask`` voxels (the fullest ``n`` if there are
    more), topped up with slices spread evenly over ``extent`` (e.g. the brain)."""
    per_slice = mask.sum(axis=(0, 1))
    with_mask = np.flatnonzero(per_slice)
    if with_mask.size >= n:
        return sorted(int(z) for z in with_mask[np.argsort(-per_slice[with_mask])[:n]])
    zs = np.flatnonzero(extent.any(axis=(0, 1)))
    lo, hi = (zs[0], zs[-1]) if zs.size else (0, mask.shape[2] - 1)
    spread = np.linspace(lo, hi, n + 2)[1:-1].round().astype(int)
    chosen = list(dict.fromkeys([*with_mask.tolist(), *spread.tolist()]))[:n]
    return sorted(int(z) for z in chosen)
