"""Lesion patterns of MS-like and AQP4-NMOSD-like subjects, drawn in MNI space and painted on each
subject's own voxel grid.

Two independent knobs set how the classes differ (``phantom_priors.md`` has the sources):

- **load**: how many lesions a subject has and how large they are. Both classes draw counts and
  volumes from one family of distributions (lognormal, fitted to the 20 real MS patients of
  ``shared/data``: lesions of at least 24 mm³, median 31 per patient, lesion volume median
  ~60 mm³ with a heavy tail); ``Difficulty.load_ratio`` and ``size_ratio`` scale NMOSD's medians.
  At 1.0 the two classes' loads are drawn identically.
- **pattern**: where a lesion lies and what shape it has. Each lesion is placed at one of its
  class's *typical* sites with probability ``Difficulty.share_typical``, else at a *shared* site with
  a shared shape (deep and subcortical white matter, periventricular, near-round, any
  orientation). Typical MS: ovoid periventricular lesions with their long axis perpendicular to
  the ventricle (Dawson fingers), juxtacortical, infratentorial, callosal undersurface,
  inferior temporal. Typical NMOSD: thin bands hugging the lateral ventricles, periependymal
  3rd/4th ventricle and area postrema, diencephalon, long full-thickness callosal and long
  corticospinal-tract lesions (motor cortex to pons), large confluent hemispheric lesions, and
  punctate subcortical dots. A lesion's volume is drawn before its site, so the pattern knob
  never changes the load. The site weights are balanced so that the coarse location summaries
  of ``data.features`` (central fraction, asymmetry, extents) differ little between the
  classes: each class has peripheral (MS juxtacortical and temporal, NMOSD subcortical dots),
  deep and low (MS infratentorial, NMOSD 4th ventricle) lesions, and the class signal lies in
  *which* structure and *what shape*, at a finer scale than those summaries.

White-matter lesions (the shared ones and MS's periventricular ovoids) are confined to the
white matter when painted, as real ones are: their centres come from a density around the
ventricles, and unconfined, a lesion beside a ventricle spilled into the caudate or thalamus.
Confined, the phantom MS lesion-frequency map correlates r = 0.76 with the 20 real patients'
(0.73 before; tested).

Every lesion is a continuous shape in MNI millimetres. It is painted directly on the subject's
output grid (after its random rigid motion), volume-preserving: the fraction of each voxel inside
the shape is measured on a 3×3×3 sub-grid, and the ``round(volume / voxel)`` most-covered voxels
(at least one) are set, so the written masks hold the volumes drawn (tested), instead of small
lesions vanishing when a template-space mask is resampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .anatomy import CC_PATH, CST_PATH_RIGHT, DECAY_MM, Anatomy, mirror, sample_path

#: Which version of the lesion generator made a cohort (recorded in its
#: ``dataset_description.json``): the same seed gives other lesions in another revision.
#: 2: lesions of the white matter (shared and MS periventricular) are confined to it, so a
#: centre drawn beside a ventricle no longer paints into the caudate or thalamus, and confluent
#: lesions are a little smaller (below). 1: the generator before that. 3: the `paper` preset
#: puts NMOSD_SPECIFIC_PAPER of NMOSD's lesions at NMOSD's typical sites (0.55 before, as for
#: MS); every other preset, and the MS subjects of `paper`, draw exactly what revision 2 drew.
GENERATOR_REVISION = 3


@dataclass(frozen=True)
class Difficulty:
    """How the classes differ: lesion load (``load_ratio``, ``size_ratio``: NMOSD's median
    lesion count and lesion volume as a fraction of MS's; 1 = drawn identically) and lesion
    pattern (``specific``: the share of MS's lesions at MS's typical sites; ``specific_nmosd``:
    the same for NMOSD, equal to ``specific`` unless given)."""

    load_ratio: float
    size_ratio: float
    specific: float
    description: str = ""
    specific_nmosd: float | None = None

    def share_typical(self, nmosd: bool) -> float:
        """The probability that one lesion of the class lies at one of its typical sites."""
        if nmosd and self.specific_nmosd is not None:
            return self.specific_nmosd
        return self.specific


#: The `paper` preset's NMOSD share at typical sites (revision 3). The paper's NMOSD patients
#: were enrolled with brain lesions in the acute phase, and it is NMOSD's characteristic lesions
#: (periependymal, diencephalic, callosal, corticospinal, band-like, punctate dots) that tell
#: them from MS; at 0.55, as for MS, 45 % of an NMOSD patient's lesions looked like MS white-
#: matter lesions, and the paper's network from scratch could not beat a lesion counter on 70
#: training subjects (README, "Synthetic cohort": both measured).
NMOSD_SPECIFIC_PAPER = 0.9


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(0.35, 0.6, 0.85, "strong load difference and strong patterns"),
    "paper": Difficulty(
        0.75,
        0.85,
        0.55,
        "the paper's task: every patient has lesions, loads overlap, NMOSD's lesions mostly "
        "at its typical sites, MS's half at its own and half at shared white-matter sites",
        specific_nmosd=NMOSD_SPECIFIC_PAPER,
    ),
    "spatial": Difficulty(1.0, 1.0, 0.9, "identical loads: the pattern is the only signal"),
    "hard": Difficulty(0.95, 1.0, 0.06, "loads and patterns nearly alike"),
}

#: MS lesion count and volume, set to match the 20 real MS patients of shared/data (Lesjak 2017,
#: MNI masks, lesions of >= 24 mm^3): count median 31 (IQR 14-56), lesion volume median 58 mm^3
#: (log-SD 1.2) with a heavy tail of confluent lesions (99th percentile 7.5 ml), total median
#: 15.5 ml (IQR 5-30). A per-patient severity couples count and size, as in real patients.
MS_COUNT_MEDIAN, COUNT_LOG_SD, COUNT_COUPLING = 31.0, 0.8, 0.8
MS_SIZE_MEDIAN_MM3, SIZE_LOG_SD, SIZE_COUPLING = 60.0, 1.25, 0.4
#: Confluent lesions' median was 4000 mm^3 in revision 1; confined to the white matter
#: (revision 2) they hold their volume by spreading, and 3400 brings the written masks' median
#: total back to the real one (16.7 ml against 15.5; 4000 gave 20.3, outside ±30 %; tested).
CONFLUENT_SHARE, CONFLUENT_MEDIAN_MM3 = 0.075, 3400.0
MAX_TOTAL_MM3 = 60_000.0  # the heaviest of the 20 real patients: 52 ml
SIZE_RANGE_MM3 = (24.0, 25_000.0)
COUNT_RANGE = (1, 150)
#: The largest lesion (mm^3) a site holds; larger ones go to sites that can hold them.
CAPACITY_MM3 = {
    "ms_callosal": 600.0,
    "ms_infratentorial": 2500.0,
    "nmosd_3v": 1200.0,
    "nmosd_4v": 1200.0,
    "nmosd_diencephalon": 1800.0,
    "nmosd_lv_band": 3000.0,
    "nmosd_callosal": 5000.0,
    "nmosd_cst": 4000.0,
    "nmosd_subcortical": 150.0,
}

MS_SITES = {
    "ms_periventricular": 0.58,
    "ms_juxtacortical": 0.14,
    "ms_callosal": 0.08,
    "ms_infratentorial": 0.12,
    "ms_temporal": 0.08,
}
NMOSD_SITES = {
    "nmosd_lv_band": 0.22,
    "nmosd_3v": 0.12,
    "nmosd_4v": 0.12,
    "nmosd_diencephalon": 0.12,
    "nmosd_callosal": 0.14,
    "nmosd_cst": 0.16,
    "nmosd_confluent": 0.08,
    "nmosd_subcortical": 0.16,
}
SHARED_SITES = {"white_matter": 0.9, "juxtacortical": 0.1}
#: Small typical NMOSD sites hold one lesion each (several would merge into one component
#: and change the lesion count, a load signal the pattern knob must not create).
SINGLE_SITES = {"nmosd_3v", "nmosd_4v", "nmosd_diencephalon", "nmosd_callosal"}


@dataclass
class Lesion:
    """One lesion: a union of ellipsoids (or a tube) in MNI mm, optionally clipped to a region."""

    site: str
    volume_mm3: float  # as drawn
    ellipsoids: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    tube: tuple[np.ndarray, float] | None = None  # (points along the path, radius)
    clip: str | None = None  # anatomy region the lesion is confined to
    roughness: float = 0.0
    waves: np.ndarray | None = None  # random plane waves of the surface roughness

    def bbox_mm(self) -> tuple[np.ndarray, np.ndarray]:
        pts, rad = [], []
        for c, semi, _ in self.ellipsoids:
            pts.append(c)
            rad.append(float(semi.max()))
        if self.tube is not None:
            path, r = self.tube
            pts += list(path)
            rad += [r] * len(path)
        pts, rad = np.array(pts), np.array(rad)[:, None] * (1 + self.roughness) + 1.0
        return (pts - rad).min(0), (pts + rad).max(0)

    def inside(self, mm: np.ndarray) -> np.ndarray:
        """Which of the points (N, 3) lie inside the shape."""
        score = np.full(len(mm), np.inf)
        for c, semi, axes in self.ellipsoids:
            q = (mm - c) @ axes.T / semi
            score = np.minimum(score, (q**2).sum(1))
        if self.tube is not None:
            path, r = self.tube
            d2 = np.full(len(mm), np.inf)
            for a, b in zip(path[:-1], path[1:], strict=True):
                ab = b - a
                t = np.clip(((mm - a) @ ab) / max(ab @ ab, 1e-9), 0, 1)
                d2 = np.minimum(d2, ((mm - a - t[:, None] * ab) ** 2).sum(1))
            score = np.minimum(score, d2 / r**2)
        if self.roughness > 0 and self.waves is not None:
            k, phase = self.waves[:, :3], self.waves[:, 3]
            noise = np.sin(mm @ k.T + phase).sum(1) / np.sqrt(len(phase) / 2)
            score = score * (1 + self.roughness * noise)
        return score <= 1.0


def _frame(direction, rng) -> np.ndarray:
    """Orthonormal axes (3, 3), the first along ``direction``."""
    d = np.asarray(direction, float)
    d = d / max(np.linalg.norm(d), 1e-9)
    a = rng.normal(size=3)
    a -= a @ d * d
    a /= max(np.linalg.norm(a), 1e-9)
    return np.stack([d, a, np.cross(d, a)])


def _ellipsoid_for_volume(volume, ratio, rng):
    """Semi-axes (long, short, short') of an ellipsoid of ``volume`` mm^3 and axis ratio."""
    third = rng.uniform(0.8, 1.2)
    a = (volume / (4 / 3 * np.pi) * ratio**2 / third) ** (1 / 3)
    return np.array([a, a / ratio, a / ratio * third])


#: Lesions whose centres come from the white-matter density, confined to the white matter when
#: painted: a centre drawn near the ventricles must not paint into the caudate or thalamus
#: beside them (the phantom MS map then correlates 0.73 with the 20 real patients' map;
#: confined, 0.76). Juxtacortical lesions keep their cortical edge.
WHITE_MATTER_SITES = frozenset({"white_matter", "ms_periventricular"})

#: NMOSD tract lesions (callosal, corticospinal) are long and thin at every volume: a small
#: one is a thinner tube of this length, not a short blob.
MIN_TRACT_MM = 15.0

#: Large lesions (confluent) lie against the ventricles: their centres are drawn with a
#: shorter decay, so that their extent does not carry lesion mass far into the white matter.
LARGE_MM3, LARGE_DECAY_MM = 500.0, 7.0


def _point(anat: Anatomy, region: str, rng, volume: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A random point of ``region``; ``white_matter``: supratentorial white matter with MS's
    periventricular density (most lesions near the ventricles, fewer further out)."""
    if region == "white_matter":
        decay = LARGE_DECAY_MM if volume > LARGE_MM3 else DECAY_MM
        flat, cum = anat.periventricular_density(decay)
        pick = flat[min(int(np.searchsorted(cum, rng.random())), flat.size - 1)]
    else:
        flat = anat.regions[region]
        pick = flat[rng.integers(flat.size)]
    v = np.array(np.unravel_index(pick, anat.shape))
    return anat.to_mm(v + rng.uniform(-0.5, 0.5, 3))[0], v


def _waves(rng, n=6, wavelength=(6.0, 12.0)) -> np.ndarray:
    k = rng.normal(size=(n, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    k *= (2 * np.pi / rng.uniform(*wavelength, size=n))[:, None]
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, (n, 1))], axis=1)


def make_lesion(anat: Anatomy, site: str, volume: float, rng, side: int = 0) -> Lesion:
    """A lesion of ``volume`` mm^3 at ``site`` with the site's shape (``side``: +1 right,
    -1 left, 0 random, for one-sided tracts)."""
    les = Lesion(site, volume)
    if site in ("white_matter", "juxtacortical", "nmosd_subcortical"):
        # shared sites: near-round, any direction; NMOSD's punctate dots lie where the shared
        # juxtacortical lesions do, rounder (AQP4-NMOSD: 83 % have subcortical dots)
        where, elongation = ("juxtacortical", 1.2) if site == "nmosd_subcortical" else (site, 1.4)
        c, _ = _point(anat, where, rng, volume)
        semi = _ellipsoid_for_volume(volume, rng.uniform(1.0, elongation), rng)
        les.ellipsoids.append((c, semi, _frame(rng.normal(size=3), rng)))
    elif site.startswith("ms_"):
        region = {
            "ms_periventricular": "white_matter",
            "ms_juxtacortical": "juxtacortical",
            "ms_infratentorial": "infratentorial",
            "ms_callosal": "callosal",
            "ms_temporal": "inferior_temporal",
        }[site]
        c, v = _point(anat, region, rng, volume)
        ratio = rng.uniform(1.5, 3.0)
        if region in ("white_matter", "callosal"):  # Dawson finger: along the gradient
            direction = anat.grad_lat[:, v[0], v[1], v[2]]
        else:
            direction = rng.normal(size=3)
        les.ellipsoids.append(
            (c, _ellipsoid_for_volume(volume, ratio, rng), _frame(direction, rng))
        )
    elif site == "nmosd_lv_band":  # pencil-thin, hugging the ependyma, parallel to it
        c, v = _point(anat, "periependymal_lv", rng)
        g = anat.grad_lat[:, v[0], v[1], v[2]]
        along = np.cross(g, rng.normal(size=3))
        semi = _ellipsoid_for_volume(volume, rng.uniform(5.0, 9.0), rng)
        les.ellipsoids.append((c, semi, _frame(along, rng)))
        les.clip = "periependymal_lv"
    elif site in ("nmosd_3v", "nmosd_4v", "nmosd_diencephalon"):
        region = {
            "nmosd_3v": "periependymal_3v",
            "nmosd_4v": "periependymal_4v",
            "nmosd_diencephalon": "diencephalon",
        }[site]
        c, _ = _point(anat, region, rng)
        semi = _ellipsoid_for_volume(volume, rng.uniform(1.2, 2.0), rng)
        les.ellipsoids.append((c, semi, _frame(rng.normal(size=3), rng)))
        les.clip, les.roughness, les.waves = region, 0.2, _waves(rng)
    elif site in ("nmosd_callosal", "nmosd_cst"):  # long lesions along a tract
        if site == "nmosd_callosal":
            path, radius = sample_path(CC_PATH, 1.0), rng.uniform(3.0, 5.0)
        else:
            right = side > 0 if side else rng.random() < 0.5
            tract = CST_PATH_RIGHT if right else mirror(CST_PATH_RIGHT)
            path, radius = sample_path(tract, 1.0), rng.uniform(2.0, 3.5)
        length = volume / (np.pi * radius**2)
        if length < MIN_TRACT_MM:  # little volume: a thinner tube, not a shorter one
            radius = float(np.sqrt(volume / (np.pi * MIN_TRACT_MM)))
            length = MIN_TRACT_MM
        n = int(np.clip(round(length), 2, len(path)))
        start = int(rng.integers(0, len(path) - n + 1))
        part = path[start : start + n]
        # the path is a polyline sampled every mm: every 6th point (and the last) keeps its
        # course within a fraction of a mm and makes the distance test 6x cheaper
        les.tube = (np.concatenate([part[:-1:6], part[-1:]]), radius)
    elif site == "nmosd_confluent":
        c, _ = _point(anat, "deep", rng)
        semi = _ellipsoid_for_volume(volume, rng.uniform(1.2, 1.8), rng)
        les.ellipsoids.append((c, semi, _frame(rng.normal(size=3), rng)))
        les.roughness, les.waves = 0.3, _waves(rng)
    else:  # pragma: no cover
        raise ValueError(site)
    if site in WHITE_MATTER_SITES:
        les.clip = "supratentorial_wm"
    return les


def _choice(rng, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_lesions(
    anat: Anatomy, rng, diagnosis: str, difficulty: str = "paper", lesion_free: bool = False
) -> list[Lesion]:
    """One subject's lesions (continuous shapes in MNI mm); none when ``lesion_free``."""
    if lesion_free:
        return []
    d = DIFFICULTIES[difficulty]
    nmosd = diagnosis == "NMOSD"
    severity = rng.normal()  # couples count and size within a patient
    scale = d.size_ratio if nmosd else 1.0
    count_median = MS_COUNT_MEDIAN * (d.load_ratio if nmosd else 1.0)
    own = np.sqrt(1 - COUNT_COUPLING**2) * rng.normal()
    n = int(
        np.clip(
            round(count_median * np.exp(COUNT_LOG_SD * (COUNT_COUPLING * severity + own))),
            *COUNT_RANGE,
        )
    )
    typical = NMOSD_SITES if nmosd else MS_SITES
    lesions, used, total = [], set(), 0.0
    for _ in range(n):
        if total >= MAX_TOTAL_MM3 * scale:
            break
        if rng.random() < CONFLUENT_SHARE:
            median, spread = CONFLUENT_MEDIAN_MM3, 0.7
        else:
            median, spread = MS_SIZE_MEDIAN_MM3, SIZE_LOG_SD
        volume = float(
            np.clip(
                scale * median * np.exp(SIZE_COUPLING * severity + spread * rng.normal()),
                *SIZE_RANGE_MM3,
            )
        )
        volume = max(min(volume, MAX_TOTAL_MM3 * scale - total), SIZE_RANGE_MM3[0])
        if rng.random() < d.share_typical(nmosd):
            weights = {
                k: w
                for k, w in typical.items()
                if k not in used and CAPACITY_MM3.get(k, np.inf) >= volume
            }
            site = _choice(rng, weights)
            if site in SINGLE_SITES:
                used.add(site)
        else:
            site = _choice(rng, SHARED_SITES)
        if site == "nmosd_cst" and rng.random() < 0.5:  # bilateral, as often in NMOSD
            lesions += [make_lesion(anat, site, volume / 2, rng, side=s) for s in (1, -1)]
        else:
            lesions.append(make_lesion(anat, site, volume, rng))
        total += volume
    return lesions


def _coverage(les, anat, matrix, inv, offset, allowed, sub_offsets):
    """(voxels, fraction of each inside the lesion and its allowed region) on the output grid."""
    shape = np.array(anat.shape)
    lo_mm, hi_mm = les.bbox_mm()
    corners = np.array(np.meshgrid(*zip(lo_mm, hi_mm, strict=True), indexing="ij")).reshape(3, -1)
    t = anat.to_vox(corners.T)
    v = (inv @ (t - offset).T).T
    lo = np.maximum(np.floor(v.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(v.max(0)).astype(int) + 2, shape)
    if np.any(hi <= lo):
        return np.zeros((0, 3), int), np.zeros(0)
    vox = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
    ).reshape(-1, 3)
    pts = (vox[:, None, :] + sub_offsets[None]).reshape(-1, 3)
    tv = pts @ matrix.T + offset
    hit = les.inside(anat.to_mm(tv))
    idx = np.round(tv).astype(int)
    valid = np.all((idx >= 0) & (idx < shape), axis=1)
    idx = np.where(valid[:, None], idx, 0)
    keep = valid & allowed[idx[:, 0], idx[:, 1], idx[:, 2]]
    if les.clip is not None:
        keep &= anat.region_bool(les.clip)[idx[:, 0], idx[:, 1], idx[:, 2]]
    return vox, (hit & keep).reshape(len(vox), -1).mean(1)


def _scaled(les: Lesion, factor: float) -> Lesion:
    out = Lesion(les.site, les.volume_mm3, clip=les.clip, roughness=les.roughness, waves=les.waves)
    out.ellipsoids = [(c, semi * factor, axes) for c, semi, axes in les.ellipsoids]
    if les.tube is not None:
        out.tube = (les.tube[0], les.tube[1] * factor)
    return out


def paint(
    lesions: list[Lesion],
    anat: Anatomy,
    matrix: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    sub: int = 3,
) -> np.ndarray:
    """Paint ``lesions`` on the output grid whose voxel ``v`` shows template voxel
    ``matrix @ v + offset`` (scipy's ``affine_transform`` convention; identity by default).

    Volume-preserving: each lesion's coverage of the output voxels is measured on a ``sub``³
    sub-grid (confined to its region, the brain and outside the lateral ventricles, all looked
    up on the template), and its ``round(covered volume / voxel volume)`` most-covered voxels,
    at least one, are set. A lesion that loses volume to its confinement (a periependymal band,
    the ventricle beside it, the brain's edge) is enlarged (twice at most) until it holds what
    was drawn."""
    matrix = np.eye(3) if matrix is None else np.asarray(matrix, float)
    offset = np.zeros(3) if offset is None else np.asarray(offset, float)
    inv = np.linalg.inv(matrix)
    out = np.zeros(anat.shape, dtype=bool)
    allowed = anat.region_bool("allowed")
    voxel_mm3 = float(np.prod(anat.zooms))
    grids = {}
    for n in range(1, sub + 1):
        steps = (np.arange(n) + 0.5) / n - 0.5
        grids[n] = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)

    def sub_offsets(les: Lesion) -> np.ndarray:
        # the sub-grid matters for small lesions (a voxel more or less is a large share of
        # their volume); a large one is measured well enough with fewer samples per voxel
        volume_vox = les.volume_mm3 / voxel_mm3
        return grids[sub if volume_vox < 40 else max(1, sub - 1) if volume_vox < 400 else 1]

    for les in lesions:
        vox, cov = _coverage(les, anat, matrix, inv, offset, allowed, sub_offsets(les))
        for _ in range(2):
            held = cov.sum() * voxel_mm3
            if held >= 0.85 * les.volume_mm3:
                break
            factor = float(np.clip(np.sqrt(les.volume_mm3 / max(held, 1.0)), 1.0, 3.0))
            les = _scaled(les, factor)
            vox, cov = _coverage(les, anat, matrix, inv, offset, allowed, sub_offsets(les))
        if not cov.size or cov.max() <= 0:
            continue
        k = max(int(round(min(cov.sum(), les.volume_mm3 / voxel_mm3))), 1)
        chosen = vox[np.argsort(-cov, kind="stable")[:k]]
        out[chosen[:, 0], chosen[:, 1], chosen[:, 2]] = True
    return out


def sample_lesion_map(
    anat: Anatomy, rng: np.random.Generator, diagnosis: str, difficulty: str = "paper"
) -> tuple[np.ndarray, list[Lesion]]:
    """One subject's binary lesion map on the template grid and its lesions."""
    lesions = sample_lesions(anat, rng, diagnosis, difficulty)
    return paint(lesions, anat), lesions
