"""Cross-validation engine on a tiny generated cohort (small S, few epochs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import RUN_MODELS, make_manifest_cohort, small_cv_config
from helpers import assert_user_error, cv_command, run_cli, spawn, wait_for

from nmosd_ms.config import CVConfig, PrepareConfig, TrainConfig
from nmosd_ms.data.cache import prepare
from nmosd_ms.data.ingest import load_manifest
from nmosd_ms.evaluation.metrics import binary_metrics
from nmosd_ms.models import get_spec
from nmosd_ms.training.cv import DETERMINISTIC_COLUMNS, executor_for, run_cv
from nmosd_ms.training.executors import LocalExecutor

_cfg = small_cv_config
EPOCHS = _cfg().train.epochs


@pytest.fixture
def reference_run(small_run):
    return small_run


def _tsv(path):
    return pd.read_csv(path, sep="\t", dtype={"participant_id": str})


def test_files_and_row_counts(reference_run):
    r = reference_run
    for name in (
        "run.json",
        "splits.tsv",
        "README.md",
        "results/folds.tsv",
        "results/predictions.tsv",
        "results/curves.tsv",
    ):
        assert (r / name).is_file(), name
    folds = _tsv(r / "results/folds.tsv")
    preds = _tsv(r / "results/predictions.tsv")
    curves = _tsv(r / "results/curves.tsv")
    assert len(folds) == len(RUN_MODELS) * 2 * 3
    assert len(preds) == len(RUN_MODELS) * 2 * 16  # every subject once per repeat and model
    assert len(curves) == 2 * 3 * EPOCHS  # torch model only
    for k in range(3):
        assert (r / f"models/twoview-18/repeat-1/fold-{k}.safetensors").is_file()
        assert (r / f"models/twoview-18/repeat-1/fold-{k}.json").is_file()


def test_splits_are_identical_across_models_and_leak_free(reference_run):
    splits = _tsv(reference_run / "splits.tsv")
    preds = _tsv(reference_run / "results/predictions.tsv")
    for (rep, fold), g in splits.groupby(["repeat", "fold"]):
        test = set(g.loc[g.part == "test", "participant_id"])
        train = set(g.loc[g.part == "train", "participant_id"])
        assert not test & train and len(test | train) == 16
        for model in RUN_MODELS:
            p = preds[
                (preds["model"] == model) & (preds["repeat"] == rep) & (preds["fold"] == fold)
            ]
            assert set(p.participant_id) == test


def test_fold_metrics_recompute_from_predictions(reference_run):
    folds = _tsv(reference_run / "results/folds.tsv")
    preds = _tsv(reference_run / "results/predictions.tsv")
    for _, row in folds.iterrows():
        p = preds[
            (preds["model"] == row["model"])
            & (preds["repeat"] == row["repeat"])
            & (preds["fold"] == row["fold"])
        ]
        assert len(p) == row["n_test"]
        m = binary_metrics((p.diagnosis == "NMOSD").astype(int), p.prob_nmosd)
        for key in ("accuracy", "sensitivity", "specificity", "balanced_accuracy"):
            assert m[key] == pytest.approx(row[key], rel=0, abs=1e-12)
        assert m["auc"] == pytest.approx(row["auc"], nan_ok=True)


def test_same_seed_gives_identical_folds(reference_run, prepared_small, tmp_path):
    run_cv(
        prepared_small, tmp_path / "again", _cfg(), device="cpu", executor=LocalExecutor(threads=1)
    )
    a = _tsv(reference_run / "results/folds.tsv")[DETERMINISTIC_COLUMNS]
    b = _tsv(tmp_path / "again/results/folds.tsv")[DETERMINISTIC_COLUMNS]
    pd.testing.assert_frame_equal(a, b)


def test_changed_options_are_refused(reference_run, prepared_small):
    result = run_cli(
        "cv",
        prepared_small,
        "--out",
        reference_run,
        "--models",
        "twoview-18",
        "--repeats",
        "2",
        "--folds",
        "3",
        "--seed",
        "8",
        "--epochs",
        "2",
    )
    assert_user_error(result, "different options", "seed")


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(reference_run, prepared_small, tmp_path):
    out = tmp_path / "killed"
    args = cv_command(prepared_small, out)
    proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: list(out.glob("folds/twoview-18/repeat-0/fold-*.json")), "a fold record", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    records = sorted(out.glob("folds/*/repeat-*/fold-*.json"))
    done_before = len(records)
    assert 0 < done_before < 18, "the kill should land mid-run"
    # The report of the stopped run: its finished folds, and it says so (cv rebuilds the result
    # tables at most once a minute, so they may lag behind the fold records or be missing).
    page, summary = _report(out, complete=False)
    assert sum(summary["finished_folds"].values()) == done_before
    assert summary["planned_folds"] == 6
    assert "Unfinished run" in page and "finished (of the planned 2 × 3)" in page
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    a = _tsv(reference_run / "results/folds.tsv")[DETERMINISTIC_COLUMNS]
    b = _tsv(out / "results/folds.tsv")[DETERMINISTIC_COLUMNS]
    pd.testing.assert_frame_equal(a, b)
    assert not list(out.rglob("*.tmp")), "no temporary files may remain"
    page, summary = _report(out, complete=True)
    assert summary["finished_folds"] == {m: 6 for m in summary["finished_folds"]}
    assert "Unfinished run" not in page and "mean of the 2 × 3 held-out" in page


def _report(run, complete: bool):
    result = run_cli("report", run)
    assert result.exit_code == 0, result.stderr
    assert ("note: the run is not finished" in result.stdout) is not complete, result.stdout
    summary = json.loads((run / "report" / "report.json").read_text())
    assert summary["complete"] is complete
    return (run / "report" / "index.html").read_text(), summary


@pytest.mark.slow
def test_dask_executor_matches_local(reference_run, prepared_small, tmp_path):
    reports = []
    run_cv(
        prepared_small,
        tmp_path / "dask",
        _cfg(),
        device="cpu",
        executor=executor_for("dask", workers=2, threads=1),
        progress=lambda done, total, label=None: reports.append((done, total, label)),
    )
    a = _tsv(reference_run / "results/folds.tsv")[DETERMINISTIC_COLUMNS]
    b = _tsv(tmp_path / "dask/results/folds.tsv")[DETERMINISTIC_COLUMNS]
    pd.testing.assert_frame_equal(a, b)
    # progress by epoch from the workers (Dask worker events), as with the local executor
    torch_folds = sum(get_spec(m).is_torch for m in b["model"])
    epochs = {lab for _, _, lab in reports if lab and " epoch " in lab}
    assert len(epochs) == torch_folds * EPOCHS
    assert reports[-1][0] == reports[-1][1] == len(a)


@pytest.mark.slow
def test_learnable_task_is_learned(tmp_path):
    """Class = lesion in the left vs the right half: the loop must learn it (not just run)."""
    manifest = make_manifest_cohort(tmp_path / "data", n_per_class=16)
    cache = tmp_path / "cache"
    prepare(load_manifest(manifest), cache, PrepareConfig(size=32))
    # batch 8 as in the paper: with BatchNorm in the compression block, tiny batches that hold
    # one class normalise the class signal away.
    train = TrainConfig(epochs=20, batch_size=8, shift=1, flip=False, lr=0.01)
    cfg = CVConfig(models=("twoview-18",), repeats=1, folds=4, seed=0, train=train)
    run_cv(cache, tmp_path / "run", cfg, device="cpu")
    folds = _tsv(tmp_path / "run/results/folds.tsv")
    folds = folds[folds["model"] == "twoview-18"]  # beside it: the lesion-load shortcut
    assert folds.accuracy.mean() >= 0.9, folds.accuracy.tolist()
    assert np.isfinite(folds.train_seconds).all()


def test_pretrained_and_scratch_variants_share_a_run(prepared_small, tmp_path, monkeypatch):
    """``twoview-18@imagenet`` next to ``twoview-18``: the paper's comparison on one split."""
    import torch

    from nmosd_ms.models import weights as W
    from nmosd_ms.models.networks import resnet_backbone

    ref = resnet_backbone(18, 2, 3)
    ref.fc = torch.nn.Linear(512, 1000)
    path = tmp_path / "hub" / "checkpoints" / "resnet18-test.pth"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setitem(
        W.IMAGENET, 18, W.WeightsSpec(f"https://x.invalid/{path.name}", W._sha256(path)[:8])
    )
    cfg = _cfg(models=("twoview-18", "twoview-18@imagenet"), repeats=1, shortcut=False)
    meta = run_cv(
        prepared_small, tmp_path / "run", cfg, device="cpu", executor=LocalExecutor(threads=1)
    )
    assert meta["models"]["twoview-18@imagenet"]["weights"] == "imagenet"
    assert meta["models"]["twoview-18"]["weights"] == "none"
    folds = _tsv(tmp_path / "run/results/folds.tsv")
    assert set(folds["model"]) == {"twoview-18", "twoview-18@imagenet"} and len(folds) == 6
    result = run_cli(
        "cv", prepared_small, "--out", tmp_path / "r2", "--models", "resnet3d-18@imagenet"
    )
    assert_user_error(result, "only for the 2D backbones")
