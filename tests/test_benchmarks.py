"""The benchmark tooling's bookkeeping (no timing is asserted: speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
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
