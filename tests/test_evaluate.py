"""External validation (``nmosd-ms evaluate``): a bundle from one phantom cohort scored on
another (other seed, other difficulty, other site); every number recomputed independently from
the written predictions; overlap with the training cohort refused; the page renders."""

from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import CHROMIUM, assert_user_error, render_in_chromium, run_cli
from sklearn.metrics import accuracy_score, brier_score_loss, recall_score, roc_auc_score

from nmosd_ms.bundle import load_bundle
from nmosd_ms.config import TrainConfig
from nmosd_ms.data.cache import load_prepared, prepare
from nmosd_ms.data.dataset import load_cohort
from nmosd_ms.data.features import FEATURES
from nmosd_ms.data.ingest import Cohort
from nmosd_ms.errors import NmosdError
from nmosd_ms.evaluate import evaluate_cohort
from nmosd_ms.evaluation.external import bootstrap_metrics, calibration
from nmosd_ms.export import export_bundle
from nmosd_ms.models.lesionload import (
    BUNDLED,
    LesionLoadModel,
    build_lesionload,
    lesionload_arrays,
)
from nmosd_ms.predict import PREDICTIONS, predict_subjects


def test_lesionload_arrays_equal_sklearn():
    """The pickle-free form of each lesion-load model predicts exactly as scikit-learn does."""
    rng = np.random.default_rng(0)
    scale = np.array([10, 5, 1, 2, 1, 1, 50, 50, 50])
    x, xt = np.abs(rng.normal(size=(80, 9))) * scale, np.abs(rng.normal(size=(40, 9))) * scale
    y = (x[:, 0] + 5 * rng.normal(size=80) > 8).astype(int)
    for name in BUNDLED:
        fitted = build_lesionload(name, seed=1).fit(x, y)
        model = LesionLoadModel(name, lesionload_arrays(name, fitted))
        np.testing.assert_allclose(
            model.predict_proba(xt), fitted.predict_proba(xt)[:, 1], rtol=0, atol=1e-12
        )


@pytest.fixture(scope="module")
def bundle_dir(small_run, tmp_path_factory):
    return export_bundle(small_run, "twoview-18", tmp_path_factory.mktemp("eb") / "bundle")


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """The second cohort: another seed, another difficulty, another site's IDs."""
    from nmosd_ms.phantom import generate_cohort

    out = tmp_path_factory.mktemp("ext") / "bids"
    generate_cohort(out, n_nmosd=7, n_ms=8, seed=21, difficulty="paper", workers=2, site="X")
    return out


@pytest.fixture(scope="module")
def evaluated(bundle_dir, external, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "evaluation"
    res = run_cli("evaluate", bundle_dir, external, "--out", out, "--n-resamples", "2000")
    assert res.exit_code == 0, res.stderr
    assert "Class balance: external 7 NMOSD / 8 MS" in res.stdout
    return out


def test_bundle_carries_baselines_and_training_summary(bundle_dir, prepared_small):
    info = json.loads((bundle_dir / "model.json").read_text())
    assert sorted(b["name"] for b in info["baselines"]) == sorted(BUNDLED)
    summary = info["training"]["summary"]
    assert summary["counts"] == {"MS": 8, "NMOSD": 8}
    assert len(info["training"]["input_sha256"]) == 32  # 16 FLAIRs + 16 lesion masks
    feats = load_prepared(prepared_small).features()
    assert summary["load"]["MS"]["n_lesions"][2] == pytest.approx(
        np.median(feats["n_lesions"].to_numpy()[load_prepared(prepared_small).labels == 0])
    )
    assert "lesionload-forest" in (bundle_dir / "MODEL_CARD.md").read_text()
    assert summary["no_lesion"] == {"MS": 0, "NMOSD": 0}


def test_external_maps_without_lesions_are_counted_beside_the_training_cohort(bundle_dir):
    from nmosd_ms.data.summary import describe_difference

    training = json.loads((bundle_dir / "model.json").read_text())["training"]["summary"]
    external = {**training, "no_lesion": {"MS": 0, "NMOSD": 2}}
    said = " ".join(describe_difference(training, external))
    assert "2 of 16 external maps hold no lesion of 24 mm³ or more (training: 0)" in said
    old = {k: v for k, v in training.items() if k != "no_lesion"}  # a bundle made before
    assert "(training: n/a)" in " ".join(describe_difference(old, external))
    assert "no lesion" not in " ".join(describe_difference(external, training))


def test_numbers_recomputed_from_the_predictions(
    evaluated, bundle_dir, external, small_run, prepared_small, tmp_path
):
    pred = pd.read_csv(evaluated / "predictions.tsv", sep="\t")
    metrics = pd.read_csv(evaluated / "metrics.tsv", sep="\t")
    comparison = pd.read_csv(evaluated / "comparison.tsv", sep="\t")
    record = json.loads((evaluated / "evaluation.json").read_text())
    assert len(pred) == 15 and pred["participant_id"].str.startswith("sub-X").all()
    assert not pred["in_training"].any() and record["overlap"]["participants"] == []

    # the network: the same probabilities as predict gives
    bundle = load_bundle(bundle_dir)
    cohort = load_cohort(external)
    direct = predict_subjects(bundle, list(cohort.subjects)).set_index("participant_id")
    np.testing.assert_allclose(
        pred["prob_twoview-18"], direct.loc[pred["participant_id"], "prob_nmosd"], atol=1e-7
    )
    # the baselines: scikit-learn fitted on the training cache's features (the run's seed),
    # applied to the external cohort's features from its own prepared cache
    train = load_prepared(prepared_small)
    ext_cache = tmp_path / "ext-cache"
    prepare(cohort, ext_cache, bundle.info.prepare)
    ext = load_prepared(ext_cache)
    x_ext = ext.features().loc[pred["participant_id"], list(FEATURES)].to_numpy(float)
    seed = json.loads((small_run / "run.json").read_text())["options"]["seed"]
    for name in BUNDLED:
        fitted = build_lesionload(name, seed).fit(
            train.features()[list(FEATURES)].to_numpy(float), train.labels
        )
        np.testing.assert_allclose(pred[f"prob_{name}"], fitted.predict_proba(x_ext)[:, 1])

    y = (pred["diagnosis"] == "NMOSD").astype(int).to_numpy()
    thresholds = record["method"]["thresholds"]
    assert thresholds["twoview-18"] == 0.5 and record["method"]["n_resamples"] == 2000
    for model in ["twoview-18", *BUNDLED]:
        p = pred[f"prob_{model}"].to_numpy()
        call = (p >= thresholds[model]).astype(int)
        expected = {
            "accuracy": accuracy_score(y, call),
            "sensitivity": recall_score(y, call, pos_label=1),
            "specificity": recall_score(y, call, pos_label=0),
            "auc": roc_auc_score(y, p),
            "brier": brier_score_loss(y, p),
        }
        expected["balanced_accuracy"] = (expected["sensitivity"] + expected["specificity"]) / 2
        got = metrics[metrics["model"] == model].set_index("metric")
        # resampling within each class keeps its counts, so a metric can only move when a
        # class holds both right and wrong calls (or, for AUC and Brier, unequal probabilities)
        mixed = {c: len(np.unique(call[y == c] == c)) > 1 for c in (0, 1)}
        spread = any(len(np.unique(p[y == c])) > 1 for c in (0, 1))
        can_vary = {
            "accuracy": mixed[0] or mixed[1],
            "balanced_accuracy": mixed[0] or mixed[1],
            "sensitivity": mixed[1],
            "specificity": mixed[0],
            "auc": spread and 0 < expected["auc"] < 1,
            "brier": spread,
        }
        for metric, value in expected.items():
            row = got.loc[metric]
            assert row["value"] == pytest.approx(value, abs=1e-12), (model, metric)
            assert row["ci_low"] <= value <= row["ci_high"], (model, metric, row.to_dict())
            if can_vary[metric]:  # 15 subjects: then never a point interval
                assert row["ci_high"] - row["ci_low"] > 0, (model, metric)
            else:  # e.g. a baseline that calls everyone MS: its accuracy is the MS share
                assert row["ci_low"] == row["ci_high"] == pytest.approx(value), (model, metric)
        assert (pred[f"call_{model}"] == np.where(call, "NMOSD", "MS")).all()
        conf = record["confusion"][model]
        assert conf["true NMOSD, called NMOSD"] == int(((y == 1) & (call == 1)).sum())
        assert conf["true MS, called NMOSD"] == int(((y == 0) & (call == 1)).sum())
    by = metrics.set_index(["model", "metric"])["value"]
    for _, r in comparison.iterrows():
        diff = by[("twoview-18", r["metric"])] - by[(r["baseline"], r["metric"])]
        assert r["difference"] == pytest.approx(diff, abs=1e-12)
        assert r["ci_low"] <= diff <= r["ci_high"]
    assert set(metrics["kind"]) == {"network", "shortcut", "classical"}

    # calibration slope: an independent logistic fit (scikit-learn, no penalty)
    from sklearn.linear_model import LogisticRegression

    p = np.clip(pred["prob_twoview-18"].to_numpy(), 1e-6, 1 - 1e-6)
    cal = record["calibration"]["twoview-18"]
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-9)
    assert not cal["separated"]  # this cohort and seed: the slope is finite and checked
    z = np.log(p / (1 - p))[:, None]
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10_000).fit(z, y)
    assert cal["slope"] == pytest.approx(lr.coef_[0, 0], rel=1e-3, abs=1e-3)
    bins = pd.read_csv(evaluated / "calibration.tsv", sep="\t")
    assert bins.groupby("model")["n"].sum().eq(15).all()

    # the cohort-difference sentences use the external cohort's own figures
    diffs = " ".join(record["differences"])
    ms_median = np.median(ext.features()["n_lesions"].to_numpy()[ext.labels == 0])
    assert f"MS {ms_median:.0f} (training" in diffs and "Voxel size" in diffs


def test_bootstrap_is_seeded_and_stratified():
    rng = np.random.default_rng(4)
    y = np.array([1] * 9 + [0] * 13)
    probs = {"net": rng.random(22), "base": rng.random(22)}
    thr = {"net": 0.5, "base": 0.5}
    a, ca = bootstrap_metrics(y, probs, thr, "net", 1000, 0.95, seed=3)
    b, cb = bootstrap_metrics(y, probs, thr, "net", 1000, 0.95, seed=3)
    c, _ = bootstrap_metrics(y, probs, thr, "net", 1000, 0.95, seed=4)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(ca, cb)
    assert not np.allclose(a["ci_low"], c["ci_low"], equal_nan=True)
    # a perfectly separating model: every stratified resample keeps both classes, so the
    # interval of its sensitivity, specificity and AUC is the point 1
    sep = {"net": np.where(y == 1, 0.9, 0.1)}
    m, _ = bootstrap_metrics(y, sep, {"net": 0.5}, "net", 1000)
    m = m.set_index("metric")
    for metric in ("sensitivity", "specificity", "auc", "accuracy"):
        assert (m.loc[metric, ["value", "ci_low", "ci_high"]] == 1.0).all()
    assert calibration(y, sep["net"])["separated"]


def test_one_class_cohort_gives_what_is_defined(bundle_dir, external):
    """An all-MS cohort (the real-data check of the cohort issue): specificity with an interval,
    sensitivity and AUC undefined."""
    cohort = load_cohort(external)
    ms = Cohort(tuple(s for s in cohort.subjects if s.diagnosis == "MS"), cohort.source)
    ev = evaluate_cohort(load_bundle(bundle_dir), ms, n_resamples=1000)
    assert math.isnan(ev.value("twoview-18", "sensitivity"))
    assert math.isnan(ev.value("twoview-18", "auc"))
    spec = ev.metrics.set_index(["model", "metric"]).loc[("twoview-18", "specificity")]
    calls = ev.predictions["call_twoview-18"]
    assert spec["value"] == pytest.approx((calls == "MS").mean())
    assert spec["ci_low"] <= spec["value"] <= spec["ci_high"]


@pytest.mark.slow
def test_overlap_with_the_training_cohort_is_refused(bundle_dir, phantom_cohort, tmp_path):
    out = tmp_path / "ev"
    res = run_cli("evaluate", bundle_dir, phantom_cohort, "--out", out)
    assert_user_error(res, "overlaps the bundle's training cohort", "16 participant", "--allow")
    assert not out.exists()
    res = run_cli(
        "evaluate", bundle_dir, phantom_cohort, "--out", out, "--allow-overlap",
        "--n-resamples", "1000",
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert pd.read_csv(out / "predictions.tsv", sep="\t")["in_training"].all()
    assert "Not an external validation" in (out / "report/index.html").read_text()
    # a second evaluation into the same folder is refused, the first left as it was
    before = (out / "evaluation.json").read_bytes()
    again = run_cli("evaluate", bundle_dir, phantom_cohort, "--out", out, "--allow-overlap")
    assert_user_error(again, "already holds an evaluation")
    assert (out / "evaluation.json").read_bytes() == before


def test_overlap_by_input_file_alone(bundle_dir, phantom_cohort, tmp_path):
    """A training scan under another participant ID is still caught (its sha256)."""
    src = next(iter(load_cohort(phantom_cohort).subjects))
    manifest = tmp_path / "m.tsv"
    manifest.write_text(
        "participant_id\tdiagnosis\tflair\tlesion_mask\n"
        f"renamed01\t{src.diagnosis}\t{src.flair}\t{src.lesion_mask}\n"
    )
    res = run_cli("evaluate", bundle_dir, manifest, "--out", tmp_path / "ev")
    assert_user_error(res, "2 identical input file", "renamed01 FLAIR")
    ev = evaluate_cohort(load_bundle(bundle_dir), load_cohort(manifest), allow_overlap=True,
                         n_resamples=1000)  # fmt: skip
    assert ev.predictions["in_training"].tolist() == [True]  # marked by its hash, not its ID


def test_bundle_without_baselines_and_tampered_baselines(bundle_dir, external, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(bundle_dir, bad)
    f = bad / "baselines" / "lesionload-forest.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert_user_error(run_cli("evaluate", bad, external, "--out", tmp_path / "e1"), "altered")
    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    info = json.loads((old / "model.json").read_text())
    info["baselines"] = []
    info["training"].pop("summary")
    (old / "model.json").write_text(json.dumps(info))
    shutil.rmtree(old / "baselines")
    res = run_cli("evaluate", old, external, "--out", tmp_path / "e2", "--n-resamples", "1000")
    assert res.exit_code == 0, res.stderr
    page = (tmp_path / "e2" / "report" / "index.html").read_text()
    assert "carries no lesion-load baselines" in page and "cannot be compared" in page


def test_fit_bundle_carries_baselines(prepared_small, tmp_path):
    from nmosd_ms.fit import fit_bundle

    out = fit_bundle(
        prepared_small, "twoview-18", tmp_path / "b", TrainConfig(epochs=1, batch_size=8), seed=2
    )
    bundle = load_bundle(out)
    assert sorted(bundle.baselines) == sorted(BUNDLED)
    assert bundle.info.training.summary["counts"] == {"MS": 8, "NMOSD": 8}


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(evaluated, tmp_path):
    dom, _ = render_in_chromium(evaluated / "report" / "index.html", tmp_path, "1150,1800")
    for tid in ("metrics", "comparison", "calibration"):
        assert f'id="{tid}"' in dom
    assert dom.count("<img") == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda is accepted")
def test_device_cuda_without_a_gpu_is_one_line(bundle_dir, external, tmp_path):
    lesion = next((external / "derivatives").rglob("*_desc-lesion_mask.nii.gz"))
    res = run_cli("predict", bundle_dir, "--lesion-mask", lesion, "--device", "cuda")
    assert_user_error(res, "no CUDA device", "--device")
    res = run_cli("evaluate", bundle_dir, external, "--out", tmp_path / "e", "--device", "cuda")
    assert_user_error(res, "no CUDA device", "--device")
    assert not (tmp_path / "e").exists()
    bundle = load_bundle(bundle_dir, "auto")  # no GPU: the CPU
    assert bundle.device.type == "cpu"


def test_phantom_site_is_validated(tmp_path):
    for bad in ("../x", "a-b", "x" * 17):
        res = run_cli("phantom", tmp_path / "p", "--n-nmosd", "1", "--n-ms", "1", "--site", bad)
        assert_user_error(res, "site", "--site")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_flair_only_subjects_are_segmented_and_bad_input_writes_nothing(
    bundle_dir, external, tmp_path, monkeypatch
):
    subjects = load_cohort(external).subjects
    picked = [next(s for s in subjects if s.diagnosis == dx) for dx in ("MS", "NMOSD")]
    rows = ["participant_id\tdiagnosis\tflair\tlesion_mask"]
    rows += [f"{s.participant_id}\t{s.diagnosis}\t{s.flair}\t" for s in picked]
    manifest = tmp_path / "flair-only.tsv"
    manifest.write_text("\n".join(rows) + "\n")
    ev = evaluate_cohort(load_bundle(bundle_dir), load_cohort(manifest, require_lesion_masks=False),
                         n_resamples=1000)  # fmt: skip
    assert (ev.predictions["lesion_source"] == "segmented").all()

    # written: the masks it made, as predict writes them, named in the predictions table
    rows[2] = rows[2] + str(picked[1].lesion_mask)  # the second subject brings its mask
    manifest.write_text("\n".join(rows) + "\n")
    cohort = load_cohort(manifest, require_lesion_masks=False)
    ev = evaluate_cohort(load_bundle(bundle_dir), cohort, tmp_path / "w", n_resamples=1000)
    pred = pd.read_csv(tmp_path / "w" / "predictions.tsv", sep="\t", keep_default_na=False)
    assert pred["lesion_source"].tolist() == ["segmented", "given"]
    made, given = pred["segmentation"].tolist()
    assert given == "" and made.startswith("segmentations/sub-") and made.endswith("_mask.nii.gz")
    seg = tmp_path / "w" / made
    assert seg.with_name(seg.name.replace(".nii.gz", ".json")).is_file()
    assert seg.with_name(seg.name.replace(".nii.gz", ".png")).is_file()
    page = (tmp_path / "w" / "report" / "index.html").read_text()
    assert f'href="../{made}"' in page  # the page links what the network saw, for review
    assert f'href="../{made.replace(".nii.gz", ".png")}"' in page
    assert page.count("montage</a>") == 1  # only the subject segmented here
    desc = json.loads((tmp_path / "w" / "segmentations" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    solo = tmp_path / "solo.tsv"
    solo.write_text(f"participant_id\tflair\n{picked[0].participant_id}\t{picked[0].flair}\n")
    res = run_cli("predict", bundle_dir, "--manifest", solo, "--out", tmp_path / "p")
    assert res.exit_code == 0, res.stderr
    predicted = pd.read_csv(tmp_path / "p" / PREDICTIONS, sep="\t")["segmentation"].iloc[0]
    np.testing.assert_array_equal(
        nib.load(seg).get_fdata(), nib.load(tmp_path / "p" / predicted).get_fdata()
    )
    # two IDs that would share one BIDS label in segmentations/: refused before any work
    clash = tmp_path / "clash.tsv"
    clash.write_text(
        rows[0] + f"\nsub-a.1\tMS\t{picked[0].flair}\t\nsub-a_1\tNMOSD\t{picked[1].flair}\t\n"
    )
    import nmosd_ms.evaluate as evaluate_module

    def no_work(*args):
        raise AssertionError("a subject was prepared before the IDs were checked")

    monkeypatch.setattr(evaluate_module, "prepare_for_bundle", no_work)
    with pytest.raises(NmosdError, match="would both be"):
        evaluate_cohort(load_bundle(bundle_dir), load_cohort(clash, require_lesion_masks=False),
                        tmp_path / "c", n_resamples=1000)  # fmt: skip
    assert not (tmp_path / "c").exists()
    monkeypatch.undo()
    broken = tmp_path / "broken.tsv"
    broken.write_text(rows[0] + f"\n{picked[0].participant_id}\tMS\t{tmp_path / 'none.nii.gz'}\t\n")
    out = tmp_path / "ev"
    assert_user_error(run_cli("evaluate", bundle_dir, broken, "--out", out))
    assert not out.exists()
