"""WMH segmentation on real FLAIRs (Lesjak 2017 MNI FLAIRs with consensus masks; raw 2D FLAIRs).

The issue's target is Dice >= 0.55 on both MNI cases; sub-19 reaches it, sub-07 (1.3 ml of small
lesions) does not (see README, WMH segmentation). These tests guard what the method reaches, so
that a change that makes it worse fails, and print the figures.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_or_skip
from helpers import assert_user_error, run_cli

from nmosd_ms.data.spatial import to_canonical
from nmosd_ms.segment import segment_wmh
from nmosd_ms.segment.wmh import WMHParams


@pytest.mark.parametrize(("sub", "floor"), [("sub-07", 0.38), ("sub-19", 0.7)])
def test_dice_against_consensus_on_mni_flair(sub, floor, tmp_path):
    root = shared_or_skip("lesjak2017", sub)
    out = tmp_path / "wmh.nii.gz"
    res = run_cli("segment", "--flair", root / "flair_mni.nii.gz", "--out", out, "--skull-stripped")
    assert res.exit_code == 0, res.stderr
    seg = np.asarray(nib.load(out).dataobj) > 0
    gt = np.asarray(nib.load(root / "lesion_mask_mni.nii.gz").dataobj) > 0
    dice = 2 * (seg & gt).sum() / (seg.sum() + gt.sum())
    vol = (seg.sum() / 1000, gt.sum() / 1000)
    print(f"{sub}: Dice {dice:.3f}; volume {vol[0]:.1f} ml vs consensus {vol[1]:.1f} ml")
    assert np.allclose(nib.load(out).affine, nib.load(root / "flair_mni.nii.gz").affine)
    assert dice >= floor  # measured 0.43 / 0.79; the 0.55 target is not met on sub-07 (README)


@pytest.mark.parametrize("sub", ["sub-01", "sub-04"])
def test_raw_2d_flair_with_skull(sub):
    path = shared_or_skip("lesjak2016", sub, "flair.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    seg = segment_wmh(data, img.header.get_zooms()[:3])
    assert seg.shape == data.shape and seg.any()
    # Inside the head: every detected voxel lies within the head's bounding box in-plane.
    head = data > np.percentile(data, 60)
    canon_head, _ = to_canonical(head, img.affine)
    canon_seg, _ = to_canonical(seg, img.affine)
    assert (canon_seg & ~np.any(canon_head, axis=2, keepdims=True)).sum() == 0
    assert canon_seg.sum() < 0.05 * canon_head.sum()


def test_segment_refuses_existing_output(tmp_path):
    (tmp_path / "x.nii.gz").write_text("")
    assert_user_error(
        run_cli("segment", "--flair", tmp_path / "f.nii.gz", "--out", tmp_path / "x.nii.gz"),
        "exists",
    )


@pytest.mark.parametrize(
    "args",
    [("--low", "4", "--high", "3"), ("--background", "0"), ("--min-volume", "-1")],
)
def test_segment_refuses_bad_parameters_before_reading(tmp_path, args):
    out = tmp_path / "m.nii.gz"
    res = run_cli("segment", "--flair", tmp_path / "absent.nii.gz", "--out", out, *args)
    assert_user_error(res, "need 0 < --low <= --high")
    assert not out.exists()


def test_segment_missing_flair_is_one_line(tmp_path):
    out = tmp_path / "m.nii.gz"
    assert_user_error(
        run_cli("segment", "--flair", tmp_path / "absent.nii.gz", "--out", out), "absent.nii.gz"
    )
    assert not out.exists()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_synthetic_flair_lesions_are_found(phantom_cohort):
    """Runs without the real data: the phantom's FLAIRs (2 mm, bias field, Rician noise in the
    background, so the brain mask is estimated) with their known lesion masks."""
    dices, inter, total = [], 0, 0
    for flair_path in sorted(phantom_cohort.glob("sub-*/anat/*_FLAIR.nii.gz"))[:4]:
        pid = flair_path.name.split("_")[0]
        mask_path = next((phantom_cohort / "derivatives" / "lesions" / pid).rglob("*.nii.gz"))
        img = nib.load(flair_path)
        flair = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()[:3]
        truth = np.asarray(nib.load(mask_path).dataobj) > 0
        seg = segment_wmh(flair, zooms)
        if truth.any():
            dices.append(_dice(seg, truth))
            inter, total = inter + (seg & truth).sum(), total + seg.sum() + truth.sum()
        else:  # a lesion-free phantom: (almost) nothing found
            assert seg.sum() * np.prod(zooms) < 100
    print("phantom Dice per subject", np.round(dices, 3), "pooled", round(2 * inter / total, 3))
    # measured on 16 such phantoms: 0.46 (a 0.2 ml load) to 0.88; pooled here 0.68
    assert dices and 2 * inter / total >= 0.6
    # the thresholds matter: seeds no lesion reaches find nothing
    assert not segment_wmh(flair, zooms, params=WMHParams(high=500, low=500)).any()


def test_featureless_images_give_an_empty_mask_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for image in (np.zeros((30, 30, 30), np.float32), np.full((30, 30, 30), 7.0, np.float32)):
            assert not segment_wmh(image, (1.0, 1.0, 1.0)).any()
            assert not segment_wmh(image, (1.0, 1.0, 1.0), np.ones(image.shape, bool)).any()
