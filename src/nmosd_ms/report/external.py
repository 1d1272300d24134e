"""The external-validation page (``nmosd-ms evaluate``): one self-contained HTML page in the style
of the cv report, with ROC curves, a reliability diagram, confusion matrices and the tables.

The page is built in a temporary folder and moved into place, so an interrupted build never
leaves half a page.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ..derivatives import montage_path
from ..io import atomic_dir, write_text
from .build import CSS, embedded_image, escape_value, table_html
from .figures import COLORS, confusion_panel, plt, save_figure


def _fmt(v, digits=3) -> str:
    return (
        "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"
    )


def _with_ci(value, low, high) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if low is None or not math.isfinite(low):
        return _fmt(value)
    return f"{_fmt(value)} [{_fmt(low, 2)}, {_fmt(high, 2)}]"


def _by_row(df: pd.DataFrame, key: str, label: str, value: str) -> pd.DataFrame:
    """One row per ``key``, one column per metric: ``value`` [95 % CI]."""
    rows = []
    for name, g in df.groupby(key, sort=False):
        row = {label: name, **({"kind": g["kind"].iloc[0]} if "kind" in g else {})}
        for _, r in g.iterrows():
            row[r["metric"].replace("_", " ")] = _with_ci(r[value], r["ci_low"], r["ci_high"])
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_display(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per model, one column per metric: value [95 % CI]."""
    return _by_row(metrics, "model", "model", "value")


def comparison_display(comparison: pd.DataFrame) -> pd.DataFrame:
    """One row per baseline: the network's paired difference from it [95 % CI]."""
    return _by_row(comparison, "baseline", "network minus", "difference")


def _roc_figure(ev, folder: Path) -> Path | None:
    if not len(ev.roc):
        return None
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for i, (model, g) in enumerate(ev.roc.groupby("model", sort=False)):
        auc = ev.value(model, "auc")
        style = "-" if model == ev.network else "--"
        ax.plot(g["fpr"], g["tpr"], style, color=COLORS[i % 10], label=f"{model} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlabel("1 − specificity (MS called NMOSD)")
    ax.set_ylabel("sensitivity (NMOSD called NMOSD)")
    ax.set_title("ROC on the external cohort", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, folder, "roc")


def _reliability_figure(ev, folder: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 5))
    for i, (model, g) in enumerate(ev.calibration.groupby("model", sort=False)):
        color = COLORS[i % 10]
        ax.plot(g["mean_predicted"], g["observed_nmosd"], "-" if model == ev.network else "--",
                color=color, label=model)  # fmt: skip
        sizes = 15 + 60 * g["n"].to_numpy() / max(int(g["n"].max()), 1)
        ax.scatter(g["mean_predicted"], g["observed_nmosd"], s=sizes, color=color, zorder=3)
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean predicted P(NMOSD) in the bin")
    ax.set_ylabel("observed share of NMOSD in the bin")
    ax.set_title("reliability (quantile bins; marker size ∝ subjects)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, folder, "reliability")


def _confusion_figure(ev, folder: Path) -> Path:
    conf = ev.record["confusion"]
    n = len(conf)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.2), squeeze=False)
    for i, (ax, (model, c)) in enumerate(zip(axes[0], conf.items(), strict=True)):
        cm = np.array(
            [
                [c["true MS, called MS"], c["true MS, called NMOSD"]],
                [c["true NMOSD, called MS"], c["true NMOSD, called NMOSD"]],
            ]
        )
        confusion_panel(ax, cm, "called", "true" if i == 0 else "")
        t = ev.record["method"]["thresholds"][model]
        ax.set_title(f"{model}\n(NMOSD at P ≥ {t:g})", fontsize=9)
    fig.tight_layout(w_pad=2.0)
    return save_figure(fig, folder, "confusion")


def _probability_figure(ev, folder: Path) -> Path:
    p = ev.predictions
    col = f"prob_{ev.network}"
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    rng = np.random.default_rng(0)  # jitter only
    for i, dx in enumerate(("MS", "NMOSD")):
        v = p.loc[p["diagnosis"] == dx, col].to_numpy()
        ax.scatter(v, i + rng.uniform(-0.15, 0.15, v.size), s=14, color=COLORS[i], alpha=0.8)
    ax.axvline(ev.record["bundle"]["threshold"], color="grey", ls=":")
    ax.set_yticks([0, 1], ["true MS", "true NMOSD"])
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"P(NMOSD) of {ev.network}")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, folder, "probabilities")


def _summary_lines(ev) -> str:
    """The lead: the network's accuracy and AUC beside the best baseline's, in words."""
    net = ev.network
    acc, auc = ev.value(net, "accuracy"), ev.value(net, "auc")
    m = ev.metrics
    base = m[(m["model"] != net) & (m["metric"] == "balanced_accuracy")]
    text = (
        f"<p><b>{escape_value(net)}</b>: accuracy {_fmt(acc)}, AUC {_fmt(auc)} on "
        f"{ev.record['cohort']['n_subjects']} external subjects.</p>"
    )
    if not len(base):
        return text + (
            '<p class="warn">This bundle carries no lesion-load baselines, so nothing here shows '
            "whether the network beats a lesion counter on this cohort (fit or export the bundle "
            "again with this version).</p>"
        )
    best = base.sort_values("value", ascending=False, na_position="last").iloc[0]
    diff = ev.comparison[
        (ev.comparison["baseline"] == best["model"])
        & (ev.comparison["metric"] == "balanced_accuracy")
    ]
    if len(diff) and math.isfinite(diff["difference"].iloc[0]):
        d = diff.iloc[0]
        beats = d["ci_low"] > 0 if math.isfinite(d["ci_low"]) else False
        verdict = (
            "the interval excludes 0: the network beats it on this cohort"
            if beats
            else "the interval includes 0 or lies below it: on this cohort the network is not "
            "shown to beat it"
        )
        cls = "note" if beats else "warn"
        text += (
            f'<p class="{cls}">Best lesion-load baseline (balanced accuracy): '
            f"<b>{escape_value(best['model'])}</b>. Network minus it: {_with_ci(d['difference'], d['ci_low'], d['ci_high'])}"
            f" — {verdict}.</p>"
        )
    return text


def write_page(
    ev, folder: Path, files: list[str], segmentations: dict[str, str] | None = None
) -> dict[str, Path]:
    """Write ``folder/index.html`` and its figures (``folder/figures``); returns the figures.
    ``files`` names the tables written beside the folder (listed on the page);
    ``segmentations`` maps each subject segmented here to its mask's path beside the folder,
    linked from the page with its review montage."""
    with atomic_dir(folder) as tmp:
        figdir = tmp / "figures"
        figs = {
            "roc": _roc_figure(ev, figdir),
            "reliability": _reliability_figure(ev, figdir),
            "confusion": _confusion_figure(ev, figdir),
            "probabilities": _probability_figure(ev, figdir),
        }
        page = _page(ev, {k: v for k, v in figs.items() if v}, files, segmentations or {})
        write_text(tmp / "index.html", page)
    return {k: folder / "figures" / v.name for k, v in figs.items() if v}


def _segmentation_list(segmentations: dict[str, str]) -> str:
    """Links to the WMH masks made here and their montages (paths relative to the page)."""
    if not segmentations:
        return ""
    items = "".join(
        f'<li>{escape_value(key)}: <a href="../{escape_value(mask)}">mask</a> · '
        f'<a href="../{escape_value(montage_path(PurePosixPath(mask)).as_posix())}">montage</a></li>'
        for key, mask in segmentations.items()
    )
    return (
        "<h2>Lesion masks made here</h2>"
        f'<p class="note">{len(segmentations)} subject(s) came without a lesion mask; the '
        "network saw the WMH masks below (nmosd-ms segment). Review them before trusting "
        "those subjects' calls.</p>"
        f"<ul>{items}</ul>"
    )


def _page(ev, figs: dict[str, Path], files: list[str], segmentations: dict[str, str]) -> str:
    r = ev.record
    overlap = r["overlap"]
    warn = ""
    if overlap["participants"] or overlap["files"]:
        warn = (
            f'<p class="warn"><b>Not an external validation:</b> {len(overlap["participants"])} '
            f"participant(s) and {len(overlap['files'])} input file(s) are in the bundle's "
            "training cohort (evaluated with --allow-overlap; the column in_training of "
            "predictions.tsv marks them).</p>"
        )
    unchecked = [k for k, v in overlap["checked"].items() if not v]
    if unchecked:
        warn += (
            f'<p class="warn">The bundle records no {" or ".join(unchecked)} of its training '
            "cohort, so overlap could only be checked in part.</p>"
        )
    calib = pd.DataFrame(
        [
            {
                "model": m,
                "Brier": _fmt(c["brier"]),
                "calibration slope": "∞ (separated)" if c["separated"] else _fmt(c["slope"], 2),
                "calibration intercept": _fmt(c["intercept"], 2),
            }
            for m, c in r["calibration"].items()
        ]
    )
    b = r["bundle"]
    counts = r["cohort"]["counts"]

    def fig(name, caption):
        if name not in figs:
            return ""
        return f"<figure>{embedded_image(figs[name])}<figcaption>{caption}</figcaption></figure>"

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>nmosd-ms external validation</title><style>{CSS}</style></head><body>
<h1>External validation of {escape_value(b["model"])}</h1>
<p class="note">nmosd-ms {escape_value(r["nmosd_ms_version"])} · bundle {escape_value(b["path"])}
({escape_value(b["n_fold_models"])} fold model(s), trained on
{escape_value(", ".join(f"{v} {k}" for k, v in b["training_counts"].items()))}) · cohort
{escape_value(r["cohort"]["source"])}: {counts.get("NMOSD", 0)} NMOSD, {counts.get("MS", 0)} MS.
Research use only.</p>
{warn}
{_summary_lines(ev)}
<h2>How the cohorts differ</h2>
<ul>{"".join(f"<li>{escape_value(s)}</li>" for s in r["differences"])}</ul>
<h2>Performance</h2>
<p class="note">NMOSD is the positive class. The network calls NMOSD at P ≥
{escape_value(b["threshold"])} (the bundle's threshold), the lesion-load baselines at P ≥ 0.5. Intervals:
{escape_value(r["method"]["bootstrap"])}, level {escape_value(r["method"]["confidence"])}, seed
{escape_value(r["method"]["seed"])}. Each value is the metric on the whole cohort; the interval is not
centred on it. The baselines were fitted on the bundle's training cohort and never see this one
(shortcut: a single threshold on lesion load; classical: every lesion-load feature).</p>
{table_html(metrics_display(ev.metrics), "metrics")}
<h3>The network against each baseline (paired: the same resamples)</h3>
{table_html(comparison_display(ev.comparison), "comparison")}
{fig("roc", "ROC curves on the external cohort: the network (solid) and the lesion-load baselines (dashed).")}
{fig("confusion", "Confusion matrices at each model's threshold.")}
<h2>Calibration</h2>
<p class="note">{escape_value(r["method"]["calibration"])}. A slope below 1 means predictions too extreme
on this cohort; an intercept below 0 means NMOSD is predicted too often.</p>
{table_html(calib, "calibration")}
{fig("reliability", "Reliability diagram: observed NMOSD share against the mean prediction per bin.")}
{fig("probabilities", "The network's P(NMOSD) for every subject, by true diagnosis; the dotted line is the threshold.")}
{_segmentation_list(segmentations)}
<p class="note">Beside this folder: {escape_value(", ".join(files))}.</p>
</body></html>
"""
