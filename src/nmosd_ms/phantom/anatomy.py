"""Anatomical masks on the MNI152 (2009c symmetric) template shipped with nilearn.

Regions are built from the template's tissue maps plus structure centres in MNI millimetres
(``../shared/reference/phantom_priors.md`` §4, approximate, ±5–10 mm): the ventricles are the CSF
components containing documented seed points; periventricular, juxtacortical and deep white
matter come from distance maps to ventricles and grey matter; brainstem, cerebellar, thalamic
and hypothalamic regions are tissue voxels near documented centres; the corpus callosum and the
corticospinal tract are tubes along documented paths.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# MNI coordinates (mm, RAS) from phantom_priors.md §4.
LV_BODY = [(16, -8, 22), (-16, -8, 22)]
LV_TRIGONE = [(27, -40, 14), (-27, -40, 14)]
THIRD_VENTRICLE_PATH = [(0, 2, -12), (0, -10, 0), (0, -26, 10)]
AQUEDUCT_PATH = [(0, -26, -4), (0, -32, -10), (0, -38, -18)]
FOURTH_VENTRICLE = (0, -44, -30)
AREA_POSTREMA = (0, -44, -47)
HYPOTHALAMUS = [(5, -4, -10), (-5, -4, -10)]
THALAMUS = [(11, -18, 7), (-11, -18, 7)]
PONS = (0, -26, -32)
MEDULLA = (0, -40, -47)
MIDDLE_CEREBELLAR_PEDUNCLE = [(18, -42, -34), (-18, -42, -34)]
CEREBELLAR_WM = [(25, -58, -32), (-25, -58, -32)]
TEMPORAL_HORN_WM = [(38, -24, -16), (-38, -24, -16)]
CC_PATH = [(0, 25, 8), (0, 14, 20), (0, -6, 24), (0, -24, 22), (0, -38, 12)]
CST_PATH_RIGHT = [
    (38, -20, 58),
    (26, -18, 35),
    (22, -14, 8),
    (14, -20, -12),
    (8, -22, -30),
]


#: Length scale (mm) of the fall of MS lesion frequency with distance from the lateral
#: ventricles, fitted to the 20 real patients' lesion-probability map (shared/data) ...
DECAY_MM = 10.0
#: ... and the height (centre, SD in mm) where it is largest: the centrum semiovale. Fitted to
#: that map (smoothed 4 mm): this density alone correlates with it at r = 0.78.
DENSITY_Z_MM = (30.0, 25.0)


def mirror(path):
    return [(-x, y, z) for x, y, z in path]


@dataclass
class Anatomy:
    affine: np.ndarray
    shape: tuple[int, int, int]
    zooms: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool
    lat_vent: np.ndarray  # bool
    dist_lat: np.ndarray  # mm to the lateral ventricles
    grad_lat: np.ndarray  # (3, X, Y, Z) unit gradient of dist_lat (away from the ventricles)
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> flat voxel indices

    def to_vox(self, mm) -> np.ndarray:
        mm = np.atleast_2d(np.asarray(mm, dtype=float))
        inv = np.linalg.inv(self.affine)
        return (inv[:3, :3] @ mm.T).T + inv[:3, 3]

    def to_mm(self, vox) -> np.ndarray:
        vox = np.atleast_2d(np.asarray(vox, dtype=float))
        return (self.affine[:3, :3] @ vox.T).T + self.affine[:3, 3]

    def mm_grid(self) -> np.ndarray:
        idx = np.indices(self.shape, dtype=np.float32).reshape(3, -1).T
        return self.to_mm(idx).reshape(*self.shape, 3).astype(np.float32)

    def region_mask(self, name: str) -> np.ndarray:
        m = np.zeros(self.shape, dtype=bool)
        m.flat[self.regions[name]] = True
        return m

    def periventricular_density(self, decay_mm: float = DECAY_MM) -> tuple[np.ndarray, np.ndarray]:
        """Supratentorial white matter outside the ventricles, weighted by
        exp(-distance to the lateral ventricles / ``decay_mm``) and a broad preference for the
        centrum semiovale (z = 30 ± 25 mm): the shape of real MS lesion-probability maps (the 20 real patients of shared/data: mean lesion frequency
        0.086 within 2 mm of the ventricles, 0.053 at 5-10 mm, 0.029 at 10-15, 0.013 at
        15-20, 0.006 at 20-30). Returns (flat voxel indices, cumulative probabilities)."""
        cache = self.__dict__.setdefault("_density_cache", {})
        if decay_mm not in cache:
            flat = self.regions["supratentorial_wm"]
            z = self.to_mm(np.array(np.unravel_index(flat, self.shape)).T)[:, 2]
            w = np.exp(
                -self.dist_lat.ravel()[flat] / decay_mm
                - 0.5 * ((z - DENSITY_Z_MM[0]) / DENSITY_Z_MM[1]) ** 2
            )
            cache[decay_mm] = (flat, np.cumsum(w) / w.sum())
        return cache[decay_mm]

    def region_bool(self, name: str) -> np.ndarray:
        """A region as a boolean volume, built once (``allowed``: brain less lateral ventricles,
        where lesions may lie)."""
        cache = self.__dict__.setdefault("_bool_cache", {})
        if name not in cache:
            cache[name] = (
                self.brain & ~self.lat_vent if name == "allowed" else self.region_mask(name)
            )
        return cache[name]


def _near_points(grid_mm: np.ndarray, points, radius: float) -> np.ndarray:
    out = np.zeros(grid_mm.shape[:3], dtype=bool)
    for p in points:
        out |= ((grid_mm - np.asarray(p, dtype=np.float32)) ** 2).sum(-1) <= radius**2
    return out


def _near_path(grid_mm: np.ndarray, path, radius: float, step: float = 1.0) -> np.ndarray:
    return _near_points(grid_mm, sample_path(path, step), radius)


def sample_path(path, step: float = 1.0) -> np.ndarray:
    """Points every ``step`` mm along a polyline."""
    pts = [np.asarray(path[0], dtype=float)]
    for a, b in zip(path[:-1], path[1:], strict=True):
        a, b = np.asarray(a, float), np.asarray(b, float)
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        pts += [a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:]]
    return np.array(pts)


def _component_at(mask: np.ndarray, seeds_vox: np.ndarray, search: int = 4) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    keep = set()
    for s in np.round(seeds_vox).astype(int):
        lo = np.maximum(s - search, 0)
        hi = np.minimum(s + search + 1, mask.shape)
        window = labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        vals = window[window > 0]
        if vals.size:
            keep.add(int(np.bincount(vals).argmax()))
    return np.isin(labels, list(keep)) if keep else np.zeros_like(mask)


@functools.lru_cache(maxsize=2)
def load_anatomy(resolution: int = 2) -> Anatomy:
    """Build (once per process) the template anatomy at 1 or 2 mm."""
    from nilearn import datasets

    brain_img = datasets.load_mni152_brain_mask(resolution=resolution)
    affine = brain_img.affine.copy()
    brain_p = brain_img.get_fdata().astype(np.float32)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata().astype(np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata().astype(np.float32)
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    brain = brain_p > 0.5
    csf = np.clip(brain_p - gm - wm, 0, 1) * brain
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    shape = brain.shape
    anat = Anatomy(affine, shape, zooms, gm, wm, csf, brain, None, None, None)  # type: ignore
    grid = anat.mm_grid()

    lat = _component_at(csf > 0.5, anat.to_vox(LV_BODY + LV_TRIGONE))
    anat.lat_vent = lat
    anat.dist_lat = ndimage.distance_transform_edt(~lat, sampling=zooms).astype(np.float32)
    g = np.stack(np.gradient(ndimage.gaussian_filter(anat.dist_lat, 1.0), *zooms))
    anat.grad_lat = (g / np.maximum(np.linalg.norm(g, axis=0), 1e-6)).astype(np.float32)
    dist_gm = ndimage.distance_transform_edt(~(gm > 0.5), sampling=zooms).astype(np.float32)

    third = _near_path(grid, THIRD_VENTRICLE_PATH, 4.0) & (csf > 0.25)
    fourth = _near_points(grid, [FOURTH_VENTRICLE], 8.0) & (csf > 0.25)

    def around(mask, lo, hi):
        if not mask.any():
            return np.zeros(shape, dtype=bool)
        d = ndimage.distance_transform_edt(~mask, sampling=zooms)
        return (d > lo) & (d <= hi) & brain

    infratentorial = (
        (
            _near_points(grid, [PONS], 12.0)
            | _near_points(grid, [MEDULLA], 7.0)
            | _near_points(grid, MIDDLE_CEREBELLAR_PEDUNCLE, 8.0)
            | _near_points(grid, CEREBELLAR_WM, 10.0)
        )
        & brain
        & ((wm > 0.3) | (gm < 0.5))
    )
    wm_sup = (wm > 0.3) & brain & ~infratentorial & ~lat
    periventricular = wm_sup & (anat.dist_lat > 0) & (anat.dist_lat <= 5.0)
    juxtacortical = wm_sup & (dist_gm > 0) & (dist_gm <= 2.5) & ~periventricular
    deep = (wm > 0.6) & wm_sup & ~periventricular & ~juxtacortical
    cc = _near_path(grid, CC_PATH, 5.0) & (wm > 0.4) & (np.abs(grid[..., 0]) <= 10)
    callosal_under = cc & (anat.dist_lat <= 3.0) & ~lat
    temporal = _near_points(grid, TEMPORAL_HORN_WM, 10.0) & (wm > 0.3) & brain

    regions = {
        "supratentorial_wm": wm_sup,
        "periventricular": periventricular,
        "juxtacortical": juxtacortical,
        "deep": deep,
        "infratentorial": infratentorial,
        "callosal": callosal_under,
        "inferior_temporal": temporal,
        "periependymal_3v": around(third, 0, 4) | (_near_path(grid, AQUEDUCT_PATH, 4.0) & brain),
        "periependymal_4v": around(fourth, 0, 4) | (_near_points(grid, [AREA_POSTREMA], 5) & brain),
        "diencephalon": (_near_points(grid, HYPOTHALAMUS, 4.0) | _near_points(grid, THALAMUS, 7))
        & brain,
        "periependymal_lv": (anat.dist_lat > 0) & (anat.dist_lat <= 2.0) & brain,
    }
    anat.regions = {k: np.flatnonzero(v) for k, v in regions.items()}
    empty = [k for k, v in anat.regions.items() if v.size == 0]
    if empty:  # pragma: no cover - would mean the template changed
        raise RuntimeError(f"template regions came out empty: {empty}")
    return anat
