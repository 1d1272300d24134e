"""``nmosd-ms report RUN_DIR``: tables, figures and one self-contained HTML page.

The report is built in a temporary folder next to ``RUN_DIR/report`` and swapped in at the end,
so an interrupted build never leaves a half-written report.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from ..constants import __version__
from ..io import atomic_dir, write_json, write_text, write_tsv
from . import figures
from .tables import (
    baselines,
    baselines_display,
    by_lesion_source,
    chance_level,
    comparisons,
    comparisons_display,
    completeness,
    lesion_sources,
    load_run,
    scan_ids,
    table2,
    table2_display,
    table3,
    table3_display,
    to_markdown,
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.3em .55em;text-align:left}th{background:#f3f5f8}
.note{color:#555;font-size:.9em}.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em 1em}
figure{margin:1.2em 0}figcaption{color:#444;font-size:.9em}img{max-width:100%}
"""


def escape_value(value) -> str:
    """Every value from a run folder is escaped before it reaches the page (run.json is a file
    a user can edit, or receive from someone else)."""
    return html.escape(str(value))


def table_html(df: pd.DataFrame, table_id: str) -> str:
    return df.to_html(
        index=False, escape=True, border=0, table_id=table_id, classes="data", na_rep="–"
    )


def embedded_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _pretext_html(train: dict) -> str:
    """The protocol's words for a fold's in-fold pretext (runs before it have no such key)."""
    n = int(train.get("pretext_epochs", 0))
    if not n:
        return ""
    return (
        f" + {n} epochs of the occupancy pretext on each fold's own training maps before "
        "the supervised epochs"
    )


def _baselines_html(base: pd.DataFrame) -> str:
    if not len(base):
        return (
            '<p class="warn">No lesion-load baseline or no deep model in this run, so nothing '
            "shows whether the deep model beats a lesion counter: run cv with --shortcut (the "
            "default) or add lesionload-stump to --models.</p>"
        )
    lost = base[(base["baseline_kind"] == "shortcut") & ~(base["margin"] > 0)]
    warn = ""
    if len(lost):
        names = ", ".join(sorted(set(lost["model"])))
        warn = (
            f'<p class="warn"><b>{escape_value(names)} did not beat the shortcut</b>: on this cohort a '
            "single threshold on lesion load does as well, so its accuracy says nothing about "
            "what it learnt from the images.</p>"
        )
    return warn + table_html(baselines_display(base), "baselines")


def _lesion_source_html(sources: dict | None, within: pd.DataFrame) -> str:
    if sources is None:
        return ""
    table = ""
    if len(within):
        shown = within.copy()
        for col in ("accuracy", "sensitivity", "specificity"):
            shown[col] = shown[col].map(lambda v: "–" if v != v else f"{v:.3f}")
        table = (
            '<p class="note">Held-out performance within each lesion source, pooled over all '
            "repeats (lesion_source.tsv):</p>" + table_html(shown, "lesion_source")
        )
    c = sources["counts"]
    line = (
        f"<b>Lesion maps:</b> NMOSD {c['NMOSD']['given']} given, {c['NMOSD']['segmented']} "
        f"segmented by nmosd-ms; MS {c['MS']['given']} given, {c['MS']['segmented']} segmented."
    )
    if not sources["unbalanced"]:
        return f"<p>{line}</p>{table}"
    share = sources["segmented_share"]
    return (
        f'<p class="warn">{line} <b>The share of automatically segmented maps differs between '
        f"the classes</b> (NMOSD {share['NMOSD']:.0%}, MS {share['MS']:.0%}; Fisher's exact "
        f"p = {sources['fisher_p']:.3g}): a model can learn the segmentation method instead of "
        "the disease. Prefer the same lesion source for every subject, or check that the "
        "results hold within each source.</p>" + table
    )


def _progress_html(status: dict) -> str:
    if status["complete"]:
        return ""
    parts = ", ".join(
        f"{escape_value(m)} {n} of {status['planned_folds']}"
        for m, n in status["finished_folds"].items()
    )
    return (
        f'<p class="warn"><b>Unfinished run</b> (folds finished: {parts}). Every table and figure '
        "below covers the finished folds only, and two models are compared on the folds both "
        "have finished. Build the report again when <code>nmosd-ms cv</code> has finished (or "
        "resume it with the same command).</p>"
    )


def build_report(run_dir: str | Path) -> Path:
    """Write the report of the cv run folder ``run_dir`` (``RUN_DIR/report/``: tables, figures,
    one HTML page) and return the path of ``index.html``. A run that is still training (or was
    stopped) is reported on its finished folds, and the page and ``report.json`` say so
    (``complete``, ``finished_folds``)."""
    run = load_run(run_dir)
    final = Path(run_dir) / "report"
    with atomic_dir(final, replace=True) as tmp:
        _write(run, tmp)
    return final / "index.html"


def report_status(index: str | Path) -> dict:
    """What the report at ``index`` (from :func:`build_report`) covers: ``complete``,
    ``planned_folds`` and ``finished_folds`` per model, as its report.json records them."""
    from ..io import read_json

    summary = read_json(Path(index).parent / "report.json", "report summary")
    return {k: summary[k] for k in ("complete", "planned_folds", "finished_folds")}


def _write(run, out: Path) -> None:
    t2, t3, cmp, base = table2(run), table3(run), comparisons(run), baselines(run)
    write_tsv(out / "table2.tsv", t2)
    write_tsv(out / "baselines.tsv", base)
    write_text(out / "baselines.md", to_markdown(baselines_display(base)))
    write_text(out / "table2.md", to_markdown(table2_display(t2)))
    write_tsv(out / "table3.tsv", t3)
    write_text(out / "table3.md", to_markdown(table3_display(t3)))
    write_tsv(out / "comparisons.tsv", cmp)
    write_text(out / "comparisons.md", to_markdown(comparisons_display(cmp)))
    figdir = out / "figures"
    figs = []
    lc = figures.learning_curves(run, figdir)
    if lc:
        figs.append(
            (
                lc,
                "Figure 4 (as in the paper): mean training and held-out accuracy per "
                "epoch; bands are ± SD over folds.",
            )
        )
    figs.append(
        (
            figures.roc_curves(run, figdir),
            "ROC curves: mean over repeats (each repeat "
            "pools its folds' held-out predictions), band ± SD.",
        )
    )
    figs.append(
        (
            figures.confusion_matrices(run, figdir),
            "Confusion matrices at P(NMOSD) ≥ 0.5, counts per repeat.",
        )
    )
    subj_png, subjects = figures.subject_probabilities(run, figdir)
    figs.append(
        (
            subj_png,
            "Mean predicted P(NMOSD) per subject across repeats (± SD); ▼ marks "
            "subjects misclassified in every repeat.",
        )
    )
    write_tsv(out / "subjects.tsv", subjects)

    meta = run.meta
    opts = meta["options"]
    counts = meta["cohort"]["counts"]
    n = sum(counts.values())
    chance = chance_level(run)
    train = opts["train"]
    env = meta["environment"]
    sources, within = lesion_sources(run), by_lesion_source(run)
    if len(within):
        write_tsv(out / "lesion_source.tsv", within)
    wrong = subjects[subjects["always_wrong"]]
    always_wrong = wrong.assign(scan=scan_ids(wrong)).groupby("model")["scan"].apply(list)
    status = completeness(run)
    summary = {
        "tool": "nmosd-ms report",
        "version": __version__,
        "run": str(run.root.resolve()),
        **status,
        "n_subjects": n,
        "counts": counts,
        "chance_level": chance,
        "protocol": {
            "folds": opts["folds"],
            "repeats": opts["repeats"],
            "seed": opts["seed"],
            "epochs": train["epochs"],
            "batch_size": train["batch_size"],
            "lr": train["lr"],
        },
        "device": env["device"],
        "models": run.models,
        "baselines": base.to_dict("records"),
        "always_wrong": {k: v for k, v in always_wrong.items()},
        "lesion_source": sources,
    }
    write_json(out / "report.json", summary)

    wrong_lines = (
        "".join(
            f"<li><b>{html.escape(m)}</b>: {html.escape(', '.join(ids))}</li>"
            for m, ids in always_wrong.items()
        )
        or "<li>none</li>"
    )
    e = escape_value
    r_k = e(f"{opts['repeats']} × {opts['folds']}")
    if not status["complete"]:
        r_k = f"finished (of the planned {r_k})"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nmosd-ms report</title><style>{CSS}</style></head><body>
<h1>NMOSD vs MS: cross-validation report</h1>
<p class="note">nmosd-ms {e(__version__)} · research use only, not for diagnosis · run
<code>{e(run.root)}</code></p>
{_progress_html(status)}
<p><b>Cohort:</b> {e(n)} subjects — {e(counts.get("NMOSD", 0))} NMOSD, {e(counts.get("MS", 0))} MS.
<b>Chance level</b> (always answering the majority class): {chance:.3f}.<br>
<b>Protocol:</b> {e(opts["folds"])}-fold stratified cross-validation repeated {e(opts["repeats"])}
time(s) on identical subject-level splits for every model (seed {e(opts["seed"])});
{e(train["epochs"])} epochs, SGD lr {e(train["lr"])} (×{e(train["gamma"])} every
{e(train["step_size"])} epochs), momentum {e(train["momentum"])}, batch {e(train["batch_size"])},
weights: {e(train["weights"])}{_pretext_html(train)}, precision {e(train["precision"])}. NMOSD is the positive class
(sensitivity = NMOSD recall, specificity = MS recall).<br>
<b>Device:</b> {e(env["device"])} ({e(env.get("device_name", ""))},
{e(env.get("cpu_count"))} CPUs, torch {e(env["torch"])}).</p>
{_lesion_source_html(sources, within)}
<h2>Table 2 — performance</h2>
<p class="note">Each cell: mean of the {r_k} held-out fold scores ± SD over repeats of each
repeat's mean fold score [95 % CI of that same mean from the corrected resampled t distribution,
clipped to [0, 1]]. With one repeat the SD is undefined. The last column is a second estimator,
labelled as such: each repeat's AUC on its folds' pooled held-out predictions, averaged over
repeats.</p>
{table_html(table2_display(t2), "table2")}
<h3>Deep models against the shortcut</h3>
<p class="note">A classifier of lesion maps must be compared with what needs no image: the
<b>shortcut</b> (lesionload-stump: the best single threshold on lesion count or volume, chosen on
each training part) and the <b>classical</b> lesion-load baselines (logistic regression / random
forest on load and coarse location features). Margin = deep model − baseline in mean fold
accuracy, corrected resampled t-test on the paired folds (baselines.tsv).</p>
{_baselines_html(base)}
<h3>Pairwise comparisons</h3>
<p class="note">Corrected resampled t-test (Nadeau &amp; Bengio 2003; Bouckaert &amp; Frank 2004):
variance × (1/(k·r) + n_test/n_train), df = k·r − 1; p-values Holm-adjusted across pairs, per
metric.</p>
{table_html(comparisons_display(cmp), "comparisons") if len(cmp) else "<p>Only one model: nothing to compare.</p>"}
<h2>Table 3 — complexity</h2>
<p class="note">Parameters and FLOPs per forward pass at the run's input size; times and memory
measured during the run on the device above (peak memory is the process peak, so a model run
after a larger one inherits that peak).</p>
{table_html(table3_display(t3), "table3")}
<h2>Figures</h2>
{"".join(f"<figure>{embedded_image(p)}<figcaption>{html.escape(c)}</figcaption></figure>" for p, c in figs)}
<h3>Subjects misclassified in every repeat</h3><ul>{wrong_lines}</ul>
<p class="note">Files: table2.tsv/.md, baselines.tsv/.md, table3.tsv/.md, comparisons.tsv/.md, subjects.tsv,
{"lesion_source.tsv, " if len(within) else ""}report.json, figures/*.png and *.svg.</p>
</body></html>
"""
    write_text(out / "index.html", page)
    write_text(
        out / "README.md",
        (
            "# nmosd-ms report\n\n`index.html` is self-contained (figures embedded). Tables: "
            "`table2` (performance), `comparisons` (corrected resampled t-tests, Holm), `table3` "
            "(complexity), `subjects` (per-subject mean probabilities), `lesion_source` (when "
            "some lesion maps were segmented by nmosd-ms: performance within each source). "
            "`report.json` summarises the cohort (with how its lesion maps were obtained), "
            "protocol and device. Figures in `figures/` as PNG and SVG.\n"
        ),
    )
