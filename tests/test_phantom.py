"""Synthetic cohort: layout, determinism, class and phenotype proportions, priors, real anatomy."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import shared_or_skip
from helpers import assert_user_error, run_cli
from scipy import ndimage

from nmosd_ms.data.ingest import load_bids
from nmosd_ms.phantom import generate_cohort, load_anatomy, sample_lesion_map
from nmosd_ms.phantom.lesions import DIFFICULTIES


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.nii.gz")):
        h.update(np.asarray(nib.load(p).dataobj).tobytes())
    return h.hexdigest()


def test_layout_is_readable_by_prepare(phantom_cohort):
    cohort = load_bids(phantom_cohort)
    assert cohort.counts == {"MS": 8, "NMOSD": 8}
    p = pd.read_csv(phantom_cohort / "participants.tsv", sep="\t")
    assert {"participant_id", "diagnosis", "age", "sex"} <= set(p.columns)
    img = nib.load(cohort.subjects[0].flair)
    mask = nib.load(cohort.subjects[0].lesion_mask)
    assert img.shape == mask.shape and np.allclose(img.affine, mask.affine)


def test_deterministic_for_a_seed(tmp_path):
    generate_cohort(tmp_path / "a", 3, 3, seed=5)
    generate_cohort(tmp_path / "b", 3, 3, seed=5)
    generate_cohort(tmp_path / "c", 3, 3, seed=6)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    a = (tmp_path / "a/participants.tsv").read_text()
    assert a == (tmp_path / "b/participants.tsv").read_text()


def test_parallel_workers_give_the_same_cohort(tmp_path):
    generate_cohort(tmp_path / "a", 3, 2, seed=1, workers=1)
    generate_cohort(tmp_path / "b", 3, 2, seed=1, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_flair_contrast(phantom_cohort):
    anat = load_anatomy(2)
    s = load_bids(phantom_cohort).subjects
    # FLAIR-like: CSF dark, WM darker than GM, lesions bright (before the random rigid motion,
    # so compare on the template's tissue maps via the generator's own intensities).
    from nmosd_ms.phantom.generate import synth_flair

    lesion = np.zeros(anat.shape, bool)
    lesion.flat[anat.regions["deep"][:200]] = True
    img = synth_flair(anat, lesion, np.random.default_rng(0))
    csf, wm, gm = anat.csf > 0.8, (anat.wm > 0.9) & ~lesion, anat.gm > 0.8
    assert img[csf].mean() < img[wm].mean() < img[gm].mean() < img[lesion].mean()
    assert nib.load(s[0].flair).get_data_dtype() == np.int16


def test_class_proportions_and_priors(tmp_path):
    df = generate_cohort(tmp_path / "c", n_nmosd=41, n_ms=47, seed=0, difficulty="paper", workers=2)
    assert (df["diagnosis"] == "NMOSD").sum() == 41 and (df["diagnosis"] == "MS").sum() == 47
    nmosd = df[df["diagnosis"] == "NMOSD"]
    ms = df[df["diagnosis"] == "MS"]
    lesion_free = (nmosd["lesion_ml"] == 0).mean()
    assert 0.30 <= lesion_free <= 0.45, lesion_free  # prior: 35-40 % (21-43 % across studies)
    assert (nmosd["phenotype"] == "ms-like").mean() == pytest.approx(0.18, abs=0.03)
    assert (ms["lesion_ml"] > 0).mean() >= 0.9  # MS: any lesion in ~97 %
    typical = ms[ms["phenotype"] == "ms-typical"]["lesion_ml"]
    # Published RRMS volumes: median 7.1 ml (Masuda 2022), CIS median ~2 ml (REFLEX).
    assert 1.5 <= typical.median() <= 10.0, typical.median()
    assert nmosd["lesion_ml"].median() < typical.median() / 3


def test_difficulty_controls_overlap():
    assert DIFFICULTIES["easy"].nmosd["ms-like"] < DIFFICULTIES["paper"].nmosd["ms-like"]
    assert DIFFICULTIES["paper"].nmosd["ms-like"] < DIFFICULTIES["hard"].nmosd["ms-like"]
    assert DIFFICULTIES["easy"].ms["ms-low-load"] < DIFFICULTIES["hard"].ms["ms-low-load"]


def test_dawson_fingers_point_away_from_the_ventricles():
    anat = load_anatomy(2)
    rng = np.random.default_rng(0)
    from nmosd_ms.phantom.lesions import _ms_lesion

    angles = []
    for _ in range(30):
        m = np.zeros(anat.shape, bool)
        _ms_lesion(m, anat, "periventricular", rng, scale=1.6)
        idx = np.argwhere(m)
        if len(idx) < 8:
            continue
        centred = (idx - idx.mean(0)) * anat.zooms
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        c = np.round(idx.mean(0)).astype(int)
        grad = anat.grad_lat[:, c[0], c[1], c[2]]
        angles.append(abs(float(axis @ grad)))
    assert np.median(angles) > 0.7  # long axis mostly along the ventricle-distance gradient


def test_ms_lesion_frequency_matches_real_ms_patients():
    """Voxel-wise lesion frequency of MS-like phantoms vs the 20 real MNI lesion masks."""
    from nilearn.image import resample_to_img

    root = shared_or_skip("lesjak2017")
    anat = load_anatomy(2)
    freq = np.zeros(anat.shape)
    n = 60
    for i in range(n):
        m, _ = sample_lesion_map(anat, np.random.default_rng([0, i]), "MS", "paper", "ms-typical")
        freq += m
    freq /= n
    acc, img = None, None
    for p in sorted(root.glob("sub-*/lesion_mask_mni.nii.gz")):
        img = nib.load(p)
        a = (np.asarray(img.dataobj) > 0).astype(np.float32)
        acc = a if acc is None else acc + a
    real = nib.Nifti1Image(acc / 20, img.affine)
    ref = nib.Nifti1Image(freq.astype(np.float32), anat.affine)
    real_on_template = resample_to_img(
        real, ref, interpolation="continuous", force_resample=True, copy_header=True
    ).get_fdata()
    # Lesion-probability maps are compared after 4 mm Gaussian smoothing (sigma = 2 voxels).
    a = ndimage.gaussian_filter(freq, 2.0)[anat.brain]
    b = ndimage.gaussian_filter(real_on_template, 2.0)[anat.brain]
    r = float(np.corrcoef(a, b)[0, 1])
    print(f"phantom vs real MS lesion-frequency map: Pearson r = {r:.3f}")
    assert r >= 0.5


def test_phantom_cli_refuses_bad_options(tmp_path):
    assert_user_error(run_cli("phantom", tmp_path / "x", "--difficulty", "extreme"), "difficulty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f.txt").write_text("x")
    assert_user_error(run_cli("phantom", tmp_path / "full"), "not empty")
