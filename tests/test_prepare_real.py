"""prepare on the real public MS scans in ../shared/data (skipped when absent)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import shared_or_skip
from helpers import cached_array

from nmosd_ms import nifti
from nmosd_ms.config import PrepareConfig
from nmosd_ms.data.cache import load_prepared, prepare
from nmosd_ms.data.ingest import load_manifest
from nmosd_ms.spatial import SpatialRecord, crop_box, head_mask, to_canonical, to_native


def _native_manifest(tmp_path, subjects=None) -> tuple:
    root = shared_or_skip("lesjak2017")
    subs = sorted(p.name for p in root.glob("sub-*"))
    subs = subs if subjects is None else [s for s in subs if s in subjects]
    rows = [
        {
            "participant_id": s,
            "diagnosis": "MS" if i % 2 else "NMOSD",
            "flair": "",
            "lesion_mask": str(root / s / "lesion_mask.nii.gz"),
            "brain_mask": str(root / s / "brain_mask.nii.gz"),
        }
        for i, s in enumerate(subs)
    ]
    manifest = tmp_path / "native.tsv"
    pd.DataFrame(rows).to_csv(manifest, sep="\t", index=False)
    return manifest, root, subs


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native")
    manifest, root, subs = _native_manifest(tmp)
    cache = tmp / "cache"
    prepare(load_manifest(manifest), cache, PrepareConfig(size=100), workers=2)
    return cache, root, subs


@pytest.mark.slow
def test_all_native_masks_prepare_and_lesions_survive(native_cache):
    cache, root, subs = native_cache
    assert len(subs) == 20
    prepared = load_prepared(cache)
    assert prepared.volumes.shape == (20, 100, 100, 100)
    for i, pid in enumerate(prepared.ids):
        row = prepared.index.iloc[i]
        vol = prepared.volumes[i]
        if row["lesion_voxels"] > 0:
            assert vol.max() > 0, f"{pid}: lesions vanished"
        rec = prepared.spatial(pid)
        box_voxels = np.prod(np.subtract(rec.box_hi, rec.box_lo))
        in_fraction = row["lesion_voxels"] / box_voxels
        assert vol.mean() == pytest.approx(in_fraction, rel=0.10), pid


@pytest.mark.slow
def test_native_sagittal_lps_crops_to_the_brain(native_cache):
    cache, root, _ = native_cache
    prepared = load_prepared(cache)
    rec = prepared.spatial("sub-01")
    img = nifti.load(root / "sub-01" / "brain_mask.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    brain_c, _ = to_canonical(img.data, img.affine)
    box = tuple(slice(a, b) for a, b in zip(rec.box_lo, rec.box_hi, strict=True))
    assert brain_c[box].sum() == brain_c.sum()  # the whole brain is inside the box
    assert np.prod(np.subtract(rec.box_hi, rec.box_lo)) < 0.7 * brain_c.size  # background cut


@pytest.mark.slow
def test_inverse_map_returns_to_the_native_grid(native_cache):
    cache, root, _ = native_cache
    prepared = load_prepared(cache)
    i = prepared.ids.index("sub-03")
    rec = prepared.spatial("sub-03")
    back, affine = to_native(prepared.volumes[i], rec)
    orig = nib.load(root / "sub-03" / "lesion_mask.nii.gz")
    assert back.shape == orig.shape == (192, 512, 512)
    assert np.allclose(affine, orig.affine)
    truth = np.asarray(orig.dataobj) > 0
    pred = back > 0.25
    dice = 2 * (truth & pred).sum() / (truth.sum() + pred.sum())
    assert dice > 0.6, dice


@pytest.mark.slow
@pytest.mark.parametrize("sub", ["sub-01", "sub-03", "sub-04", "sub-09"])
def test_raw_2d_flair_with_skull_crops_to_the_head(sub):
    path = shared_or_skip("lesjak2016", sub, "flair.nii.gz")
    img = nifti.load(path)
    data, _ = to_canonical(img.data, img.affine)
    fg, stride = head_mask(data)
    lo, hi = crop_box(fg, stride, data.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    inside = np.zeros(data.shape, bool)
    inside[box] = True
    # The box is smaller than the image in-plane and holds nearly all the head's signal.
    assert np.prod(np.subtract(hi, lo)) < 0.8 * data.size
    bright = data > np.percentile(data, 90)
    assert bright[inside].sum() >= 0.97 * bright.sum()
    assert data[~inside].mean() < 0.2 * data[inside].mean()


@pytest.mark.slow
def test_cache_is_reused_and_invalidated(tmp_path):
    manifest, _, _ = _native_manifest(tmp_path, {"sub-02", "sub-05"})
    cohort = load_manifest(manifest)
    first = prepare(cohort, tmp_path / "c", PrepareConfig(size=32))
    assert first["computed"] == 2
    again = prepare(cohort, tmp_path / "c", PrepareConfig(size=32))
    assert again["reused"] == 2 and again["computed"] == 0
    changed = prepare(cohort, tmp_path / "c", PrepareConfig(size=40))
    assert changed["computed"] == 2
    assert cached_array(tmp_path / "c", "sub-02").shape == (40, 40, 40)


def test_spatial_record_roundtrip_on_synthetic_oblique_orientation():
    # A LPI-oriented volume with an off-centre box: the inverse of an exact-size crop is exact.
    affine = np.diag([-1.0, -1.0, -1.0, 1.0])
    data = np.zeros((20, 22, 18), np.float32)
    data[5:9, 6:12, 3:7] = 1
    canon, _ = to_canonical(data, affine)
    lo, hi = (2, 3, 4), (18, 20, 16)
    rec = SpatialRecord((20, 22, 18), tuple(map(tuple, affine)), lo, hi, (16, 17, 12))
    crop = canon[2:18, 3:20, 4:16]
    back, _ = to_native(crop, rec)
    assert np.array_equal(back, data)
    src_lo, src_hi = rec.source_box()
    assert all(0 <= a < b <= s for a, b, s in zip(src_lo, src_hi, data.shape, strict=True))
