"""WMH segmentation on real FLAIRs (Lesjak 2017 MNI FLAIRs with consensus masks; raw 2D FLAIRs).

The issue's target is Dice >= 0.55 on both MNI cases. The parameters were chosen on these two
cases (README, WMH segmentation), so the figures are optimistic; the tests print them.
"""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from conftest import shared_or_skip
from helpers import assert_user_error, run_cli

from nmosd_ms.config import PrepareConfig, SegmentConfig
from nmosd_ms.segment import segment_wmh
from nmosd_ms.spatial import to_canonical


@pytest.mark.slow
@pytest.mark.parametrize(("sub", "floor"), [("sub-07", 0.55), ("sub-19", 0.7)])
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
    assert dice >= floor  # measured 0.575 / 0.781
    # without the symmetry step sub-07 falls to 0.43 (symmetric normal anatomy kept)
    if sub == "sub-07":
        out2 = tmp_path / "wmh_keep.nii.gz"
        flair = root / "flair_mni.nii.gz"
        args = ("--flair", flair, "--out", out2, "--skull-stripped", "--keep-symmetric")
        assert run_cli("segment", *args).exit_code == 0
        kept = np.asarray(nib.load(out2).dataobj) > 0
        assert kept.sum() > seg.sum() and (seg & ~kept).sum() == 0
        assert 2 * (kept & gt).sum() / (kept.sum() + gt.sum()) < dice


@pytest.mark.slow
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
    "args, flag",
    [
        (("--low", "4", "--high", "3"), "--high"),
        (("--background", "0"), "--background"),
        (("--min-volume", "-1"), "--min-volume"),
        (("--working-mm", "-1"), "--working-mm"),
    ],
)
def test_segment_refuses_bad_parameters_before_reading(tmp_path, args, flag):
    out = tmp_path / "m.nii.gz"
    res = run_cli("segment", "--flair", tmp_path / "absent.nii.gz", "--out", out, *args)
    # SegmentConfig validates them; the CLI names the flag
    assert_user_error(res, f"invalid option {flag}:")
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
    # lesions at the realistic contrast (1.3-1.5x white matter): pooled Dice here 0.76
    assert dices and 2 * inter / total >= 0.6
    # the thresholds matter: seeds no lesion reaches find nothing
    assert not segment_wmh(flair, zooms, params=SegmentConfig(high=500, low=500)).any()


def test_featureless_images_give_an_empty_mask_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for image in (np.zeros((30, 30, 30), np.float32), np.full((30, 30, 30), 7.0, np.float32)):
            assert not segment_wmh(image, (1.0, 1.0, 1.0)).any()
            assert not segment_wmh(image, (1.0, 1.0, 1.0), np.ones(image.shape, bool)).any()


def _symmetric_phantom_flair(rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A lesion-free phantom FLAIR (2 mm, from the symmetric MNI152 2009a template), turned by a
    known rotation; returns (image, rotation, offset) as for scipy's affine_transform."""
    from scipy.ndimage import affine_transform
    from scipy.spatial.transform import Rotation

    from nmosd_ms.phantom.anatomy import load_anatomy
    from nmosd_ms.phantom.generate import synth_flair

    anat = load_anatomy(2)
    flair = synth_flair(anat, np.zeros(anat.shape, bool), rng)
    rot = Rotation.from_euler("xyz", [3.0, -2.0, 6.0], degrees=True).as_matrix()
    centre = (np.array(anat.shape) - 1) / 2
    offset = centre - rot @ centre + np.array([2.5, -1.0, 1.5])
    return affine_transform(flair, rot, offset, order=1), rot, offset, anat


def test_midsagittal_plane_recovers_a_known_tilt():
    from nmosd_ms.segment.wmh import midsagittal_plane

    image, rot, offset, anat = _symmetric_phantom_flair(np.random.default_rng(0))
    normal, d = midsagittal_plane(image, image > 0.3 * image.max(), anat.zooms)
    # the template's midline x = 0 is the input plane e0·i = c; in output voxels (M^T e0)·o = c - off0
    c = -anat.affine[0, 3] / anat.affine[0, 0]
    true_normal = rot.T @ np.array([1.0, 0.0, 0.0])
    sign = np.sign(normal @ true_normal)
    angle = np.degrees(np.arccos(min(1.0, abs(normal @ true_normal))))
    true_d = anat.zooms[0] * (c - offset[0])
    print(f"plane: {angle:.2f} degrees and {abs(sign * d - true_d):.2f} mm off")
    assert angle < 1.5 and abs(sign * d - true_d) < 1.5


def test_symmetric_bright_pairs_are_dropped_and_lesions_kept():
    """On a rotated lesion-free phantom: a mirror-symmetric pair of bright blobs (normal anatomy's
    signature) is dropped, a lone blob of the same brightness is kept, a blob on the midline
    (its mirror is itself) is kept; --keep-symmetric keeps all."""
    rng = np.random.default_rng(1)
    image, rot, offset, anat = _symmetric_phantom_flair(rng)
    # blob centres in template mm (left/right pair, a lone one, one on the midline)
    centres = {"pair_r": (26, -20, 24), "pair_l": (-26, -20, 24), "lone": (-24, 10, 30)}
    centres["midline"] = (0, -30, 18)  # the splenium
    grid = np.indices(image.shape).reshape(3, -1).T
    moved_mm = (grid @ rot.T + offset) @ anat.affine[:3, :3].T + anat.affine[:3, 3]
    blobs = {}
    for name, c in centres.items():
        inside = np.linalg.norm(moved_mm - np.array(c, float), axis=1) <= 4.5
        blobs[name] = inside.reshape(image.shape)
        image[blobs[name]] *= 1.5  # relative: both sides of a pair share the local bias field
    found = segment_wmh(image, anat.zooms)
    kept = segment_wmh(image, anat.zooms, params=SegmentConfig(drop_symmetric=False))
    hit = {k: (found & b).sum() / b.sum() for k, b in blobs.items()}
    hit_kept = {k: (kept & b).sum() / b.sum() for k, b in blobs.items()}
    print("found", {k: round(v, 2) for k, v in hit.items()}, "kept", hit_kept)
    assert min(hit_kept.values()) > 0.5  # all four are found without the symmetry step
    assert hit["pair_r"] == 0 and hit["pair_l"] == 0
    assert hit["lone"] > 0.5 and hit["midline"] > 0.5


@pytest.mark.slow
def test_fine_scans_are_segmented_at_the_working_spacing(phantom_cohort):
    """A scan finer than the working spacing is box-averaged to it first: a 2 mm phantom whose
    voxels are split in 2×2×2 and declared 1 mm, segmented with a 2 mm working spacing, gives the
    2 mm result on the fine grid, voxel for voxel."""
    path = sorted(phantom_cohort.glob("sub-*/anat/*_FLAIR.nii.gz"))[0]
    img = nib.load(path)
    coarse = np.asarray(img.dataobj, dtype=np.float32)
    fine = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    expected = segment_wmh(coarse, (2.0, 2.0, 2.0))
    assert expected.sum() > 20
    got = segment_wmh(fine, (1.0, 1.0, 1.0), params=SegmentConfig(working_mm=2.0))
    assert got.shape == fine.shape
    assert np.array_equal(got, expected.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_segment_qc_png(phantom_cohort, tmp_path):
    flair = sorted(phantom_cohort.glob("sub-*/anat/*_FLAIR.nii.gz"))[0]
    out, qc = tmp_path / "m.nii.gz", tmp_path / "qc.png"
    res = run_cli("segment", "--flair", flair, "--out", out, "--qc", qc)
    assert res.exit_code == 0, res.stderr
    assert qc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and qc.stat().st_size > 10_000
    # an existing or non-PNG --qc is refused before anything is written
    for bad in (qc, tmp_path / "qc.jpg"):
        out2 = tmp_path / "m2.nii.gz"
        res = run_cli("segment", "--flair", flair, "--out", out2, "--qc", bad)
        assert_user_error(res, "--qc")
        assert not out2.exists() and not (tmp_path / "qc.jpg").exists()


def test_qc_slices_show_every_lesion_slice():
    from nmosd_ms.viz import lesion_slices

    extent = np.zeros((8, 8, 40), bool)
    extent[..., 10:30] = True
    mask = np.zeros_like(extent)
    mask[2, 2, [12, 27]] = True
    zs = lesion_slices(mask, extent, n=6)
    assert len(zs) == 6 and {12, 27} <= set(zs) and all(10 <= z < 30 for z in zs)
    mask[:, :, 10:30] = True
    mask[:4, :, 15] = False  # the fullest slices win when there are more than n
    zs = lesion_slices(mask, extent, n=6)
    assert len(zs) == 6 and 15 not in zs


def test_bilateral_cst_lesions_are_kept_by_prepare_but_not_by_segment():
    """The documented limit of the symmetry step, on a phantom with NMOSD-typical corticospinal
    lesions on both sides (1.7 ml a side): `segment`'s default drops the pair, --keep-symmetric
    (prepare's default) keeps it."""
    from nmosd_ms.phantom.anatomy import CST_PATH_RIGHT, load_anatomy, mirror, sample_path
    from nmosd_ms.phantom.generate import synth_flair
    from nmosd_ms.phantom.lesions import Lesion, paint

    anat = load_anatomy(2)
    tubes = []
    for path in (CST_PATH_RIGHT, mirror(CST_PATH_RIGHT)):
        pts = sample_path(path, 1.0)
        part = pts[int(len(pts) * 0.25) : int(len(pts) * 0.65)]
        tubes.append(Lesion("nmosd_cst", np.pi * 9 * len(part), tube=(part, 3.0)))
    lesion = paint(tubes, anat)
    assert 2.0 < lesion.sum() * np.prod(anat.zooms) / 1000 < 4.0
    flair = synth_flair(anat, lesion, np.random.default_rng(2))
    # at the phantom's realistic contrast (1.3-1.5x white matter) the segmentation finds few
    # thin tract lesions at all; this test is about the symmetry step, so the lesions are made
    # as bright as the first phantom drew them (1.85x), where both sides are found
    flair = np.where(lesion, flair * 1.85 / 1.4, flair).astype(np.float32)
    kept = segment_wmh(flair, anat.zooms, params=SegmentConfig(drop_symmetric=False))
    dropped = segment_wmh(flair, anat.zooms)
    recall = (kept & lesion).sum() / lesion.sum(), (dropped & lesion).sum() / lesion.sum()
    print(
        f"bilateral CST lesion recall: kept {recall[0]:.2f}, with the symmetry step {recall[1]:.2f}"
    )
    assert recall[0] > 0.9 and recall[1] < 0.1
    assert not PrepareConfig().segment_drop_symmetric
