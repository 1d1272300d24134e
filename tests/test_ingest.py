"""Cohort ingestion: both input forms, and every rejection as one line + exit code 2."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import blob_mask, make_manifest_cohort, save_nifti, truncate_gzip
from helpers import assert_user_error, cached_array, cached_path, run_cli

from nmosd_ms.data.bids import load_bids
from nmosd_ms.data.dataset import load_cohort
from nmosd_ms.data.ingest import load_manifest


def _prepare(tmp_path, manifest, *extra):
    return run_cli("prepare", manifest, "--out", tmp_path / "cache", "--size", "16", *extra)


def test_manifest_and_bids_are_read(tmp_path, phantom_cohort):
    cohort = load_manifest(make_manifest_cohort(tmp_path))
    assert len(cohort) == 6 and cohort.counts == {"MS": 3, "NMOSD": 3}
    bids = load_bids(phantom_cohort)
    assert len(bids) == 16 and all(s.lesion_mask is not None for s in bids.subjects)
    assert bids.subjects[0].flair.name.endswith("_FLAIR.nii.gz")


def test_prepare_cli_writes_cache(tmp_path):
    manifest = make_manifest_cohort(tmp_path)
    result = _prepare(tmp_path, manifest)
    assert result.exit_code == 0, result.stderr
    cache = tmp_path / "cache"
    for name in ("index.tsv", "prepare.json", "features.tsv", "spatial.json"):
        assert (cache / name).is_file()
    assert cached_path(cache, "sub-00").is_file()
    assert cached_array(cache, "sub-00").shape == (16, 16, 16)


def _edit_manifest(manifest, old, new):
    manifest.write_text(manifest.read_text().replace(old, new, 1))


@pytest.mark.parametrize(
    "mutate, fragments",
    [
        (lambda d, m: (d / "sub-01" / "lesion.nii.gz").unlink(), ["not found", "sub-01"]),
        (lambda d, m: _edit_manifest(m, "sub-01\t", "sub-00\t"), ["duplicate", "sub-00"]),
        (lambda d, m: _edit_manifest(m, "NMOSD", "MOGAD"), ["unknown diagnosis", "MOGAD"]),
        (lambda d, m: truncate_gzip(d / "sub-02" / "flair.nii.gz"), ["cannot read", "sub-02"]),
        (
            lambda d, m: save_nifti(d / "sub-03" / "flair.nii.gz", np.zeros((24, 28, 20, 2))),
            ["4D", "3D image is needed"],
        ),
        (
            lambda d, m: save_nifti(
                d / "sub-04" / "flair.nii.gz", np.full((24, 28, 20), np.nan, np.float32)
            ),
            ["NaN"],
        ),
        (
            lambda d, m: save_nifti(d / "sub-05" / "lesion.nii.gz", blob_mask((24, 28, 21))),
            ["shape", "same grid"],
        ),
        (
            lambda d, m: save_nifti(
                d / "sub-05" / "lesion.nii.gz", blob_mask(), np.diag([1.0, 1.0, 1.3, 1.0])
            ),
            ["different affines"],
        ),
    ],
    ids=["missing", "duplicate", "label", "truncated", "4d", "nan", "shape", "affine"],
)
def test_rejections(tmp_path, mutate, fragments):
    manifest = make_manifest_cohort(tmp_path)
    mutate(tmp_path, manifest)
    result = _prepare(tmp_path, manifest)
    assert_user_error(result, *fragments)
    assert not (tmp_path / "cache").exists(), "a rejected cohort must not leave partial output"


def test_4d_with_one_volume_is_squeezed_and_empty_mask_is_valid(tmp_path):
    manifest = make_manifest_cohort(tmp_path)
    flair = nib.load(tmp_path / "sub-00" / "flair.nii.gz").get_fdata()
    save_nifti(tmp_path / "sub-00" / "flair.nii.gz", flair[..., None].astype(np.float32))
    save_nifti(tmp_path / "sub-01" / "lesion.nii.gz", np.zeros((24, 28, 20), np.uint8))
    result = _prepare(tmp_path, manifest)
    assert result.exit_code == 0, result.stderr
    assert cached_array(tmp_path / "cache", "sub-01").max() == 0


def test_bids_rejections(tmp_path, phantom_cohort):
    assert_user_error(
        run_cli("prepare", tmp_path / "nowhere", "--out", tmp_path / "c"), "not found"
    )
    assert_user_error(
        run_cli("prepare", phantom_cohort, "--out", tmp_path / "c", "--lesions", "manual"),
        "derivatives",
        "manual",
    )
    assert_user_error(
        run_cli("prepare", phantom_cohort, "--out", tmp_path / "c", "--label-column", "sex"),
        "unknown sex",
    )


def test_training_needs_two_classes_and_enough_subjects(tmp_path, prepared_small):
    from nmosd_ms.data.ingest import check_trainable
    from nmosd_ms.errors import NmosdError

    with pytest.raises(NmosdError, match="one class only"):
        check_trainable(["MS"] * 10, folds=5)
    with pytest.raises(NmosdError, match="fewer than the 5 folds"):
        check_trainable(["MS"] * 10 + ["NMOSD"] * 4, folds=5)
    result = run_cli(
        "cv",
        prepared_small,
        "--out",
        tmp_path / "run",
        "--folds",
        "9",
        "--models",
        "lesionload-logreg",
        "--repeats",
        "1",
    )
    assert_user_error(result, "fewer than the 9 folds")
    assert not (tmp_path / "run").exists()


def test_load_cohort_refuses_unknown_dataset(tmp_path):
    from nmosd_ms.errors import NmosdError

    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(NmosdError, match="neither a BIDS folder"):
        load_cohort(tmp_path / "x.txt")


def test_segment_missing_masks_are_recorded(tmp_path):
    manifest = make_manifest_cohort(tmp_path)
    _edit_manifest(manifest, "sub-02/lesion.nii.gz", "")
    assert_user_error(_prepare(tmp_path, manifest), "no lesion mask", "--segment-missing")
    result = _prepare(tmp_path, manifest, "--segment-missing")
    assert result.exit_code == 0, result.stderr
    index = pd.read_csv(tmp_path / "cache" / "index.tsv", sep="\t")
    sources = dict(zip(index["participant_id"], index["lesion_source"], strict=True))
    assert sources["sub-02"] == "segmented" and sources["sub-00"] == "given"
    files = dict(zip(index["participant_id"], index["segmentation"].fillna(""), strict=True))
    assert re.fullmatch(
        r"segmentations/sub-02/anat/sub-02_space-orig_label-WMH_desc-[0-9a-f]{16}_mask\.nii\.gz",
        files["sub-02"],
    )  # in a BIDS derivative dataset inside the cache
    seg_root = tmp_path / "cache" / "segmentations"
    assert json.loads((seg_root / "dataset_description.json").read_text())["DatasetType"] == (
        "derivative"
    )
    assert files["sub-00"] == ""
    params = json.loads((tmp_path / "cache" / "prepare.json").read_text())["params"]
    assert params["segment_missing"] and not params["segment_drop_symmetric"]  # off in prepare
    # --drop-symmetric is a different preprocessing: every subject is prepared again, and recorded
    result = _prepare(tmp_path, manifest, "--segment-missing", "--drop-symmetric")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "cache" / "prepare.json").read_text())
    assert summary["reused"] == 0 and summary["params"]["segment_drop_symmetric"]
    # the new mask keeps its sidecar and montage; the old one's three files are gone
    index = pd.read_csv(tmp_path / "cache" / "index.tsv", sep="\t").fillna("")
    new = dict(zip(index["participant_id"], index["segmentation"], strict=True))["sub-02"]
    assert new != files["sub-02"]
    for rel, present in ((new, True), (files["sub-02"], False)):
        for suffix in (".nii.gz", ".json", ".png"):
            path = tmp_path / "cache" / rel.replace(".nii.gz", suffix)
            assert path.is_file() == present, path


def test_bids_subject_without_mask_points_to_segment_missing(phantom_cohort, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(phantom_cohort, bids)
    shutil.rmtree(bids / "derivatives" / "lesions" / "sub-003")
    args = ("prepare", bids, "--out", tmp_path / "c", "--size", "16")
    assert_user_error(run_cli(*args), "sub-003: no lesion mask", "--segment-missing")
    assert not (tmp_path / "c").exists()
    res = run_cli(*args, "--segment-missing")
    assert res.exit_code == 0, res.stderr
    index = pd.read_csv(tmp_path / "c" / "index.tsv", sep="\t").set_index("participant_id")
    assert (index["lesion_source"] == "segmented").sum() == 1
    assert index.loc["sub-003", "segmentation"].startswith("segmentations/sub-003/anat/sub-003_")


def test_prepare_keeps_each_segmentation_for_review(phantom_cohort, tmp_path):
    """A phantom FLAIR given without its mask: the cache holds the WMH mask prepare made, on the
    FLAIR's grid; it is the lesion image that was used and what `nmosd-ms segment
    --keep-symmetric` gives (prepare's default)."""
    subjects = load_bids(phantom_cohort).subjects
    s = next(x for x in subjects if nib.load(x.lesion_mask).get_fdata().sum() > 50)
    manifest = tmp_path / "m.tsv"
    manifest.write_text(
        "participant_id\tdiagnosis\tflair\tlesion_mask\n"
        f"{s.participant_id}\t{s.diagnosis}\t{s.flair}\t\n"
    )
    cache = tmp_path / "cache"
    res = run_cli("prepare", manifest, "--out", cache, "--size", "16", "--segment-missing")
    assert res.exit_code == 0, res.stderr
    row = pd.read_csv(cache / "index.tsv", sep="\t").iloc[0]
    seg = nib.load(cache / row["segmentation"])
    png = cache / row["segmentation"].replace(".nii.gz", ".png")  # the montage for review
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert np.allclose(seg.affine, nib.load(s.flair).affine)
    assert int(np.asarray(seg.dataobj).sum()) == row["lesion_voxels"] > 0
    args = ("--flair", s.flair, "--out", tmp_path / "s.nii.gz", "--keep-symmetric")
    assert run_cli("segment", *args).exit_code == 0  # prepare keeps symmetric lesions
    alone = np.asarray(nib.load(tmp_path / "s.nii.gz").dataobj)
    assert np.array_equal(np.asarray(seg.dataobj), alone)


@pytest.mark.parametrize(
    "verb",
    [
        "phantom",
        "segment",
        "prepare",
        "models",
        "cv",
        "report",
        "export",
        "fit",
        "predict",
        "evaluate",
        "demo",
    ],  # fmt: skip
)
def test_every_verb_has_help(verb):
    result = run_cli(verb, "--help")
    assert result.exit_code == 0 and "Usage" in result.stdout
