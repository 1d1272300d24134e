"""The benchmark tooling's bookkeeping (no timing is asserted: speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT


def test_protocol_summary_reads_the_run_records(small_run, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.protocol", str(small_run), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "protocol.json").read_text())
    folds = pd.read_csv(small_run / "results" / "folds.tsv", sep="\t")
    meta = json.loads((small_run / "run.json").read_text())
    assert summary["folds_trained"] == len(folds) == 3 * 2 * 3  # 3 models
    assert summary["repeats"] == 2 and summary["folds"] == 3 and summary["epochs"] == 2
    assert summary["started"] == meta["started"] and summary["finished"] == meta["finished"]
    assert 0 <= summary["wall_minutes"] < 60
    assert abs(summary["mean_accuracy"] - folds["accuracy"].mean()) < 1e-12
    assert "Wall time" in (tmp_path / "protocol.md").read_text()


def test_protocol_summary_refuses_an_unfinished_run(small_run, tmp_path):
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    meta = json.loads((small_run / "run.json").read_text())
    meta["finished"] = None  # as cv leaves it while running
    (run / "run.json").write_text(json.dumps(meta))
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.protocol", str(run), "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "has not finished" in res.stderr
    assert not (tmp_path / "o").exists()


def test_protocol_summary_refuses_a_folder_that_is_not_a_run(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.protocol", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a cv run folder (no run.json)"
    ]


def test_gpu_estimate_is_the_benchmark_flops_over_the_assumed_throughput(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_estimate", ROOT / "benchmarks/gpu_estimate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    estimate = module.estimate
    full = json.loads((ROOT / "benchmarks" / "results" / "full.json").read_text())
    rows = {r["model"]: r for r in estimate(full, 10.0, 0.5, [1, 4])}
    step = full["step_gflops"]["resnet3d-18"] * full["step_seconds"]["resnet3d-18"]  # GFLOP
    pflop = step * 75 * 100 * 9 / 1e6  # 75 folds x 100 epochs x ceil(70 / 8) steps
    assert rows["resnet3d-18"]["pflop"] == pytest.approx(pflop)
    assert rows["resnet3d-18"]["1 GPU"] == pytest.approx(pflop * 1e3 / 5.0 / 3600)
    assert rows["resnet3d-18"]["4 GPU"] == pytest.approx(rows["resnet3d-18"]["1 GPU"] / 4)
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_estimate", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "not measured" in (tmp_path / "gpu_estimate.md").read_text()


def test_cohort_signal_uses_cv_splits_and_seeds(prepared_small, tmp_path):
    """The diagnostic's lesion-load models score exactly what `cv` records for the same
    cache, seed, folds and repeats (same splits, same fold seeds); the map forest scores every
    fold, and the pooled maps are block means."""
    import importlib.util

    import numpy as np
    from conftest import small_cv_config

    from nmosd_ms.training.cv import run_cv

    # benchmarks/ is not a package on pytest's path (the CLI's `pytest` does not add the cwd)
    spec = importlib.util.spec_from_file_location(
        "cohort_signal", ROOT / "benchmarks/cohort_signal.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cohort_signal, pooled_maps, MAP_MODEL = (
        module.cohort_signal,
        module.pooled_maps,
        module.MAP_MODEL,
    )

    run = tmp_path / "run"
    run_cv(prepared_small, run, small_cv_config(models=("lesionload-logreg",)), device="cpu")
    scores = cohort_signal(prepared_small, cells=4, folds=3, repeats=2, seed=7)
    folds = pd.read_csv(run / "results/folds.tsv", sep="\t")
    for name in ("lesionload-logreg", "lesionload-stump"):
        recorded = folds[folds["model"] == name].sort_values(["repeat", "fold"])["accuracy"]
        assert scores[name] == pytest.approx(recorded.tolist(), abs=1e-12), name
    assert len(scores[MAP_MODEL]) == 6 and all(0 <= s <= 1 for s in scores[MAP_MODEL])
    v = np.random.default_rng(0).random((2, 24, 24, 24)).astype(np.float32)
    pooled = pooled_maps(v, 4)
    assert pooled.shape == (2, 64)
    assert pooled[1, 0] == pytest.approx(v[1, :6, :6, :6].mean())
    assert pooled[0, -1] == pytest.approx(v[0, 18:, 18:, 18:].mean())
    with pytest.raises(ValueError):
        pooled_maps(v, 0)


def test_cohort_signal_refuses_bad_input_in_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.cohort_signal", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and "not a prepared cache" in lines[0]
