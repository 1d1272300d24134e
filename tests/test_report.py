"""Report: statistics, tables recomputed from result files, and the page in a real browser."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import CHROMIUM, assert_user_error, render_in_chromium, run_cli
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score

from nmosd_ms.evaluation.stats import corrected_ci, corrected_resampled_ttest, holm
from nmosd_ms.models import build_model
from nmosd_ms.models.complexity import count_parameters
from nmosd_ms.report import build_report


def test_corrected_resampled_ttest_hand_computed():
    a = [0.80, 0.70, 0.90, 0.75, 0.85]
    b = [0.70, 0.70, 0.80, 0.70, 0.75]
    # d = [.1, 0, .1, .05, .1]: mean .07, s² = .008/4 = .002,
    # corrected variance = .002 * (1/5 + 20/80) = .0009, se = .03, t = 7/3, df = 4.
    res = corrected_resampled_ttest(a, b, n_train=80, n_test=20)
    assert res.mean_difference == pytest.approx(0.07)
    assert res.t == pytest.approx(7 / 3)
    assert res.df == 4
    assert res.p_value == pytest.approx(2 * stats.t.sf(7 / 3, 4))
    assert 0.07 < res.p_value < 0.09  # two-sided t(4) table value for t = 2.333: p ≈ 0.080
    half = stats.t.ppf(0.975, 4) * 0.03
    assert (res.ci_low, res.ci_high) == pytest.approx((0.07 - half, 0.07 + half))
    # The uncorrected test would say t = .07 / sqrt(.002 / 5) = 3.5: the correction matters.
    naive = stats.ttest_rel(a, b)
    assert naive.statistic == pytest.approx(3.5) and naive.pvalue < res.p_value


def test_holm():
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.allclose(holm([0.5, 0.9]), [1.0, 1.0])


@pytest.fixture(scope="module")
def report_dir(small_run):
    index = build_report(small_run)
    assert index == small_run / "report" / "index.html"
    return small_run / "report"


def _tsv(path):
    return pd.read_csv(path, sep="\t", dtype={"participant_id": str})


def test_table2_recomputes_from_predictions(report_dir, small_run):
    """Every Table 2 column is recomputed here from the held-out predictions: the mean and the
    CI come from one estimator (the mean of fold scores), and the CI is centred on the mean shown
    (issue: it was centred on the fold mean while the pooled mean was shown)."""
    t2 = _tsv(report_dir / "table2.tsv").set_index("model")
    preds = _tsv(small_run / "results/predictions.tsv")
    for model, g in preds.groupby("model"):
        fold_acc, fold_auc, pooled_auc, repeat_means = [], [], [], []
        for _, r in g.groupby("repeat"):
            y = (r["diagnosis"] == "NMOSD").astype(int)
            pooled_auc.append(roc_auc_score(y, r["prob_nmosd"]))
            accs = []
            for _, f in r.groupby("fold"):
                yf = (f["diagnosis"] == "NMOSD").astype(int)
                accs.append(accuracy_score(yf, (f["prob_nmosd"] >= 0.5).astype(int)))
                fold_auc.append(roc_auc_score(yf, f["prob_nmosd"]))
            fold_acc += accs
            repeat_means.append(np.mean(accs))
        row = t2.loc[model]
        assert row["accuracy_mean"] == pytest.approx(np.mean(fold_acc))
        assert row["accuracy_sd"] == pytest.approx(np.std(repeat_means, ddof=1))
        assert row["auc_mean"] == pytest.approx(np.mean(fold_auc))
        assert row["auc_pooled"] == pytest.approx(np.mean(pooled_auc))
        folds = _tsv(small_run / "results/folds.tsv")
        f = folds[folds["model"] == model]
        for metric in ("accuracy", "auc"):
            lo, hi = corrected_ci(f[metric], f["n_fit"].mean(), f["n_test"].mean())
            assert (lo + hi) / 2 == pytest.approx(row[f"{metric}_mean"])  # centred on the mean
            assert row[f"{metric}_ci_low"] == pytest.approx(max(lo, 0.0))
            assert row[f"{metric}_ci_high"] == pytest.approx(min(hi, 1.0))
        assert 0 <= row["accuracy_ci_low"] <= row["accuracy_ci_high"] <= 1


def test_comparisons_and_table3(report_dir, small_run):
    cmp = _tsv(report_dir / "comparisons.tsv")
    folds = _tsv(small_run / "results/folds.tsv")
    row = cmp[cmp["metric"] == "accuracy"].iloc[0]
    a = folds[folds["model"] == row["model_a"]].sort_values(["repeat", "fold"])
    b = folds[folds["model"] == row["model_b"]].sort_values(["repeat", "fold"])
    expected = corrected_resampled_ttest(
        a["accuracy"], b["accuracy"], a["n_fit"].mean(), a["n_test"].mean()
    )
    assert row["t"] == pytest.approx(expected.t) and row["df"] == 5
    t3 = _tsv(report_dir / "table3.tsv").set_index("model")
    assert t3.loc["twoview-18", "parameters"] == count_parameters(build_model("twoview-18", 24))
    assert t3.loc["twoview-18", "seconds_per_epoch"] > 0
    md = (report_dir / "table2.md").read_text()
    assert md.startswith("| model |") and "twoview-18" in md


def test_page_is_self_contained(report_dir):
    page = (report_dir / "index.html").read_text()
    for tid in ("table2", "table3", "comparisons"):
        assert f'id="{tid}"' in page
    assert 'src="http' not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == 4
    for name in ("fig4_learning_curves", "roc", "confusion", "subjects"):
        assert (report_dir / "figures" / f"{name}.png").stat().st_size > 1000
        assert (report_dir / "figures" / f"{name}.svg").is_file()


def test_every_deep_model_is_shown_beside_the_best_shortcut(report_dir, small_run):
    """cv adds lesionload-stump to every run; the report sets each deep model beside it with
    the corrected resampled t-test of the accuracy margin, recomputed here from folds.tsv."""
    folds = _tsv(small_run / "results/folds.tsv")
    assert "lesionload-stump" in set(folds["model"])
    base = _tsv(report_dir / "baselines.tsv")
    row = base[(base["model"] == "twoview-18") & (base["baseline_kind"] == "shortcut")].iloc[0]
    assert row["baseline"] == "lesionload-stump"
    a = folds[folds["model"] == "twoview-18"].sort_values(["repeat", "fold"])
    b = folds[folds["model"] == "lesionload-stump"].sort_values(["repeat", "fold"])
    res = corrected_resampled_ttest(
        a["accuracy"], b["accuracy"], a["n_fit"].mean(), a["n_test"].mean()
    )
    assert row["margin"] == pytest.approx(res.mean_difference)
    assert row["p_value"] == pytest.approx(res.p_value)
    assert row["accuracy"] == pytest.approx(a["accuracy"].mean())
    classical = base[base["baseline_kind"] == "classical"].iloc[0]
    assert classical["baseline"] == "lesionload-logreg"
    page = (report_dir / "index.html").read_text()
    assert 'id="baselines"' in page and "Deep models against the shortcut" in page
    if row["margin"] <= 0:
        assert "did not beat the shortcut" in page


def test_lesion_sources_are_reported(report_dir, small_run):
    """cv records, per class, how many lesion maps were given or segmented; the report states it
    and warns only when the classes differ (all given here)."""
    meta = json.loads((small_run / "run.json").read_text())
    counts = meta["cohort"]["counts"]
    table = meta["cohort"]["lesion_source"]
    assert table == {k: {"given": n, "segmented": 0} for k, n in counts.items()}
    page = (report_dir / "index.html").read_text()
    assert "Lesion maps:" in page and "segmented maps differs" not in page
    assert meta["cohort"]["segmented"] == [] and not (report_dir / "lesion_source.tsv").exists()
    assert not json.loads((report_dir / "report.json").read_text())["lesion_source"]["unbalanced"]


def test_unbalanced_lesion_sources_are_flagged(small_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run, ignore=shutil.ignore_patterns("report", "models"))
    meta = json.loads((run / "run.json").read_text())
    n, m = meta["cohort"]["counts"]["NMOSD"], meta["cohort"]["counts"]["MS"]
    meta["cohort"]["lesion_source"] = {  # as if every NMOSD map came from --segment-missing
        "NMOSD": {"given": 0, "segmented": n},
        "MS": {"given": m, "segmented": 0},
    }
    pred = _tsv(run / "results" / "predictions.tsv")
    meta["cohort"]["segmented"] = sorted(
        set(pred.loc[pred["diagnosis"] == "NMOSD", "participant_id"])
    )
    (run / "run.json").write_text(json.dumps(meta))
    page = build_report(run).read_text()
    assert 'class="warn"' in page and "NMOSD 100%, MS 0%" in page
    summary = json.loads((run / "report" / "report.json").read_text())["lesion_source"]
    assert summary["unbalanced"]
    assert summary["fisher_p"] == pytest.approx(stats.fisher_exact([[n, 0], [0, m]]).pvalue)
    # performance within each source, recomputed from the held-out predictions
    within = _tsv(run / "report" / "lesion_source.tsv").set_index(["model", "lesion_source"])
    assert 'id="lesion_source"' in page
    for model, g in pred.groupby("model"):
        nmosd = g[g["diagnosis"] == "NMOSD"]
        row = within.loc[(model, "segmented")]
        assert row["n_nmosd"] == n and row["n_ms"] == 0 and np.isnan(row["specificity"])
        assert row["sensitivity"] == pytest.approx((nmosd["prob_nmosd"] >= 0.5).mean())
        assert within.loc[(model, "given"), "n_ms"] == m


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_page_renders_in_headless_chromium(report_dir, tmp_path):
    dom, _ = render_in_chromium(report_dir / "index.html", tmp_path)
    for tid in ("table2", "table3", "comparisons"):
        assert f'id="{tid}"' in dom


@pytest.mark.parametrize("cm", [[[15, 9], [9, 11]], [[21, 3], [18, 2]], [[0, 0], [0, 0]]])
def test_every_confusion_count_is_readable_on_its_cell(cm):
    """The cv report's and the evaluate page's confusion panels: each count's colour stands out
    from its own cell (a 9 beside a 15 was once written white on white)."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from nmosd_ms.report.figures import confusion_panel

    def luminance(rgb):
        return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]

    fig, ax = plt.subplots()
    confusion_panel(ax, np.array(cm), "called", "true")
    image = ax.images[0]
    texts = ax.texts
    assert [t.get_text() for t in texts] == [str(v) for row in cm for v in row]
    for t, v in zip(texts, [v for row in cm for v in row], strict=True):
        cell = image.cmap(image.norm(v))
        assert abs(luminance(cell) - luminance(mcolors.to_rgb(t.get_color()))) > 0.45, (v, cm)
    plt.close(fig)


def test_report_of_a_run_before_its_first_fold_is_one_error_line(small_run, tmp_path):
    """A run stopped (or still running) before any fold finished: run.json and splits.tsv, no
    fold record and no result table. One line saying so, exit 2, nothing written."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.json", "splits.tsv"):
        shutil.copy(small_run / name, run / name)
    assert_user_error(run_cli("report", run), "has no finished folds yet")
    assert sorted(p.name for p in run.iterdir()) == ["run.json", "splits.tsv"]
