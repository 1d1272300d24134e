"""Tables computed from a cv run's result files (nothing is re-trained)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..constants import POSITIVE, THRESHOLD
from ..evaluation.metrics import METRICS, binary_metrics
from ..evaluation.stats import corrected_ci, corrected_resampled_ttest, holm
from ..training.runfolder import Run, RunFolder


def load_run(root: str | Path) -> Run:
    """A cv run folder as the report reads it (:meth:`RunFolder.load`)."""
    return RunFolder(root).load()


def completeness(run: Run) -> dict:
    """How much of the run is finished: the folds each model was planned to have (repeats ×
    folds) and the folds finished so far. A report built while ``cv`` is still training, or
    after it was stopped, covers the finished folds only and must say so."""
    opts = run.meta["options"]
    planned = int(opts["repeats"]) * int(opts["folds"])
    done = run.folds.groupby("model").size()
    finished = {m: int(done.get(m, 0)) for m in run.models}
    return {
        "complete": all(n >= planned for n in finished.values()),
        "planned_folds": planned,
        "finished_folds": finished,
    }


def lesion_sources(run: Run) -> dict | None:
    """How the lesion images were obtained, per class, and whether that differs between the
    classes (Fisher's exact test): a classifier can learn the segmentation method instead of the
    disease when one class's maps come from the automatic segmentation more often. ``None`` for
    runs written before cv recorded it."""
    from scipy.stats import fisher_exact

    table = run.meta["cohort"].get("lesion_source")
    if not table:
        return None
    rows = [[table[lab]["segmented"], table[lab]["given"]] for lab in ("NMOSD", "MS")]
    share = {
        lab: (r[0] / (r[0] + r[1]) if r[0] + r[1] else math.nan)
        for lab, r in zip(("NMOSD", "MS"), rows, strict=True)
    }
    any_segmented = rows[0][0] + rows[1][0] > 0
    p = float(fisher_exact(rows).pvalue) if any_segmented else 1.0
    return {
        "counts": table,
        "segmented_share": share,
        "fisher_p": p,
        "unbalanced": bool(any_segmented and share["NMOSD"] != share["MS"]),
    }


def scan_ids(table: pd.DataFrame) -> pd.Series:
    """The scan of each row: participant_id, or participant_id_session_id with sessions."""
    if "session_id" not in table:
        return table["participant_id"].astype(str)
    ses = table["session_id"].fillna("").astype(str)
    return table["participant_id"].astype(str) + np.where(ses != "", "_" + ses, "")


def by_lesion_source(run: Run) -> pd.DataFrame:
    """Held-out performance within each lesion source (given / segmented), pooled over all
    repeats' folds: does the result hold when the source is fixed? Empty when every map was
    given, or for runs written before cv recorded the segmented subjects."""
    segmented = set(run.meta["cohort"].get("segmented") or [])
    if not segmented:
        return pd.DataFrame()
    scans = scan_ids(run.predictions)
    p = run.predictions.assign(
        scan=scans,
        source=np.where(scans.isin(segmented), "segmented", "given"),
        nmosd=lambda d: d["diagnosis"] == POSITIVE,
    )
    rows = []
    for (model, source), g in p.groupby(["model", "source"], sort=False):
        m = binary_metrics(g["nmosd"], g["prob_nmosd"])
        rows.append(
            {
                "model": model,
                "lesion_source": source,
                "n_nmosd": g.loc[g["nmosd"], "scan"].nunique(),
                "n_ms": g.loc[~g["nmosd"], "scan"].nunique(),
                **{k: m[k] for k in ("accuracy", "sensitivity", "specificity")},
            }
        )
    order = {m: i for i, m in enumerate(run.models)}
    return (
        pd.DataFrame(rows)
        .sort_values(
            ["model", "lesion_source"], key=lambda c: c.map(order) if c.name == "model" else c
        )
        .reset_index(drop=True)
    )


def repeat_metrics(predictions: pd.DataFrame) -> pd.DataFrame:
    """Metrics per (model, repeat), pooling the held-out predictions of that repeat's folds."""
    rows = []
    for (model, repeat), g in predictions.groupby(["model", "repeat"], sort=False):
        y = (g["diagnosis"] == POSITIVE).astype(int)
        rows.append({"model": model, "repeat": repeat, **binary_metrics(y, g["prob_nmosd"])})
    return pd.DataFrame(rows)


def chance_level(run: Run) -> float:
    counts = run.meta["cohort"]["counts"]
    return max(counts.values()) / sum(counts.values())


def table2(run: Run) -> pd.DataFrame:
    """Per model and metric, one estimator throughout: the mean of the k·r held-out fold scores,
    the SD over repeats of each repeat's mean fold score, and the 95 % CI of that same mean from
    the corrected resampled t distribution (centred on the mean shown, then clipped to [0, 1]).
    ``<metric>_pooled`` is a second, labelled estimator: each repeat's metric on its folds'
    pooled held-out predictions, averaged over repeats (for AUC it differs from the fold mean).
    The correction uses the number of subjects each model was fitted on (``n_fit``: the training
    part less any inner validation split)."""
    per_repeat = repeat_metrics(run.predictions)
    rows = []
    for model in run.models:
        f = run.folds[run.folds["model"] == model]
        r = per_repeat[per_repeat["model"] == model]
        row = {"model": model, "repeats": int(f["repeat"].nunique()), "folds": len(f)}
        n_fit, n_test = f["n_fit"].mean(), f["n_test"].mean()
        for m in METRICS:
            scores = f[m].to_numpy(dtype=float)
            finite = np.isfinite(scores)
            row[f"{m}_mean"] = float(scores[finite].mean()) if finite.any() else math.nan
            by_repeat = f.loc[finite].groupby("repeat")[m].mean().to_numpy(dtype=float)
            row[f"{m}_sd"] = float(np.std(by_repeat, ddof=1)) if by_repeat.size > 1 else math.nan
            lo, hi = corrected_ci(scores, n_fit, n_test)
            # the metrics are proportions: clip the t interval to [0, 1]
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = max(lo, 0.0), min(hi, 1.0)
            pooled = r[m].to_numpy(dtype=float)
            row[f"{m}_pooled"] = (
                float(np.nanmean(pooled)) if np.isfinite(pooled).any() else math.nan
            )
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(run: Run, metrics=("accuracy", "auc")) -> pd.DataFrame:
    """Pairwise corrected resampled t-tests on fold scores, Holm-adjusted per metric."""
    k = int(run.meta["options"]["folds"])
    rows = []
    for metric in metrics:
        block = []
        for a, b in itertools.combinations(run.models, 2):
            va, vb, n_fit, n_test = _paired(run, a, b, metric)
            if va.size < 2:
                continue
            res = corrected_resampled_ttest(va, vb, n_fit, n_test)
            block.append(
                {
                    "metric": metric,
                    "model_a": a,
                    "model_b": b,
                    "folds": int(va.size),
                    "k": k,
                    "mean_difference": res.mean_difference,
                    "ci_low": res.ci_low,
                    "ci_high": res.ci_high,
                    "t": res.t,
                    "df": res.df,
                    "p_value": res.p_value,
                }
            )
        if block:
            adj = holm([r["p_value"] for r in block])
            for r, p in zip(block, adj, strict=True):
                r["p_holm"] = float(p)
            rows += block
    cols = [
        "metric",
        "model_a",
        "model_b",
        "folds",
        "k",
        "mean_difference",
        "ci_low",
        "ci_high",
        "t",
        "df",
        "p_value",
        "p_holm",
    ]
    return pd.DataFrame(rows, columns=cols)


#: Lesion-load-only models: the shortcuts every deep model must beat (see models.lesionload).
SHORTCUTS = ("lesionload-stump",)


def _paired(run: Run, a: str, b: str, metric: str = "accuracy"):
    """Paired fold scores of two models of one run (same splits), finite in both, and the
    sizes for the correction: with an inner validation split a model was fitted on fewer
    subjects than the training part, so the smaller ``n_fit`` of the two is used."""
    fa = run.folds[run.folds["model"] == a].set_index(["repeat", "fold"])
    fb = run.folds[run.folds["model"] == b].set_index(["repeat", "fold"])
    common = fa.index.intersection(fb.index)
    va, vb = fa.loc[common, metric].to_numpy(float), fb.loc[common, metric].to_numpy(float)
    ok = np.isfinite(va) & np.isfinite(vb)
    n_fit = min(fa.loc[common, "n_fit"].mean(), fb.loc[common, "n_fit"].mean())
    return va[ok], vb[ok], n_fit, fa.loc[common, "n_test"].mean()


def baselines(run: Run) -> pd.DataFrame:
    """Each deep model beside the best shortcut (lesion load only: ``lesionload-stump``) and the
    best classical lesion-load baseline (logreg/forest, which also see coarse location) of the
    run: mean fold accuracy of each, and the difference with the corrected resampled t-test on
    the paired fold accuracies. "Best" is the highest mean fold accuracy of its kind."""
    t2 = table2(run).set_index("model")
    family = {m: run.meta["models"][m].get("family") for m in run.models}
    deep = [m for m in run.models if family[m] != "lesionload"]
    kinds = {
        "shortcut": [m for m in run.models if m in SHORTCUTS],
        "classical": [m for m in run.models if family[m] == "lesionload" and m not in SHORTCUTS],
    }
    rows = []
    for kind, members in kinds.items():
        if not members:
            continue
        best = max(members, key=lambda m: t2.loc[m, "accuracy_mean"])
        for model in deep:
            va, vb, n_fit, n_test = _paired(run, model, best)
            row = {
                "model": model,
                "accuracy": t2.loc[model, "accuracy_mean"],
                "baseline_kind": kind,
                "baseline": best,
                "baseline_accuracy": t2.loc[best, "accuracy_mean"],
                "margin": math.nan,
                "ci_low": math.nan,
                "ci_high": math.nan,
                "p_value": math.nan,
            }
            if va.size >= 2:
                res = corrected_resampled_ttest(va, vb, n_fit, n_test)
                row.update(
                    margin=res.mean_difference,
                    ci_low=res.ci_low,
                    ci_high=res.ci_high,
                    p_value=res.p_value,
                )
            rows.append(row)
    cols = [
        "model",
        "accuracy",
        "baseline_kind",
        "baseline",
        "baseline_accuracy",
        "margin",
        "ci_low",
        "ci_high",
        "p_value",
    ]
    return pd.DataFrame(rows, columns=cols)


def baselines_display(b: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "deep model": b["model"],
            "accuracy": [_fmt(v) for v in b["accuracy"]],
            "against": [
                f"best {k}: {m}" for k, m in zip(b["baseline_kind"], b["baseline"], strict=True)
            ],
            "its accuracy": [_fmt(v) for v in b["baseline_accuracy"]],
            "margin [95 % CI]": [
                f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]"
                for d, lo, hi in zip(b["margin"], b["ci_low"], b["ci_high"], strict=True)
            ],
            "p": [_fmt(p, 4) for p in b["p_value"]],
        }
    )


def table3(run: Run) -> pd.DataFrame:
    """Complexity: parameters, FLOPs, measured times and memory on the run's device."""
    rows = []
    for model in run.models:
        info = run.meta["models"][model]
        f = run.folds[run.folds["model"] == model]
        rows.append(
            {
                "model": model,
                "input_size": info.get("size"),
                "parameters": info.get("parameters"),
                "gflops_per_forward": info["flops"] / 1e9 if info.get("flops") else math.nan,
                "seconds_per_epoch": float(f["seconds_per_epoch"].mean()),
                "seconds_per_fold": float(f["train_seconds"].mean()),
                "epochs": float(f["epochs"].mean()),
                "inference_ms_per_subject": float(f["inference_ms"].mean()),
                "peak_memory_mb": float(f["peak_memory_mb"].max()),
                "device": run.meta["environment"]["device"],
            }
        )
    return pd.DataFrame(rows)


def subject_summary(run: Run) -> pd.DataFrame:
    """Mean predicted probability per subject and model across repeats; always-wrong flag."""
    p = run.predictions.copy()
    p["correct"] = (p["prob_nmosd"] >= THRESHOLD) == (p["diagnosis"] == POSITIVE)
    keys = ["participant_id", *(["session_id"] if "session_id" in p else [])]
    g = p.groupby(["model", *keys, "diagnosis"], sort=False)
    out = g.agg(
        mean_prob_nmosd=("prob_nmosd", "mean"),
        sd_prob_nmosd=("prob_nmosd", "std"),
        times_correct=("correct", "sum"),
        times_tested=("correct", "size"),
    ).reset_index()
    out["always_wrong"] = out["times_correct"] == 0
    return out


def _fmt(v, digits=3) -> str:
    return (
        "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"
    )


def table2_display(t2: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "model": t2["model"],
            "repeats × folds": [
                f"{r} × {f // max(r, 1)}" for r, f in zip(t2["repeats"], t2["folds"], strict=True)
            ],
        }
    )
    for m in METRICS:
        out[m.replace("_", " ")] = [
            f"{_fmt(a)} ± {_fmt(s)} [{_fmt(lo)}, {_fmt(hi)}]"
            for a, s, lo, hi in zip(
                t2[f"{m}_mean"], t2[f"{m}_sd"], t2[f"{m}_ci_low"], t2[f"{m}_ci_high"], strict=True
            )
        ]
    out["AUC of pooled predictions"] = [_fmt(v) for v in t2["auc_pooled"]]
    return out


def table3_display(t3: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": t3["model"],
            "input": [
                f"{int(s)}³" if s == s and s else "lesion features" for s in t3["input_size"]
            ],
            "parameters": [f"{p / 1e6:.2f} M" if p and p == p else "–" for p in t3["parameters"]],
            "GFLOPs / forward": [_fmt(v, 2) for v in t3["gflops_per_forward"]],
            "s / epoch": [_fmt(v, 2) for v in t3["seconds_per_epoch"]],
            "s / fold": [_fmt(v, 1) for v in t3["seconds_per_fold"]],
            "inference ms / subject": [_fmt(v, 1) for v in t3["inference_ms_per_subject"]],
            "peak memory (MB)": [_fmt(v, 0) for v in t3["peak_memory_mb"]],
            "device": t3["device"],
        }
    )


def comparisons_display(cmp: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "metric": cmp["metric"],
            "comparison": [
                f"{a} − {b}" for a, b in zip(cmp["model_a"], cmp["model_b"], strict=True)
            ],
            "mean difference [95 % CI]": [
                f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]"
                for d, lo, hi in zip(
                    cmp["mean_difference"], cmp["ci_low"], cmp["ci_high"], strict=True
                )
            ],
            "t (df)": [f"{_fmt(t, 2)} ({d})" for t, d in zip(cmp["t"], cmp["df"], strict=True)],
            "p": [_fmt(p, 4) for p in cmp["p_value"]],
            "p (Holm)": [_fmt(p, 4) for p in cmp["p_holm"]],
        }
    )


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs the optional tabulate package)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"
