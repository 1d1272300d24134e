"""How a network's accuracy grows with the number of training subjects, beside the lesion-load
baselines fitted on the same subjects, on one fixed independent test cohort.

For each n in ``--sizes``: a stratified subset of the training cache (nested: every smaller set
is part of the larger ones, with the cohort's class shares), ``fit_bundle`` of the network on it
(the paper's schedule unless told otherwise), which fits the three lesion-load baselines on the
same subjects, then ``evaluate_cohort`` on the test cohort (bootstrap intervals, paired
differences). The test cohort may share no subject or input file with the training cache:
evaluate's leakage check refuses it (make it with ``phantom --site T``).

Cross-validation on 88 subjects trains on 70; this asks whether a network that stays near the
lesion-load models there learns the maps' class pattern when it has more subjects.

    python -m benchmarks.sample_size TRAIN_CACHE TEST_COHORT --out DIR
        [--sizes 88,176,352] [--model twoview-18] [--epochs 100] [--precision fp32] [--seed 0]

Writes ``DIR/n-<n>/bundle`` and ``DIR/n-<n>/evaluation`` (fit's and evaluate's own folders) and
``DIR/sample_size.tsv`` (one row per size and model: accuracy, balanced accuracy and AUC with
their intervals, and the network's paired accuracy difference from each baseline). A size
whose evaluation is finished is read back, not redone, after checking that its bundle was
fitted on the same subset with the same options and seed: an interrupted run resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
from pydantic import ValidationError

from benchmarks import ArgumentParser
from nmosd_ms.bundle import load_bundle, read_info
from nmosd_ms.config import Precision, TrainConfig
from nmosd_ms.data.cache import PreparedCohort, load_prepared
from nmosd_ms.data.dataset import load_cohort
from nmosd_ms.data.ingest import Cohort
from nmosd_ms.errors import NmosdError
from nmosd_ms.evaluate import evaluate_cohort, find_overlap, read_tables
from nmosd_ms.fit import fit_bundle, fittable_spec
from nmosd_ms.io import inside, write_tsv
from nmosd_ms.locking import LOCK_NAME, exclusive

METRICS = ("accuracy", "balanced_accuracy", "auc")
TABLE = "sample_size.tsv"


def nested_subsets(labels: np.ndarray, sizes: list[int], seed: int) -> dict[int, list[int]]:
    """For each size, the positions of a stratified subset (cache order), each smaller subset
    inside every larger one: one seeded order per class, and the first k of each class taken,
    k in proportion to the class's share (rounded; the classes sum to the size)."""
    labels = np.asarray(labels)
    n = len(labels)
    if not sizes:
        raise ValueError("give at least one size")
    if len(set(sizes)) != len(sizes):
        raise ValueError("a size is given twice")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    out = {}
    for size in sizes:
        if not 2 * len(classes) <= size <= n:
            raise ValueError(f"size {size} must be between {2 * len(classes)} and {n}")
        k = {c: round(size * len(order[c]) / n) for c in classes}
        k[classes[-1]] = size - sum(k[c] for c in classes[:-1])
        if min(k.values()) < 2:
            raise ValueError(f"size {size} leaves a class fewer than 2 subjects")
        out[size] = sorted(int(i) for c in classes for i in order[c][: k[c]])
    return out


def _check_bundle(folder: Path, subset: PreparedCohort, model: str, train: TrainConfig, seed: int):
    info = read_info(folder)
    t = info.training
    if (info.model, t.cohort_hash, t.train, t.seed) != (model, subset.cohort_hash, train, seed):
        raise NmosdError(
            f"{folder} holds a bundle of another model, subset, training options or seed; "
            "choose another --out"
        )


def run_size(
    cohort: PreparedCohort,
    positions: list[int],
    test: Cohort,
    out: Path,
    model: str,
    train: TrainConfig,
    seed: int,
    n_resamples: int = 9999,
) -> pd.DataFrame:
    """Fit (or reuse) one size's bundle, evaluate (or read back) it: its rows of the table."""
    subset = cohort.subset(positions)
    bundle_dir = inside(out, "bundle")
    eval_dir = inside(out, "evaluation")
    if bundle_dir.exists():
        _check_bundle(bundle_dir, subset, model, train, seed)
    else:
        fit_bundle(subset, model, bundle_dir, train, seed=seed, device="cpu")
    tables = read_tables(eval_dir)
    if tables is not None:
        metrics, comparison = tables["metrics"], tables["comparison"]
    else:
        ev = evaluate_cohort(load_bundle(bundle_dir), test, eval_dir, n_resamples=n_resamples)
        metrics, comparison = ev.metrics, ev.comparison
    wide = metrics[metrics["metric"].isin(METRICS)].pivot(
        index="model", columns="metric", values=["value", "ci_low", "ci_high"]
    )
    rows = []
    counts = subset.counts
    for name in metrics["model"].drop_duplicates():
        row = {"n_train": len(positions), "n_nmosd": counts["NMOSD"], "n_ms": counts["MS"]}
        row["model"] = name
        for m in METRICS:
            row[m] = wide.loc[name, ("value", m)]
            row[f"{m}_ci_low"] = wide.loc[name, ("ci_low", m)]
            row[f"{m}_ci_high"] = wide.loc[name, ("ci_high", m)]
        diff = comparison[(comparison["baseline"] == name) & (comparison["metric"] == "accuracy")]
        row["network_minus_this"] = float(diff["difference"].iloc[0]) if len(diff) else np.nan
        row["difference_ci_low"] = float(diff["ci_low"].iloc[0]) if len(diff) else np.nan
        row["difference_ci_high"] = float(diff["ci_high"].iloc[0]) if len(diff) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def sample_size_curve(
    train_cache: str,
    test_dir: str,
    out_dir: str,
    sizes: list[int],
    model: str = "twoview-18",
    train: TrainConfig | None = None,
    seed: int = 0,
    n_resamples: int = 9999,
) -> pd.DataFrame:
    """Every size's rows (see the module docstring), also written to ``out_dir/sample_size.tsv``."""
    train = train or TrainConfig()
    fittable_spec(model)  # before the folder is made: refused input leaves nothing behind
    out = Path(out_dir)
    cohort = load_prepared(train_cache)
    subsets = nested_subsets(cohort.labels, sizes, seed)
    # read and checked before hours of training, with evaluate's own check (participant IDs and
    # input files), which evaluate would otherwise apply only after the first fit
    test = load_cohort(test_dir)
    inputs = cohort.inputs
    shared = find_overlap(inputs["participant_ids"], inputs["input_sha256"], list(test.subjects))
    ids, files = shared["participants"], shared["files"]
    if ids or files:
        example = (ids or files)[0]
        raise NmosdError(
            f"the test cohort shares {len(ids)} participant IDs and {len(files)} input files "
            f"with the training cache (e.g. {example}); make it with `nmosd-ms phantom --site T`"
        )
    out.mkdir(parents=True, exist_ok=True)
    lock = exclusive(inside(out, LOCK_NAME), f"the sample-size folder {out}")
    try:
        tables = [
            run_size(
                cohort, subsets[n], test, inside(out, f"n-{n}"), model, train, seed, n_resamples
            )
            for n in sorted(sizes)
        ]
        table = pd.concat(tables, ignore_index=True)
        write_tsv(inside(out, TABLE), table, float_format="%.4f")
    finally:
        lock.release()
    return table


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train_cache")
    ap.add_argument("test_cohort")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="88,176,352")
    ap.add_argument("--model", default="twoview-18")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--precision", default="fp32", choices=get_args(Precision))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        try:
            sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--sizes takes comma-separated integers, not {a.sizes!r}") from None
        # no held-out curve in a fit: one point at the end, so the options equal `nmosd-ms fit
        # --eval-every EPOCHS` and a bundle made by the command line is reused
        train = TrainConfig(epochs=a.epochs, precision=a.precision, eval_every=a.epochs)
        table = sample_size_curve(
            a.train_cache, a.test_cohort, a.out, sizes, a.model, train, a.seed
        )
    except ValidationError as e:  # an option out of range: its first error, as the CLI does
        first = e.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first.get("loc") else "option"
        print(f"error: invalid {option}: {first['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    except (NmosdError, ValueError) as e:  # bad input: one line, as the CLI does
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"accuracy on {a.test_cohort} [95 % bootstrap CI]; network minus each baseline, paired")
    for n, part in table.groupby("n_train", sort=True):
        print(f"n_train = {n}")
        for _, r in part.iterrows():
            diff = (
                ""
                if np.isnan(r["network_minus_this"])
                else f"   network {r['network_minus_this']:+.3f} "
                f"[{r['difference_ci_low']:+.2f}, {r['difference_ci_high']:+.2f}]"
            )
            print(
                f"  {r['model']:18s} {r['accuracy']:.3f} "
                f"[{r['accuracy_ci_low']:.2f}, {r['accuracy_ci_high']:.2f}]{diff}"
            )


if __name__ == "__main__":
    main()
