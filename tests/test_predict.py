"""Bundles and prediction: equality with cv predictions, tampering, saliency on the native grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import shared_or_skip
from helpers import assert_user_error, run_cli

from nmosd_ms.data.bids import load_bids
from nmosd_ms.export import export_bundle
from nmosd_ms.predict import PREDICTIONS, load_bundle, predict_subjects


@pytest.fixture(scope="module")
def bundle_dir(small_run, tmp_path_factory):
    return export_bundle(small_run, "twoview-18", tmp_path_factory.mktemp("b") / "bundle")


def test_bundle_contents(bundle_dir):
    info = json.loads((bundle_dir / "model.json").read_text())
    assert info["model"] == "twoview-18" and info["size"] == 24 and len(info["files"]) == 3
    assert info["labels"] == ["MS", "NMOSD"] and info["training"]["n_subjects"] == 16
    assert set(info["cv_metrics"]) >= {"accuracy", "auc"}
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "Research use only" in card and "lr, ap" in card
    assert info["training"]["lesion_source"]["NMOSD"] == {"given": 8, "segmented": 0}
    assert "Lesion maps: MS 8 given, 0 segmented by nmosd-ms; NMOSD 8 given" in card


def test_predictions_equal_cv_fold_predictions(bundle_dir, small_run, phantom_cohort):
    cohort = load_bids(phantom_cohort)
    bundle = load_bundle(bundle_dir)
    subjects = list(cohort.subjects[:4])
    df = predict_subjects(bundle, subjects)
    cv = pd.read_csv(small_run / "results/predictions.tsv", sep="\t")
    cv = cv[(cv["model"] == "twoview-18") & (cv["repeat"] == 0)]
    for s in subjects:
        row = cv[cv["participant_id"] == s.participant_id].iloc[0]
        col = f"prob_repeat-0_fold-{row['fold']}"
        got = df.loc[df["participant_id"] == s.participant_id, col].iloc[0]
        assert got == pytest.approx(row["prob_nmosd"], abs=1e-5)
    probs = df[[c for c in df.columns if c.startswith("prob_repeat")]].to_numpy()
    assert np.allclose(df["prob_nmosd"], probs.mean(1))


def test_tampered_or_incomplete_bundle_is_refused(bundle_dir, tmp_path, phantom_cohort):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    w = sorted((bad / "weights").glob("*.safetensors"))[0]
    raw = bytearray(w.read_bytes())
    raw[-10] ^= 0xFF
    w.write_bytes(bytes(raw))
    lesion = next((phantom_cohort / "derivatives").rglob("*_desc-lesion_mask.nii.gz"))
    res = run_cli("predict", bad, "--lesion-mask", lesion, "--out", tmp_path / "o")
    assert_user_error(res, "altered")
    w.unlink()
    assert_user_error(run_cli("predict", bad, "--lesion-mask", lesion), "missing")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_predict_cli_and_saliency_on_native_scan(bundle_dir, tmp_path):
    root = shared_or_skip("lesjak2017", "sub-01")
    out = tmp_path / "pred"
    res = run_cli(
        "predict",
        bundle_dir,
        "--lesion-mask",
        root / "lesion_mask.nii.gz",
        "--brain-mask",
        root / "brain_mask.nii.gz",
        "--out",
        out,
        "--saliency",
        "--occlusion-size",
        "8",
    )
    assert res.exit_code == 0, res.stderr
    pred = pd.read_csv(out / PREDICTIONS, sep="\t")
    assert pred["participant_id"].tolist() == ["sub-subject"]  # BIDS labels in the derivative
    assert 0 <= pred["prob_nmosd"].iloc[0] <= 1 and pred["predicted"].iloc[0] in ("MS", "NMOSD")
    anat = out / "sub-subject" / "anat"
    sal = nib.load(anat / "sub-subject_space-orig_desc-saliency_FLAIR.nii.gz")
    side = json.loads((anat / "sub-subject_space-orig_desc-saliency_FLAIR.json").read_text())
    assert "log-odds" in side["Description"] and side["SpatialReference"].startswith("file:")
    src = nib.load(root / "lesion_mask.nii.gz")
    assert sal.shape == src.shape == (192, 512, 512)
    assert np.allclose(sal.affine, src.affine)
    data = np.asarray(sal.dataobj)
    assert np.abs(data).max() > 0
    # A genuine 3D map: it varies along every axis, not a 2D map smeared along one.
    for axis in range(3):
        assert np.abs(np.diff(data, axis=axis)).max() > 0
    assert (anat / "sub-subject_space-orig_desc-saliency_FLAIR.png").stat().st_size > 10_000


def test_occlusion_map_is_exact_on_a_model_that_sums_its_input():
    """Occluding cubes that hold no signal changes nothing, so the map is exactly 0 there; over
    the one bright voxel it is (nearly) the full drop in the log-odds of NMOSD."""
    import torch

    from nmosd_ms.interpret import occlusion_map

    class Sum(torch.nn.Module):
        def forward(self, x):
            s = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([-s, s], 1)

    volume = np.zeros((40, 40, 40), np.float32)
    volume[20, 20, 20] = 1.0
    sal = occlusion_map([Sum()], volume, mask_size=16, overlap=0.25)
    # log-odds of NMOSD = 2 × sum: 2 intact, 0 with the bright voxel fully occluded
    assert sal[0, 0, 0] == 0 and sal.min() == 0  # occlusion only ever lowers the sum here
    assert 1.0 < sal[20, 20, 20] <= 2.0 + 1e-6
    far = np.ones(volume.shape, bool)
    far[4:37, 4:37, 4:37] = False  # no cube covering these voxels reaches the bright one
    assert not sal[far].any()
    # two models: the mean of their maps
    both = occlusion_map([Sum(), Sum()], volume, mask_size=16, overlap=0.25)
    assert np.allclose(both, sal)


def test_predict_bad_inputs(bundle_dir, tmp_path):
    assert_user_error(run_cli("predict", bundle_dir), "nothing to predict")
    assert_user_error(
        run_cli("predict", bundle_dir, "--lesion-mask", tmp_path / "no.nii.gz"), "not found"
    )
    assert_user_error(run_cli("predict", tmp_path, "--lesion-mask", tmp_path), "not a regular file")
    assert_user_error(
        run_cli("predict", bundle_dir, "--lesion-mask", "/dev/zero"), "not a regular file"
    )


def test_fit_bundle_on_the_whole_cohort(prepared_small, phantom_cohort, tmp_path, monkeypatch):
    from nmosd_ms.training import device, loop

    seen, train = [], loop.train_torch_fold
    monkeypatch.setattr(
        loop,
        "train_torch_fold",
        lambda *a, **k: seen.append(torch.get_num_threads()) or train(*a, **k),
    )
    with device.torch_threads(2):  # tested on its own in test_devices
        res = run_cli(
            "fit",
            prepared_small,
            "--model",
            "twoview-18",
            "--out",
            tmp_path / "m",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
        )
        assert res.exit_code == 0, res.stderr
        assert seen == [1] and torch.get_num_threads() == 2  # trained with 1, then restored
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert len(info["files"]) == 1 and "whole cohort" in info["training"]["kind"]
    env = info["training"]["environment"]  # provenance: what it trained with
    assert (
        env["torch_threads"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__
    )
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    assert "not estimated" in card and "1 torch thread(s)" in card
    subject = load_bids(phantom_cohort).subjects[0]
    df = predict_subjects(load_bundle(tmp_path / "m"), [subject])
    assert 0 <= df["prob_nmosd"].iloc[0] <= 1
    assert_user_error(
        run_cli("fit", prepared_small, "--model", "twoview-18", "--out", tmp_path / "m"), "exists"
    )


def test_flair_alone_is_segmented_then_predicted(bundle_dir, phantom_cohort, tmp_path):
    flair = next(phantom_cohort.glob("sub-*/anat/*_FLAIR.nii.gz"))
    args = ("--flair", flair, "--participant-id", "p1", "--out", tmp_path / "o", "--saliency")
    res = run_cli("predict", bundle_dir, *args)
    assert res.exit_code == 0, res.stderr
    anat = tmp_path / "o" / "sub-p1" / "anat"
    # outline: the segmentation
    assert (anat / "sub-p1_space-orig_desc-saliency_FLAIR.png").stat().st_size > 0
    pred = pd.read_csv(tmp_path / "o" / PREDICTIONS, sep="\t")
    assert pred.loc[0, "participant_id"] == "sub-p1" and pred.loc[0, "lesion_source"] == "segmented"
    # the segmentation the model saw is written, and it is what `nmosd-ms segment` gives
    assert pred.loc[0, "segmentation"] == "sub-p1/anat/sub-p1_space-orig_label-WMH_mask.nii.gz"
    seen = nib.load(anat / "sub-p1_space-orig_label-WMH_mask.nii.gz")
    assert (anat / "sub-p1_space-orig_label-WMH_mask.png").stat().st_size > 10_000
    side = json.loads((anat / "sub-p1_space-orig_label-WMH_mask.json").read_text())
    assert side["Type"] == "Lesion" and side["SpatialReference"] == flair.resolve().as_uri()
    # the bundle's preprocessing is prepare's: symmetric lesions kept
    args = ("--flair", flair, "--out", tmp_path / "s.nii.gz", "--keep-symmetric")
    assert run_cli("segment", *args).exit_code == 0
    alone = nib.load(tmp_path / "s.nii.gz")
    assert np.allclose(seen.affine, nib.load(flair).affine)
    assert np.array_equal(np.asarray(seen.dataobj), np.asarray(alone.dataobj))
    assert_user_error(
        run_cli("predict", bundle_dir, "--flair", flair, "--out", tmp_path / "o"),
        "already holds predictions",
    )


def test_predict_manifest(bundle_dir, phantom_cohort, tmp_path):
    subjects = load_bids(phantom_cohort).subjects[:2]
    rows = ["participant_id\tlesion_mask"] + [
        f"{s.participant_id}\t{s.lesion_mask}" for s in subjects
    ]
    manifest = tmp_path / "new.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    res = run_cli("predict", bundle_dir, "--manifest", manifest, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    pred = pd.read_csv(tmp_path / "o" / PREDICTIONS, sep="\t")
    assert pred["participant_id"].tolist() == [s.participant_id for s in subjects]
    manifest.write_text("\n".join(rows + [rows[1]]) + "\n")
    assert_user_error(run_cli("predict", bundle_dir, "--manifest", manifest), "duplicate")
    manifest.write_text("participant_id\tage\nx\t3\n")
    assert_user_error(run_cli("predict", bundle_dir, "--manifest", manifest), "lesion_mask")


def test_an_empty_or_unusual_map_is_predicted_with_a_note(bundle_dir, phantom_cohort, tmp_path):
    """Every training subject had lesions: an empty map still gets a row (a batch is not lost
    to one subject), with its load and a note saying the output is no evidence; the CLI table
    shows the note."""
    from nmosd_ms.predict import scope_note

    s = load_bids(phantom_cohort).subjects[0]
    img = nib.load(s.lesion_mask)
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(empty))
    rows = ["participant_id\tlesion_mask", f"{s.participant_id}\t{s.lesion_mask}", f"new\t{empty}"]
    manifest = tmp_path / "new.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    res = run_cli("predict", bundle_dir, "--manifest", manifest, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.stderr
    assert "not evidence" in " ".join(res.stdout.split())
    pred = pd.read_csv(tmp_path / "o" / PREDICTIONS, sep="\t", keep_default_na=False)
    assert pred["n_lesions"].tolist()[1] == 0 and pred["lesion_ml"].tolist()[1] == 0
    assert pred["n_lesions"].tolist()[0] > 0 and pred["lesion_ml"].tolist()[0] > 0
    assert pred["note"].tolist()[0] == "" and "no lesion" in pred["note"].tolist()[1]
    sidecar = json.loads((tmp_path / "o" / PREDICTIONS).with_suffix(".json").read_text())
    assert {"n_lesions", "lesion_ml", "note"} <= set(sidecar)

    summary = {"quantiles": [0.1, 0.5, 0.9], "load": {"MS": {"total_ml": [2.0, 9.0, 30.0]}}}
    summary["load"]["NMOSD"] = {"total_ml": [1.0, 5.0, 20.0]}
    assert scope_note({"n_lesions": 3, "total_ml": 0.5}, summary).startswith("lesion volume 0.5")
    assert "90th" in scope_note({"n_lesions": 40, "total_ml": 45.0}, summary)
    assert scope_note({"n_lesions": 12, "total_ml": 1.5}, summary) == ""
    assert scope_note({"n_lesions": 12, "total_ml": 99.0}, None) == ""
    empty = {"n_lesions": 0, "total_ml": 0.0}
    assert "not evidence" in scope_note(empty, {**summary, "no_lesion": {"MS": 0, "NMOSD": 0}})
    assert "as 3 maps" in scope_note(empty, {**summary, "no_lesion": {"MS": 0, "NMOSD": 3}})
