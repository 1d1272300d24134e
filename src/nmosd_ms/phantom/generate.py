"""Write a synthetic BIDS cohort: FLAIR-like images, lesion masks, participants.tsv.

FLAIR contrast from the template tissue maps (CSF dark, WM darker than GM, lesions bright), a
smooth multiplicative bias field, Rician noise, and a small random rigid transform per subject
(rotation <= 4 deg, translation <= 4 mm) so that subjects do not share a voxel grid position.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..constants import __version__
from ..errors import NmosdError
from ..io import atomic_dir, atomic_path, write_json, write_text, write_tsv
from ..pools import pool_map, stopping_pool, worker_signals
from .anatomy import load_anatomy
from .lesions import DIFFICULTIES, GENERATOR_REVISION, make_lesion, paint, sample_lesions

#: FLAIR-like relative intensities. Real lesions are 1.3-1.5x the brain's intensity mode (the
#: white matter) on the two real MNI FLAIRs of shared/data (sub-07, sub-19); drawn at 1.35-1.55x
#: the white matter they measure 1.25-1.4x the mode after partial volume, bias field and noise
#: (tested). The first generator used 1.85x, which flattered every segmentation method.
GM, WM, CSF = 0.80, 0.62, 0.12
LESION_OVER_WM = (1.35, 1.55)
#: Painted lesions smaller than this (3 voxels at 2 mm) are not counted as lesions by prepare;
#: every subject with lesions has at least one larger (the paper's inclusion rule).
MIN_COUNTED_MM3 = 24.0


def _quota(weights: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """Labels in the given proportions (largest remainder), shuffled."""
    keys = list(weights)
    p = np.array([weights[k] for k in keys]) / sum(weights.values())
    counts = np.floor(p * n).astype(int)
    for i in np.argsort(-(p * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    out = [k for k, c in zip(keys, counts, strict=True) for _ in range(c)]
    rng.shuffle(out)
    return out


def synth_flair(tissue, lesion: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A FLAIR-like image from tissue maps on the lesion mask's grid: ``tissue`` has ``gm``,
    ``wm``, ``csf`` and ``brain`` (an :class:`Anatomy`, or the maps moved to a subject's grid)."""
    img = tissue.gm * GM + tissue.wm * WM + tissue.csf * CSF
    soft = ndimage.gaussian_filter(lesion.astype(np.float32), 0.6)
    contrast = rng.uniform(*LESION_OVER_WM)
    img = img * (1 - soft) + soft * WM * contrast
    shape = lesion.shape
    grid = np.indices(shape, dtype=np.float32) / np.array(shape, np.float32)[:, None, None, None]
    coef = rng.normal(0, 0.12, size=(3, 2))
    bias = np.exp(
        sum(coef[i, 0] * (grid[i] - 0.5) + coef[i, 1] * (grid[i] - 0.5) ** 2 for i in range(3))
    )
    img = img * bias * tissue.brain
    sigma = 0.025
    noisy = np.sqrt(
        (img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2
    )
    return noisy.astype(np.float32)


def random_rigid(anat, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) for scipy.ndimage.affine_transform: a rotation about the volume centre
    and a translation, in voxel units."""
    rot = Rotation.from_euler("xyz", rng.uniform(-4, 4, 3), degrees=True).as_matrix()
    shift_vox = rng.uniform(-4, 4, 3) / anat.zooms
    centre = (np.array(anat.shape) - 1) / 2
    return rot, centre - rot @ centre + shift_vox


def _moved_tissue(anat, matrix, offset) -> SimpleNamespace:
    def move(a):
        return ndimage.affine_transform(a, matrix, offset, order=1, mode="constant")

    brain = move(anat.brain.astype(np.float32)) >= 0.5
    return SimpleNamespace(gm=move(anat.gm), wm=move(anat.wm), csf=move(anat.csf), brain=brain)


def _largest_component_mm3(mask: np.ndarray, voxel_mm3: float) -> float:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return float(np.bincount(labels.ravel())[1:].max() * voxel_mm3) if n else 0.0


def make_subject(
    index: int,
    diagnosis: str,
    lesion_free: bool,
    seed: int,
    difficulty: str,
    resolution: int,
) -> dict:
    """One subject, everything on its own grid: the template moved by a random rigid motion,
    lesions painted on that grid (volume-preserving), FLAIR made from the moved tissue maps."""
    rng = np.random.default_rng([seed, index])
    anat = load_anatomy(resolution)
    matrix, offset = random_rigid(anat, rng)
    voxel_mm3 = float(np.prod(anat.zooms))
    lesions = sample_lesions(anat, rng, diagnosis, difficulty, lesion_free)
    lesion = paint(lesions, anat, matrix, offset)
    # the paper's inclusion rule: every patient has a brain lesion that prepare counts
    for _ in range(20):
        if lesion_free or _largest_component_mm3(lesion, voxel_mm3) >= MIN_COUNTED_MM3:
            break
        extra = make_lesion(anat, "white_matter", float(rng.uniform(40.0, 120.0)), rng)
        lesions.append(extra)
        lesion |= paint([extra], anat, matrix, offset)
    tissue = _moved_tissue(anat, matrix, offset)
    flair = synth_flair(tissue, lesion, rng)
    female = rng.random() < (0.87 if diagnosis == "NMOSD" else 0.70)
    age = rng.normal(41, 12) if diagnosis == "NMOSD" else rng.normal(33, 9)
    typical = sum(les.site.startswith(("ms_", "nmosd_")) for les in lesions)
    return {
        "flair": np.clip(flair * 1000, 0, 32767).astype(np.int16),
        "lesion": lesion.astype(np.uint8),
        "affine": anat.affine,
        "age": int(np.clip(round(age), 16, 80)),
        "sex": "F" if female else "M",
        "phenotype": "lesion-free" if lesion_free else "lesions",
        "lesions_drawn": len(lesions),
        "typical_lesions": typical,
        "lesion_ml": float(lesion.sum() * voxel_mm3 / 1000),
    }


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def _job(args) -> tuple[str, dict]:
    pid, out, index, diagnosis, lesion_free, seed, difficulty, resolution = args
    s = make_subject(index, diagnosis, lesion_free, seed, difficulty, resolution)
    out = Path(out)
    _save(out / pid / "anat" / f"{pid}_FLAIR.nii.gz", s.pop("flair"), s["affine"])
    _save(
        out / "derivatives" / "lesions" / pid / "anat" / f"{pid}_desc-lesion_mask.nii.gz",
        s.pop("lesion"),
        s["affine"],
    )
    s.pop("affine")
    return pid, s


_GENERATED_BY = {
    "Name": "nmosd-ms phantom",
    "Version": __version__,
    "Description": f"lesion generator revision {GENERATOR_REVISION}",
}

README = """# Synthetic NMOSD/MS cohort (nmosd-ms phantom)

Generated by nmosd-ms {version} (lesion generator revision {revision}) on {date}: `nmosd-ms phantom {out} --n-nmosd {n_nmosd}
--n-ms {n_ms} --seed {seed} --difficulty {difficulty} --resolution {resolution}{site}`.

NOT PATIENT DATA. Anatomy is the MNI152 2009c template shipped with nilearn; lesion patterns are
sampled from published priors (see the nmosd-ms README, "Synthetic cohort"). `participants.tsv`
has `phenotype` (the generator's hidden subtype) and `lesion_ml` for analysis; a classifier
must use `diagnosis` only.

Layout: `sub-*/anat/sub-*_FLAIR.nii.gz`,
`derivatives/lesions/sub-*/anat/sub-*_desc-lesion_mask.nii.gz` (read by `nmosd-ms prepare`).
"""


#: participants.json: what each column of participants.tsv means (BIDS data dictionary).
PARTICIPANT_COLUMNS = {
    "diagnosis": {
        "Description": "the class the subject was drawn as",
        "Levels": {"NMOSD": "AQP4-NMOSD-like lesion pattern", "MS": "MS-like lesion pattern"},
    },
    "age": {"Description": "age drawn for the subject", "Units": "year"},
    "sex": {"Description": "sex drawn for the subject", "Levels": {"F": "female", "M": "male"}},
    "phenotype": {
        "Description": "whether the subject has brain lesions",
        "Levels": {"lesions": "has lesions", "lesion-free": "no brain lesions"},
    },
    "lesions_drawn": {"Description": "number of lesions drawn"},
    "typical_lesions": {"Description": "number of lesions at a site typical of the class"},
    "lesion_ml": {"Description": "lesion volume in the written mask", "Units": "mL"},
}


def worker_setup() -> None:
    """A worker of ``generate_cohort`` uses one BLAS/OpenMP thread: the parallelism is across
    subjects (measured on 2 cores, 8 subjects: 2 workers of 2 threads each 11.1 s, against
    16.2 s for one process). Ctrl-C is the parent's to handle (:func:`~nmosd_ms.pools.worker_signals`)."""
    from threadpoolctl import threadpool_limits

    worker_signals()
    threadpool_limits(1)


def generate_cohort(
    out_dir: str | Path,
    n_nmosd: int = 41,
    n_ms: int = 47,
    seed: int = 0,
    difficulty: str = "paper",
    resolution: int = 2,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    lesion_free_fraction: float = 0.0,
    site: str = "",
) -> pd.DataFrame:
    """Generate a synthetic BIDS cohort of NMOSD-like and MS-like subjects; returns its
    participants.tsv as a DataFrame.

    Every subject has brain lesions, as in the paper ("all patients ... with brain MRI lesions
    were included"); ``lesion_free_fraction`` of the NMOSD subjects have none instead (35-40 %
    of AQP4-NMOSD patients in general), for users who study that question.

    Parameters
    ----------
    out_dir : path
        A new (or empty) folder for the BIDS dataset and its ``derivatives/lesions`` masks.
    n_nmosd, n_ms : int
        Subjects per class (the paper: 41 and 47).
    seed : int
        Same seed, same cohort (subject ``i`` is drawn from its own seeded stream).
    difficulty : {"easy", "paper", "spatial", "hard"}
        How much the classes differ in lesion load and in lesion pattern (README's table).
    resolution : {1, 2}
        Template resolution in mm.
    workers : int
        Subjects generated in parallel.
    lesion_free_fraction : float
        Share of NMOSD subjects without brain lesions (default 0).
    site : str
        Letters and digits that prefix every participant label (``sub-<site>001``), so that
        cohorts made as different sites never share participant IDs (e.g. the external cohort
        of ``nmosd-ms evaluate``)."""
    if difficulty not in DIFFICULTIES:
        raise NmosdError(
            f"difficulty must be one of {', '.join(DIFFICULTIES)}", option="difficulty"
        )
    if resolution not in (1, 2):
        raise NmosdError("the resolution must be 1 or 2 (mm)", option="resolution")
    if n_nmosd < 0 or n_ms < 0 or n_nmosd + n_ms == 0:
        raise NmosdError("the numbers of NMOSD and MS subjects must be >= 0 and not both 0")
    if not 0.0 <= lesion_free_fraction <= 1.0:
        raise NmosdError(
            "the lesion-free fraction must be between 0 and 1", option="lesion_free_fraction"
        )
    if not (site == "" or (site.isascii() and site.isalnum() and len(site) <= 16)):
        raise NmosdError("a site is up to 16 ASCII letters and digits", option="site")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NmosdError(f"{out} exists and is not empty; choose a new folder")
    # Written into a temporary folder beside OUT and moved into place when complete: an
    # interrupted run leaves nothing (a re-run would otherwise refuse the partial folder).
    with atomic_dir(out, replace=out.exists()) as tmp:
        return _generate(
            tmp,
            out,
            n_nmosd,
            n_ms,
            seed,
            difficulty,
            resolution,
            workers,
            progress,
            lesion_free_fraction,
            site,
        )


def _generate(
    out, final, n_nmosd, n_ms, seed, difficulty, resolution, workers, progress, free_fraction, site
):
    rng = np.random.default_rng(seed)
    diagnoses = ["NMOSD"] * n_nmosd + ["MS"] * n_ms
    free = {
        "NMOSD": _quota({True: free_fraction, False: 1 - free_fraction}, n_nmosd, rng),
        "MS": [False] * n_ms,
    }
    order = rng.permutation(len(diagnoses))
    jobs, used = [], {"NMOSD": 0, "MS": 0}
    for i, k in enumerate(order):
        dx = diagnoses[k]
        lesion_free = bool(free[dx][used[dx]])
        used[dx] += 1
        jobs.append(
            (f"sub-{site}{i + 1:03d}", str(out), i, dx, lesion_free, seed, difficulty, resolution)
        )
    results: dict[str, dict] = {}
    load_anatomy(resolution)
    if progress:
        progress(0, len(jobs))
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, initializer=worker_setup)
        with stopping_pool(pool):
            for pid, s in pool_map(pool, _job, jobs):
                results[pid] = s
                if progress:
                    progress(len(results), len(jobs))
    else:
        for job in jobs:
            pid, s = _job(job)
            results[pid] = s
            if progress:
                progress(len(results), len(jobs))
    rows = [
        {
            "participant_id": j[0],
            "diagnosis": j[3],
            "age": results[j[0]]["age"],
            "sex": results[j[0]]["sex"],
            "phenotype": results[j[0]]["phenotype"],
            "lesions_drawn": results[j[0]]["lesions_drawn"],
            "typical_lesions": results[j[0]]["typical_lesions"],
            "lesion_ml": round(results[j[0]]["lesion_ml"], 3),
        }
        for j in jobs
    ]
    participants = pd.DataFrame(rows)
    write_tsv(out / "participants.tsv", participants)
    write_json(out / "participants.json", PARTICIPANT_COLUMNS)  # BIDS data dictionary
    write_json(
        out / "dataset_description.json",
        {
            "Name": f"nmosd-ms synthetic cohort (seed {seed}, {difficulty}{', site ' + site if site else ''})",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "GeneratedBy": [_GENERATED_BY],
            "Authors": ["nmosd-ms (synthetic data)"],
            "License": "CC0",
        },
    )
    write_json(
        out / "derivatives" / "lesions" / "dataset_description.json",
        {
            "Name": "synthetic lesion masks",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [_GENERATED_BY],
            "Authors": ["nmosd-ms (synthetic data)"],
            "License": "CC0",
        },
    )
    write_text(
        out / "README.md",
        README.format(
            version=__version__,
            revision=GENERATOR_REVISION,
            date=_dt.date.today().isoformat(),
            out=final,
            n_nmosd=n_nmosd,
            n_ms=n_ms,
            seed=seed,
            difficulty=difficulty,
            resolution=resolution,
            site=f" --site {site}" if site else "",
        ),
    )
    return participants
