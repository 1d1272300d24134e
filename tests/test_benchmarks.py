"""The benchmark tooling's bookkeeping (no timing is asserted: speed lives in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT


def run_benchmark(name: str, *args) -> subprocess.CompletedProcess:
    """``python -m benchmarks.NAME ARGS`` from the repository root, its output captured."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def load_benchmark(name: str):
    """The module ``benchmarks.NAME``, as ``python -m`` runs it from the repository root (the
    `pytest` command does not put the root on sys.path, so this does)."""
    import importlib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_protocol_summary_reads_the_run_records(small_run, tmp_path):
    res = run_benchmark("protocol", str(small_run), "--out", str(tmp_path))
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
    res = run_benchmark("protocol", str(run), "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "has not finished" in res.stderr
    assert not (tmp_path / "o").exists()


def test_protocol_summary_refuses_a_folder_that_is_not_a_run(tmp_path):
    res = run_benchmark("protocol", str(tmp_path / "nope"))
    assert res.returncode != 0 and res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'} is not a cv run folder (no run.json)"
    ]


def test_gpu_estimate_is_the_benchmark_flops_over_the_assumed_throughput(tmp_path):
    estimate = load_benchmark("gpu_estimate").estimate
    full = json.loads((ROOT / "benchmarks" / "results" / "full.json").read_text())
    rows = {r["model"]: r for r in estimate(full, 10.0, 0.5, [1, 4])}
    step = full["step_gflops"]["resnet3d-18"] * full["step_seconds"]["resnet3d-18"]  # GFLOP
    pflop = step * 75 * 100 * 9 / 1e6  # 75 folds x 100 epochs x ceil(70 / 8) steps
    assert rows["resnet3d-18"]["pflop"] == pytest.approx(pflop)
    assert rows["resnet3d-18"]["1 GPU"] == pytest.approx(pflop * 1e3 / 5.0 / 3600)
    assert rows["resnet3d-18"]["4 GPU"] == pytest.approx(rows["resnet3d-18"]["1 GPU"] / 4)
    res = run_benchmark("gpu_estimate", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "not measured" in (tmp_path / "gpu_estimate.md").read_text()


@pytest.mark.slow
def test_cohort_signal_uses_cv_splits_and_seeds(prepared_small, tmp_path):
    """The diagnostic's lesion-load models score exactly what `cv` records for the same
    cache, seed, folds and repeats (same splits, same fold seeds); the map forest scores every
    fold, and the pooled maps are block means."""
    import numpy as np
    from conftest import small_cv_config

    from nmosd_ms.training.cv import run_cv

    module = load_benchmark("cohort_signal")
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


@pytest.mark.slow
def test_cohort_signal_refuses_bad_input_in_one_line(tmp_path):
    res = run_benchmark("cohort_signal", str(tmp_path / "nope"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: ") and "not a prepared cache" in lines[0]
    res = run_benchmark("cohort_signal", tmp_path, "--cells", "x")  # argparse's own refusal
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "error: argument --cells: invalid int value: 'x' (see --help)"
    ]


def test_prepared_cohort_subset(prepared_small):
    from nmosd_ms.data.cache import load_prepared
    from nmosd_ms.errors import NmosdError

    cohort = load_prepared(prepared_small)
    assert cohort.subset(range(len(cohort.ids))) is cohort  # all rows in order: the cohort
    sub = cohort.subset([5, 0, 9])
    assert sub.ids == [cohort.ids[5], cohort.ids[0], cohort.ids[9]]
    assert (sub.volumes[1] == cohort.volumes[0]).all() and sub.path is None
    assert sub.features().index.tolist() == sub.ids
    assert sub.diagnoses == [cohort.diagnoses[i] for i in (5, 0, 9)]
    assert sub.cohort_hash not in (cohort.cohort_hash, cohort.subset([0, 5, 9]).cohort_hash)
    for bad in ([], [0, 0], [-1], [len(cohort.ids)]):
        with pytest.raises(NmosdError):
            cohort.subset(bad)


def test_sample_size_subsets_are_nested_and_stratified():
    import numpy as np

    nested_subsets = load_benchmark("sample_size").nested_subsets
    labels = np.array([1] * 41 + [0] * 47)
    subsets = nested_subsets(labels, [22, 44, 88], seed=0)
    assert subsets[88] == list(range(88))
    assert set(subsets[22]) < set(subsets[44]) < set(subsets[88])
    for n, pos in subsets.items():
        assert len(pos) == len(set(pos)) == n and pos == sorted(pos)
        assert abs(labels[pos].sum() - round(n * 41 / 88)) <= 1
    assert nested_subsets(labels, [44], seed=1)[44] != subsets[44]
    for sizes in ([], [44, 44], [3], [89]):
        with pytest.raises(ValueError):
            nested_subsets(labels, sizes, seed=0)


@pytest.mark.slow
def test_sample_size_curve_fits_evaluates_and_resumes(prepared_small, phantom_cohort, tmp_path):
    """Each size: a bundle fitted on its nested subset (all subjects: the cache itself), an
    evaluation on the test cohort, the table's rows equal to the evaluation's metrics; a second
    call reads every size back without refitting; other options on the same folder are refused;
    a test cohort sharing IDs with the cache is refused before any training."""
    from nmosd_ms.bundle import read_info
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.data.cache import load_prepared
    from nmosd_ms.errors import NmosdError
    from nmosd_ms.phantom import generate_cohort

    module = load_benchmark("sample_size")
    test = tmp_path / "test"
    generate_cohort(test, n_nmosd=3, n_ms=3, seed=21, difficulty="paper", workers=1, site="X")
    train = TrainConfig(epochs=1, batch_size=4, shift=2, eval_every=1)
    out = tmp_path / "curve"
    table = module.sample_size_curve(
        prepared_small, test, out, [8, 16], train=train, n_resamples=1000
    )
    cohort = load_prepared(prepared_small)
    info = {n: read_info(out / f"n-{n}" / "bundle").training for n in (8, 16)}
    assert info[16].cohort_hash == cohort.cohort_hash and info[16].n_subjects == 16
    assert info[8].n_subjects == 8 and info[8].counts == {"NMOSD": 4, "MS": 4}
    assert set(info[8].participant_ids) < set(info[16].participant_ids)
    assert sorted(table["n_train"].unique()) == [8, 16]
    for n in (8, 16):
        metrics = pd.read_csv(out / f"n-{n}" / "evaluation" / "metrics.tsv", sep="\t")
        rows = table[table["n_train"] == n].set_index("model")
        assert set(rows.index) == set(metrics["model"])
        acc = metrics[metrics["metric"] == "accuracy"].set_index("model")["value"]
        assert rows["accuracy"].to_dict() == pytest.approx(acc.to_dict())
        assert rows["network_minus_this"].isna().sum() == 1  # the network itself
        net = rows.loc["twoview-18", "accuracy"]
        for name in ("lesionload-stump", "lesionload-forest"):
            diff = rows.loc[name, "network_minus_this"]
            assert diff == pytest.approx(net - rows.loc[name, "accuracy"])
    written = pd.read_csv(out / "sample_size.tsv", sep="\t")
    assert len(written) == len(table) == 8

    stamp = (out / "n-8" / "bundle" / "model.json").stat().st_mtime_ns
    again = module.sample_size_curve(prepared_small, test, out, [8, 16], train=train)
    assert (out / "n-8" / "bundle" / "model.json").stat().st_mtime_ns == stamp
    assert again["accuracy"].tolist() == pytest.approx(table["accuracy"].tolist())
    with pytest.raises(NmosdError, match="another model, subset, training options or seed"):
        module.sample_size_curve(prepared_small, test, out, [8], train=train, seed=1)
    with pytest.raises(NmosdError, match="shares 16 participant IDs"):
        module.sample_size_curve(prepared_small, phantom_cohort, tmp_path / "x", [8])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sample_size_refuses_bad_input_in_one_line(prepared_small, tmp_path):
    for args in (
        ["--sizes", "8,x"],
        ["--sizes", "400"],
        ["--epochs", "0"],
        ["--model", "nope-18"],
        ["--model", "lesionload-forest"],
        ["--precision", "fp8"],
    ):
        res = run_benchmark(
            "sample_size", prepared_small, tmp_path, "--out", tmp_path / "out", *args
        )
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), args
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_segment_phantoms_measures_what_the_symmetry_step_removes(phantom_cohort, tmp_path):
    """Per subject: the true volume is the one the phantom drew (participants.tsv), step 7 only
    removes, and what it removed splits into lesion and not; a bilateral corticospinal pair under
    2 ml a side is removed whole, a one-sided lesion is kept; the summary counts both."""
    module = load_benchmark("segment_phantoms")
    table = module.segment_cohort(phantom_cohort, n=3)
    drawn = pd.read_csv(phantom_cohort / "participants.tsv", sep="\t").set_index("participant_id")
    assert len(table) == 3
    for r in table.itertuples():
        assert r.true_ml == pytest.approx(drawn.loc[r.participant_id, "lesion_ml"], abs=0.01)
        assert r.found_without_step7_ml == pytest.approx(r.found_ml + r.removed_ml)
        assert 0 <= r.removed_lesion_ml <= r.removed_ml and 0 <= r.dice <= 1
    cst = module.cst_recall(spans=((0.25, 0.65),), radii=(3.0,))
    both, right = (cst.set_index("sides").loc[s] for s in ("both", "right"))
    assert both.ml_a_side < 2 and both.recall_without_step7 > 0.9 and both.recall < 0.1
    assert right.recall_without_step7 > 0.9 and right.recall > 0.9
    text = module.summary(table, cst)
    assert "under 2 ml a side: 1, of which step 7 removed (recall < 0.1) 1" in text
    res = run_benchmark("segment_phantoms", phantom_cohort, "--parts", "x")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error:")
    res = run_benchmark("segment_phantoms", tmp_path / "missing", "--parts", "cohort")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error:")
