"""Shared fixtures: real data location (skip when absent) and small generated cohorts."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NMOSD_MS_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("OMP_NUM_THREADS", "2")


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (see README, Tests)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return shared_or_skip()


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def truncate_gzip(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert raw[:2] == b"\x1f\x8b"
    return path


def blob_mask(shape=(24, 28, 20), centre=(12, 14, 10), radius=3) -> np.ndarray:
    idx = np.indices(shape)
    d = sum((i - c) ** 2 for i, c in zip(idx, centre, strict=True))
    return (d <= radius**2).astype(np.uint8)


def make_manifest_cohort(tmp: Path, n_per_class: int = 3, shape=(24, 28, 20)) -> Path:
    """A tiny manifest cohort: FLAIR with a bright head, lesion masks, NMOSD/MS labels."""
    rng = np.random.default_rng(0)
    rows = ["participant_id\tdiagnosis\tflair\tlesion_mask"]
    for i in range(2 * n_per_class):
        pid = f"sub-{i:02d}"
        dx = "NMOSD" if i % 2 else "MS"
        head = blob_mask(shape, tuple(s // 2 for s in shape), min(shape) // 2 - 2).astype(
            np.float32
        )
        flair = head * 100 + rng.random(shape).astype(np.float32) * 5
        x = (7 if i % 2 == 0 else 16) + int(rng.integers(-1, 2))  # left vs right half
        lesion = blob_mask(shape, (x, 14 + int(rng.integers(-3, 4)), 10), int(rng.integers(2, 4)))
        save_nifti(tmp / pid / "flair.nii.gz", flair)
        save_nifti(tmp / pid / "lesion.nii.gz", lesion)
        rows.append(f"{pid}\t{dx}\t{pid}/flair.nii.gz\t{pid}/lesion.nii.gz")
    manifest = tmp / "manifest.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory) -> Path:
    """A small synthetic BIDS cohort (easy difficulty), shared by the session's tests (two
    workers: the same files as one, tested in test_phantom)."""
    from nmosd_ms.phantom import generate_cohort

    out = tmp_path_factory.mktemp("phantom") / "bids"
    generate_cohort(out, n_nmosd=8, n_ms=8, seed=3, difficulty="easy", workers=2)
    return out


@pytest.fixture(scope="session")
def prepared_small(phantom_cohort, tmp_path_factory) -> Path:
    """The phantom cohort prepared at S = 24 (fast tests)."""
    from nmosd_ms.config import PrepareConfig
    from nmosd_ms.data.cache import prepare
    from nmosd_ms.data.dataset import load_cohort

    out = tmp_path_factory.mktemp("cache") / "c24"
    prepare(load_cohort(phantom_cohort), out, PrepareConfig(size=24))
    return out


#: The small cv run shared by the cv and report tests: 2 repeats x 3 folds, two models.
SMALL_MODELS = ("twoview-18", "lesionload-logreg")
#: What such a run trains: cv adds the shortcut baseline (lesionload-stump) to every run.
RUN_MODELS = (*SMALL_MODELS, "lesionload-stump")


def small_cv_config(**kw):
    from nmosd_ms.config import CVConfig, TrainConfig

    base = {
        "models": SMALL_MODELS,
        "repeats": 2,
        "folds": 3,
        "seed": 7,
        "train": TrainConfig(epochs=2, batch_size=4, shift=2),
    }
    return CVConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def small_run(prepared_small, tmp_path_factory) -> Path:
    from nmosd_ms.training.cv import run_cv
    from nmosd_ms.training.executors import LocalExecutor

    out = tmp_path_factory.mktemp("cv") / "run"
    run_cv(prepared_small, out, small_cv_config(), device="cpu", executor=LocalExecutor(threads=1))
    return out
