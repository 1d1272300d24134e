"""Real BIDS layouts in (sessions, several acquisitions, label-/desc-/sidecar-typed lesion masks,
entity filters), BIDS derivatives out, and the reference validator on both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers import assert_user_error, bids_errors, run_cli

from nmosd_ms.data.bids import load_bids, parse_bids_filters
from nmosd_ms.errors import NmosdError


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


@pytest.fixture(scope="module")
def two_sessions(phantom_cohort, tmp_path_factory) -> Path:
    """Every phantom participant scanned twice (ses-01, ses-02), each session with two FLAIR
    acquisitions (acq-3D, acq-2D); lesion masks named three ways: label-lesion (ses-01),
    space-orig_desc-lesion (ses-02, most), a plain mask typed by its sidecar (one)."""
    root = tmp_path_factory.mktemp("bids2") / "ds"
    src = load_bids(phantom_cohort)
    shutil.copyfile(phantom_cohort / "participants.tsv", _copy_dir(root) / "participants.tsv")
    shutil.copyfile(phantom_cohort / "participants.json", root / "participants.json")
    description = json.loads((phantom_cohort / "dataset_description.json").read_text())
    (root / "dataset_description.json").write_text(json.dumps(description))
    deriv = root / "derivatives" / "lesions"
    _copy(
        phantom_cohort / "derivatives" / "lesions" / "dataset_description.json",
        deriv / "dataset_description.json",
    )
    for i, s in enumerate(src.subjects):
        pid = s.participant_id
        for ses in ("ses-01", "ses-02"):
            anat = root / pid / ses / "anat"
            for acq in ("3D", "2D"):
                _copy(s.flair, anat / f"{pid}_{ses}_acq-{acq}_FLAIR.nii.gz")
            danat = deriv / pid / ses / "anat"
            if ses == "ses-01":
                _copy(s.lesion_mask, danat / f"{pid}_{ses}_acq-3D_label-lesion_mask.nii.gz")
            elif i == 0:  # named by its sidecar only
                mask = _copy(s.lesion_mask, danat / f"{pid}_{ses}_desc-manual_mask.nii.gz")
                mask.with_name(mask.name.replace(".nii.gz", ".json")).write_text(
                    json.dumps({"Type": "Lesion"})
                )
            else:
                _copy(s.lesion_mask, danat / f"{pid}_{ses}_space-orig_desc-lesion_mask.nii.gz")
    return root


def _copy_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


def test_sessions_acquisitions_and_every_mask_naming_are_read(two_sessions):
    with pytest.raises(NmosdError, match="2 FLAIRs match"):  # two acquisitions: choose one
        load_bids(two_sessions)
    cohort = load_bids(two_sessions, filters=parse_bids_filters(["acq=3D"]))
    assert len(cohort) == 32  # 16 participants x 2 sessions
    assert {s.session_id for s in cohort.subjects} == {"ses-01", "ses-02"}
    assert all("acq-3D" in s.flair.name for s in cohort.subjects)
    names = {s.lesion_mask.name.split("_", 2)[-1] for s in cohort.subjects}
    assert names == {
        "acq-3D_label-lesion_mask.nii.gz",
        "space-orig_desc-lesion_mask.nii.gz",
        "desc-manual_mask.nii.gz",
    }
    assert len({s.key for s in cohort.subjects}) == 32
    assert cohort.extra["participants"]["sub-001"]["diagnosis"] in ("NMOSD", "MS")


def test_two_sessions_prepare_and_cross_validate_by_participant(two_sessions, tmp_path):
    cache, run = tmp_path / "c", tmp_path / "r"
    res = run_cli(
        "prepare", two_sessions, "--out", cache, "--size", "16", "--bids-filter", "acq=3D"
    )
    assert res.exit_code == 0, res.stderr
    index = pd.read_csv(cache / "index.tsv", sep="\t")
    assert len(index) == 32 and set(index["session_id"]) == {"ses-01", "ses-02"}
    features = pd.read_csv(cache / "features.tsv", sep="\t")
    assert list(features.columns[:3]) == ["participant_id", "session_id", "diagnosis"]
    res = run_cli(
        "cv",
        cache,
        "--out",
        run,
        "--models",
        "lesionload-logreg",
        "--repeats",
        "3",
        "--folds",
        "4",
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.stderr
    splits = pd.read_csv(run / "splits.tsv", sep="\t")
    assert "session_id" in splits
    for (_r, _k), g in splits.groupby(["repeat", "fold"]):
        train = set(g.loc[g.part == "train", "participant_id"])
        test = set(g.loc[g.part == "test", "participant_id"])
        assert not train & test  # no person on both sides of a fold, sessions and all
        assert len(g) == 32
    pred = pd.read_csv(run / "results" / "predictions.tsv", sep="\t")
    assert {"participant_id", "session_id"} <= set(pred.columns)
    assert len(pred) == 32 * 3 * 2  # every scan tested once per repeat, two models
    res = run_cli("report", run)
    assert res.exit_code == 0, res.stderr
    subjects = pd.read_csv(run / "report" / "subjects.tsv", sep="\t")
    assert len(subjects) == 32 * 2  # per scan and model


@pytest.mark.parametrize("case", ["filter", "no-mask", "other-grid", "bad-filter"])
def test_bad_bids_is_one_error_naming_the_file_and_nothing_written(two_sessions, tmp_path, case):
    ds = tmp_path / "ds"
    shutil.copytree(two_sessions, ds)
    args = ["prepare", ds, "--out", tmp_path / "c", "--size", "16", "--bids-filter", "acq=3D"]
    if case == "filter":
        args[-1] = "acq=7T"
        expected = ("no FLAIR matches the BIDS filter acq=7T",)
    elif case == "bad-filter":
        args[-1] = "colour=red"
        expected = ("unknown or unsupported BIDS filter entity 'colour'",)
    elif case == "no-mask":
        gone = next((ds / "derivatives/lesions/sub-002/ses-02/anat").glob("*_mask.nii.gz"))
        gone.unlink()
        expected = ("participant sub-002 session ses-02: no lesion mask",)
    else:
        mask = next((ds / "derivatives/lesions/sub-003/ses-01/anat").glob("*_mask.nii.gz"))
        img = nib.load(mask)
        data = np.asarray(img.dataobj)[:-2]
        nib.save(nib.Nifti1Image(data, img.affine), str(mask))
        expected = ("sub-003_ses-01", "lesion mask", "grid")
    assert_user_error(run_cli(*args), *expected)
    assert not (tmp_path / "c").exists()


def test_filter_file_and_its_errors(two_sessions, tmp_path):
    f = tmp_path / "filters.json"
    f.write_text(json.dumps({"flair": {"acquisition": "2D"}, "lesion_mask": {}}))
    filters = parse_bids_filters(None, f)
    assert filters["flair"] == {"acquisition": "2D"}
    with pytest.raises(NmosdError, match="ses-01: no lesion mask for sub-001_ses-01_acq-2D"):
        load_bids(two_sessions, filters=filters)  # ses-01's masks are the acq-3D FLAIR's
    cohort = load_bids(two_sessions, filters=filters, require_lesion_masks=False)
    assert all("acq-2D" in s.flair.name for s in cohort.subjects)
    # the 2D FLAIR gets the masks without an acquisition entity, never the acq-3D ones
    assert all((s.lesion_mask is None) == (s.session_id == "ses-01") for s in cohort.subjects)
    f.write_text(json.dumps({"t1w": {"acq": "x"}}))
    with pytest.raises(NmosdError, match="filter file"):
        parse_bids_filters(None, f)
    with pytest.raises(NmosdError, match="KEY=VALUE"):
        parse_bids_filters(["acq"])


# --- the reference validator ------------------------------------------------------------------


def test_the_phantom_cohort_is_valid_bids(phantom_cohort):
    assert bids_errors(phantom_cohort) == []


def test_the_sessions_dataset_is_valid_bids(two_sessions):
    assert bids_errors(two_sessions) == []


@pytest.mark.parametrize("name", ["sub-1_mask.nii.gz", "sub-1_mask.nii"])
def test_montage_and_sidecar_are_named_beside_the_image_whatever_its_extension(name):
    from nmosd_ms.derivatives import montage_path, sidecar_path

    image = Path("out/sub-1/anat") / name
    assert montage_path(image) == Path("out/sub-1/anat/sub-1_mask.png")
    assert sidecar_path(image) == Path("out/sub-1/anat/sub-1_mask.json")


@pytest.mark.parametrize(
    "name, ids",
    [
        ("sub-01_ses-02_acq-3D_FLAIR.nii.gz", ("sub-01", "ses-02")),
        ("sub-A1_FLAIR.nii", ("sub-A1", "")),
        ("sub-01_run-1_FLAIR.nii.gz", ("sub-01", "")),
        ("flair_sub-7_ses-b.nii.gz", ("sub-7", "ses-b")),
        ("FLAIR.nii.gz", None),
        ("nosub-01_FLAIR.nii.gz", None),
    ],
)
def test_the_ids_a_bids_file_name_carries(name, ids):
    """What `segment --out FOLDER` names a mask for when no participant is given."""
    from nmosd_ms.ids import ids_in_bids_name

    assert ids_in_bids_name(name) == ids


@pytest.mark.slow
def test_segment_writes_a_valid_derivative_dataset(two_sessions, tmp_path):
    out = tmp_path / "wmh"
    flair = next((two_sessions / "sub-001" / "ses-02" / "anat").glob("*acq-3D_FLAIR.nii.gz"))
    res = run_cli("segment", "--flair", flair, "--out", out)
    assert res.exit_code == 0, res.stderr
    mask = out / "sub-001/ses-02/anat/sub-001_ses-02_space-orig_label-WMH_mask.nii.gz"
    assert mask.is_file() and mask.with_name(mask.name.replace(".nii.gz", ".png")).is_file()
    side = json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())
    assert side["SpatialReference"] == flair.resolve().as_uri() and side["Type"] == "Lesion"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "nmosd-ms"
    other = next((two_sessions / "sub-002" / "ses-01" / "anat").glob("*acq-3D_FLAIR.nii.gz"))
    assert run_cli("segment", "--flair", other, "--out", out).exit_code == 0  # adds to it
    assert set(pd.read_csv(out / "participants.tsv", sep="\t")["participant_id"]) == {
        "sub-001",
        "sub-002",
    }
    assert_user_error(run_cli("segment", "--flair", flair, "--out", out), "never overwritten")
    assert bids_errors(out) == []


@pytest.mark.slow
def test_prepare_segmentations_and_predictions_are_valid_derivatives(
    two_sessions, small_run, tmp_path
):
    from nmosd_ms.export import export_bundle
    from nmosd_ms.predict import PREDICTIONS

    # prepare --segment-missing keeps its masks as a derivative dataset inside the cache
    ds = tmp_path / "ds"
    shutil.copytree(two_sessions, ds)
    for m in (ds / "derivatives/lesions/sub-001").rglob("*_mask.nii.gz"):
        m.unlink()
    cache = tmp_path / "c"
    res = run_cli(
        "prepare",
        ds,
        "--out",
        cache,
        "--size",
        "16",
        "--bids-filter",
        "acq=3D",
        "--segment-missing",
    )
    assert res.exit_code == 0, res.stderr
    segs = sorted((cache / "segmentations").rglob("*_mask.nii.gz"))
    assert [p.name.split("_desc-")[0] for p in segs] == [
        "sub-001_ses-01_space-orig_label-WMH",
        "sub-001_ses-02_space-orig_label-WMH",
    ]
    assert bids_errors(cache / "segmentations") == []

    # predict: predictions, segmentations and saliency maps as a derivative dataset
    bundle = export_bundle(small_run, "twoview-18", tmp_path / "b")
    subjects = load_bids(ds, filters=parse_bids_filters(["acq=3D"]), require_lesion_masks=False)
    rows = [s for s in subjects.subjects if s.participant_id in ("sub-001", "sub-002")]
    manifest = tmp_path / "new.tsv"
    pd.DataFrame(
        {
            "participant_id": [s.participant_id for s in rows],
            "session_id": [s.session_id for s in rows],
            "flair": [str(s.flair) for s in rows],
            "lesion_mask": [str(s.lesion_mask or "") for s in rows],
        }
    ).to_csv(manifest, sep="\t", index=False)
    out = tmp_path / "pred"
    res = run_cli(
        "predict",
        bundle,
        "--manifest",
        manifest,
        "--out",
        out,
        "--saliency",
        "--occlusion-size",
        "8",
    )
    assert res.exit_code == 0, res.stderr
    pred = pd.read_csv(out / PREDICTIONS, sep="\t")
    assert list(pred[["participant_id", "session_id"]].itertuples(index=False, name=None)) == [
        (s.participant_id, s.session_id) for s in rows
    ]
    sidecar = json.loads((out / PREDICTIONS.with_suffix(".json")).read_text())
    assert set(pred.columns) <= set(sidecar) and sidecar["MeasurementToolMetadata"]["model"]
    assert (pred["lesion_source"] == "segmented").sum() == 2  # sub-001's FLAIRs alone
    for rel in pred["saliency"]:
        assert (out / rel).is_file() and "_desc-saliency_FLAIR" in rel
    description = json.loads((out / "dataset_description.json").read_text())
    assert str(Path(bundle).resolve()) in description["GeneratedBy"][0]["Description"]
    assert bids_errors(out) == []
