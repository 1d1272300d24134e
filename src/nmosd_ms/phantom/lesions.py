"""Lesion-pattern samplers for MS-like and AQP4-NMOSD-like subjects (MNI space).

Numbers come from ``phantom_priors.md`` (tags there say how sure each is):

MS: lesion volume lognormal (median set by the difficulty, 0.3-50 ml); ovoid lesions 3-15 mm,
axis ratio 1.5-3; periventricular lesions with their long axis along the ventricle-distance
gradient (perpendicular to the ventricle: Dawson fingers); also juxtacortical, deep, infratentorial,
callosal-undersurface and inferior-temporal lesions.

NMOSD: ~37 % no brain lesion; most others few (<=12) punctate (<5 mm) subcortical/deep dots;
a minority with typical lesions (periependymal 3rd ventricle/aqueduct, 4th ventricle/area
postrema, hypothalamus/thalamus, long full-thickness callosal, long corticospinal-tract, large
confluent hemispheric, pencil-thin periependymal lateral-ventricle bands); some MS-like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import CC_PATH, CST_PATH_RIGHT, Anatomy, mirror, sample_path


@dataclass(frozen=True)
class Difficulty:
    """Mixture weights of the phenotypes; overlap grows from easy to hard."""

    nmosd: dict[str, float]
    ms: dict[str, float]
    ms_median_ml: float
    mslike_median_ml: float


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(
        nmosd={"none": 0.37, "dots": 0.28, "typical": 0.30, "ms-like": 0.05},
        ms={"ms-typical": 1.0, "ms-low-load": 0.0},
        ms_median_ml=7.0,
        mslike_median_ml=2.0,
    ),
    "paper": Difficulty(
        nmosd={"none": 0.37, "dots": 0.28, "typical": 0.17, "ms-like": 0.18},
        ms={"ms-typical": 0.78, "ms-low-load": 0.22},
        ms_median_ml=5.0,
        mslike_median_ml=1.5,
    ),
    "hard": Difficulty(
        nmosd={"none": 0.35, "dots": 0.30, "typical": 0.10, "ms-like": 0.25},
        ms={"ms-typical": 0.62, "ms-low-load": 0.38},
        ms_median_ml=3.0,
        mslike_median_ml=1.5,
    ),
}

MS_REGIONS = {  # share of lesions per region (Duan 2021 frequencies, LPM peaks periventricular)
    "periventricular": 0.40,
    "deep": 0.22,
    "juxtacortical": 0.16,
    "infratentorial": 0.08,
    "callosal": 0.08,
    "inferior_temporal": 0.06,
}
DOT_REGIONS = {"deep": 0.5, "juxtacortical": 0.3, "periventricular": 0.2}
TYPICAL_NMOSD = {
    "periependymal_3v": 0.17,
    "periependymal_4v": 0.17,
    "diencephalon": 0.16,
    "long_callosal": 0.12,
    "long_cst": 0.12,
    "confluent": 0.14,
    "periependymal_lv": 0.12,
}


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _orthonormal(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    d = d / max(np.linalg.norm(d), 1e-9)
    a = rng.normal(size=3)
    a -= a @ d * d
    a /= max(np.linalg.norm(a), 1e-9)
    return np.stack([d, a, np.cross(d, a)])


def paint_ellipsoid(
    mask: np.ndarray, anat: Anatomy, centre_mm, semi_axes_mm, direction, rng, roughness=0.0
) -> None:
    """Set voxels inside an ellipsoid (long axis along ``direction``) in ``mask``."""
    axes = _orthonormal(np.asarray(direction, float), rng)
    r = float(max(semi_axes_mm)) * (1 + roughness) + 1
    c_vox = anat.to_vox(centre_mm)[0]
    half = np.ceil(r / anat.zooms).astype(int)
    lo = np.maximum(np.floor(c_vox).astype(int) - half, 0)
    hi = np.minimum(np.floor(c_vox).astype(int) + half + 2, anat.shape)
    if np.any(hi <= lo):
        return
    idx = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    )
    p = (idx - c_vox) * anat.zooms  # axis-aligned affine: voxel offset x zoom = mm offset
    q = p @ axes.T / np.asarray(semi_axes_mm, float)
    rad = (q**2).sum(-1)
    if roughness > 0:
        noise = ndimage.gaussian_filter(rng.normal(size=rad.shape), 1.5)
        rad = rad * (1 + roughness * noise / max(noise.std(), 1e-6))
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= rad <= 1.0


def paint_tube(mask, anat, path_mm, radius_mm, rng, start=0.0, stop=1.0) -> None:
    pts = sample_path(path_mm, step=1.0)
    a, b = int(len(pts) * start), max(int(len(pts) * stop), int(len(pts) * start) + 1)
    for p in pts[a:b]:
        r = radius_mm * rng.uniform(0.8, 1.2)
        paint_ellipsoid(mask, anat, p, (r, r, r), (1, 0, 0), rng)


def _random_point(anat: Anatomy, region: str, rng) -> tuple[np.ndarray, np.ndarray]:
    flat = anat.regions[region]
    v = np.array(np.unravel_index(flat[rng.integers(flat.size)], anat.shape))
    return anat.to_mm(v + rng.uniform(-0.5, 0.5, 3))[0], v


def _ms_lesion(mask, anat, region, rng, scale=1.0) -> None:
    centre, v = _random_point(anat, region, rng)
    diameter = float(np.clip(rng.lognormal(np.log(6.0 * scale), 0.45), 3.0, 15.0))
    ratio = rng.uniform(1.5, 3.0)
    long_axis = diameter / 2
    short = long_axis / ratio
    if region in ("periventricular", "callosal"):
        direction = anat.grad_lat[:, v[0], v[1], v[2]]  # Dawson finger: perpendicular to the LV
    else:
        direction = rng.normal(size=3)
    paint_ellipsoid(
        mask, anat, centre, (long_axis, short, short * rng.uniform(0.8, 1.2)), direction, rng
    )


def _finish(mask: np.ndarray, anat: Anatomy) -> np.ndarray:
    return mask & anat.brain & ~anat.lat_vent


def sample_ms(anat: Anatomy, rng, median_ml: float, low_load: bool = False) -> np.ndarray:
    mask = np.zeros(anat.shape, dtype=bool)
    voxel_ml = float(np.prod(anat.zooms)) / 1000
    if low_load:  # few small lesions, no Dawson fingers: the MS that looks like NMOSD
        for _ in range(int(rng.integers(1, 7))):
            _ms_lesion(
                mask,
                anat,
                _choice(rng, {"deep": 0.5, "juxtacortical": 0.3, "periventricular": 0.2}),
                rng,
                scale=0.6,
            )
        return _finish(mask, anat)
    target = float(np.clip(rng.lognormal(np.log(median_ml), 0.9), 0.3, 50.0))
    allowed = anat.brain & ~anat.lat_vent
    for i in range(150):
        _ms_lesion(mask, anat, _choice(rng, MS_REGIONS), rng)
        if i % 4 == 3 and (mask & allowed).sum() * voxel_ml >= target:
            break
    return _finish(mask, anat)


def _dots(mask, anat, rng, n) -> None:
    for _ in range(n):
        centre, _ = _random_point(anat, _choice(rng, DOT_REGIONS), rng)
        r = rng.uniform(1.5, 2.5)  # diameter 3-5 mm (punctate; >= 3 mm counts as a lesion)
        paint_ellipsoid(
            mask, anat, centre, (r, r, r * rng.uniform(0.7, 1.0)), rng.normal(size=3), rng
        )


def _typical(mask, anat, kind, rng) -> None:
    side = 1 if rng.random() < 0.5 else -1
    if kind in ("periependymal_3v", "periependymal_4v", "diencephalon", "periependymal_lv"):
        flat = anat.regions[kind]
        centre, _ = _random_point(anat, kind, rng)
        grow = rng.uniform(4.0, 9.0) if kind != "periependymal_lv" else rng.uniform(8, 16)
        region = np.zeros(anat.shape, dtype=bool)
        region.flat[flat] = True
        blob = np.zeros(anat.shape, dtype=bool)
        axes = (grow, grow * 0.6, grow * 0.6)
        paint_ellipsoid(blob, anat, centre, axes, rng.normal(size=3), rng, roughness=0.2)
        mask |= blob & region  # lesion hugs the ependyma: only the periependymal band
    elif kind == "long_callosal":
        start = rng.uniform(0.0, 0.4)
        paint_tube(
            mask, anat, CC_PATH, rng.uniform(3.5, 5.5), rng, start, start + rng.uniform(0.5, 0.6)
        )
    elif kind == "long_cst":
        path = CST_PATH_RIGHT if side > 0 else mirror(CST_PATH_RIGHT)
        start = rng.uniform(0.15, 0.35)
        paint_tube(
            mask, anat, path, rng.uniform(2.5, 4.0), rng, start, start + rng.uniform(0.3, 0.5)
        )
    elif kind == "confluent":
        centre, _ = _random_point(anat, "deep", rng)
        a = rng.uniform(12.0, 20.0)
        paint_ellipsoid(
            mask,
            anat,
            centre,
            (a, a * rng.uniform(0.5, 0.8), a * 0.6),
            rng.normal(size=3),
            rng,
            roughness=0.35,
        )
    else:  # pragma: no cover
        raise ValueError(kind)


def sample_nmosd(anat: Anatomy, rng, phenotype: str, mslike_median_ml: float) -> np.ndarray:
    mask = np.zeros(anat.shape, dtype=bool)
    if phenotype == "none":
        return mask
    if phenotype == "dots":
        _dots(mask, anat, rng, int(rng.integers(1, 13)))
    elif phenotype == "typical":
        for _ in range(1 + int(rng.random() < 0.3)):
            _typical(mask, anat, _choice(rng, TYPICAL_NMOSD), rng)
        _dots(mask, anat, rng, int(rng.integers(0, 6)))
    elif phenotype == "ms-like":
        return sample_ms(anat, rng, mslike_median_ml)
    else:  # pragma: no cover
        raise ValueError(phenotype)
    return _finish(mask, anat)


def sample_phenotype(rng, diagnosis: str, difficulty: str) -> str:
    d = DIFFICULTIES[difficulty]
    return _choice(rng, d.nmosd if diagnosis == "NMOSD" else d.ms)


def sample_lesion_map(
    anat: Anatomy,
    rng: np.random.Generator,
    diagnosis: str,
    difficulty: str = "paper",
    phenotype: str | None = None,
) -> tuple[np.ndarray, str]:
    """One subject's binary lesion map in template space and its phenotype name."""
    d = DIFFICULTIES[difficulty]
    phenotype = phenotype or sample_phenotype(rng, diagnosis, difficulty)
    if diagnosis == "MS":
        return sample_ms(anat, rng, d.ms_median_ml, low_load=phenotype == "ms-low-load"), phenotype
    return sample_nmosd(anat, rng, phenotype, d.mslike_median_ml), phenotype
