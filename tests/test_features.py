"""Lesion-load features: constructed masks with known answers, and a real native mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import shared_or_skip

from nmosd_ms.data.features import lesion_features
from nmosd_ms.spatial import to_canonical


def test_counts_volumes_extents_on_constructed_mask():
    m = np.zeros((40, 40, 40), bool)
    m[5:8, 5:8, 5:8] = True  # 27 voxels, left half (x < centre)
    m[30:32, 30:32, 30:32] = True  # 8 voxels, right half
    m[20, 20, 20] = True  # 1 voxel: below the minimum size
    m[10:12, 30, 30] = True  # 2 voxels touching diagonally ...
    m[12, 31, 31] = True  # ... this one (26-connectivity joins them: 3 voxels)
    zooms = np.array([1.0, 2.0, 0.5])  # 1 mm³ voxels
    f = lesion_features(m, zooms, (0, 0, 0), (40, 40, 40), min_voxels=3)
    assert f["n_lesions"] == 3
    assert f["total_ml"] == pytest.approx((27 + 8 + 3) / 1000)
    assert f["max_lesion_ml"] == pytest.approx(0.027)
    assert f["mean_lesion_ml"] == pytest.approx(38 / 3 / 1000)
    left, right = 27 + 3, 8
    assert f["lr_asymmetry"] == pytest.approx(abs(left - right) / (left + right))
    assert f["extent_x_mm"] == pytest.approx((31 - 5 + 1) * 1.0)
    assert f["extent_y_mm"] == pytest.approx((31 - 5 + 1) * 2.0)
    empty = lesion_features(np.zeros((5, 5, 5)), zooms, (0, 0, 0), (5, 5, 5))
    assert empty["n_lesions"] == 0 and empty["total_ml"] == 0


def test_lesion_count_does_not_depend_on_the_voxel_size():
    """The same lesions at 2 mm and at 1 mm (each voxel split in 8): a minimum in mm³ counts
    them alike; the old minimum in voxels counted the small ones only on the finer grid."""
    m = np.zeros((30, 30, 30), bool)
    m[5:8, 5:8, 5:8] = True  # 27 voxels = 216 mm³ at 2 mm
    m[20, 20, 20:22] = True  # 2 voxels = 16 mm³: below 24 mm³
    m[10, 25, 5:8] = True  # 3 voxels = 24 mm³: counted
    fine = m.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    coarse = lesion_features(m, np.full(3, 2.0), (0, 0, 0), m.shape)
    finer = lesion_features(fine, np.ones(3), (0, 0, 0), fine.shape)
    assert coarse["n_lesions"] == finer["n_lesions"] == 2
    assert coarse["total_ml"] == pytest.approx(finer["total_ml"])
    old = lesion_features(fine, np.ones(3), (0, 0, 0), fine.shape, min_voxels=3)
    assert old["n_lesions"] == 3  # 16 voxels of the small one pass a 3-voxel rule


def test_central_fraction():
    m = np.zeros((41, 41, 41), bool)
    m[19:22, 19:22, 19:22] = True  # at the centre
    m[0:3, 0:3, 0:3] = True  # in a corner
    f = lesion_features(m, np.ones(3), (0, 0, 0), (41, 41, 41))
    assert f["central_fraction"] == pytest.approx(0.5)


def test_real_native_mask_volume_matches_voxel_count():
    path = shared_or_skip("lesjak2017", "sub-02", "lesion_mask.nii.gz")
    img = nib.load(path)
    data = np.asarray(img.dataobj) > 0
    canon, affine = to_canonical(data, img.affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    f = lesion_features(canon, zooms, (0, 0, 0), canon.shape, min_voxels=1)
    assert f["total_ml"] == pytest.approx(
        data.sum() * voxel_ml, rel=1e-6
    )  # affine vs float32 header zooms
    assert f["n_lesions"] >= 1


def test_features_tsv_written_by_prepare(prepared_small):
    feats = pd.read_csv(prepared_small / "features.tsv", sep="\t")
    index = pd.read_csv(prepared_small / "index.tsv", sep="\t")
    assert list(feats["participant_id"]) == list(index["participant_id"])
    assert (feats["total_ml"] <= index["lesion_ml"] + 1e-9).all()
    assert (feats.loc[index["lesion_voxels"] == 0, "n_lesions"] == 0).all()
