"""The full paper protocol, timed end to end: ``make bench-protocol`` (about an hour on 2 cores).

``python -m benchmarks.protocol RUN_DIR`` summarises a finished ``nmosd-ms cv`` run folder from
its own records (``run.json`` start/finish times, options, executor; ``results/folds.tsv``) into
``benchmarks/results/protocol.json`` and ``protocol.md``. The Makefile target generates the
88-subject synthetic cohort, prepares it at 100³, runs the protocol with the fastest settings
for a 2-core CPU and then calls this.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd

from benchmarks import ArgumentParser

HERE = Path(__file__).resolve().parent


def summarise(run_dir: Path) -> dict:
    if not (run_dir / "run.json").is_file():
        raise SystemExit(f"error: {run_dir} is not a cv run folder (no run.json)")
    meta = json.loads((run_dir / "run.json").read_text())
    # cv writes "finished": null when it starts and the time when it ends
    if not meta.get("finished") or not (run_dir / "results" / "folds.tsv").is_file():
        raise SystemExit(f"error: {run_dir} has not finished (run.json has no finish time)")
    folds = pd.read_csv(run_dir / "results" / "folds.tsv", sep="\t")
    start = dt.datetime.fromisoformat(meta["started"])
    end = dt.datetime.fromisoformat(meta["finished"])
    opts = meta["options"]
    return {
        "started": meta["started"],
        "finished": meta["finished"],
        "wall_minutes": (end - start).total_seconds() / 60,
        "models": sorted(folds["model"].unique()),
        "folds_trained": int(len(folds)),
        "repeats": opts["repeats"],
        "folds": opts["folds"],
        "subjects": opts["n_subjects"],
        "size": opts["prepare"]["size"],
        "epochs": opts["train"]["epochs"],
        "precision": opts["train"]["precision"],
        "eval_every": opts["train"]["eval_every"],
        "executor": meta["executor"],
        "cpu_count": meta["environment"]["cpu_count"],
        "torch": meta["environment"]["torch"],
        "train_seconds_per_fold": float(folds["train_seconds"].mean()),
        "seconds_per_epoch": float(folds["seconds_per_epoch"].mean()),
        "mean_accuracy": float(folds["accuracy"].mean()),
    }


def to_markdown(r: dict) -> str:
    ex = r["executor"]
    return (
        f"Full protocol, {', '.join(r['models'])}: {r['repeats']} × {r['folds']} folds "
        f"({r['folds_trained']} trained), {r['subjects']} subjects at {r['size']}³, "
        f"{r['epochs']} epochs, {r['precision']}; executor {ex['name']} with {ex['workers']} "
        f"workers × {ex['threads_per_fold']} thread on {r['cpu_count']} cores "
        f"(torch {r['torch']}).\n\n"
        f"Wall time from the run's own start/finish records: **{r['wall_minutes']:.1f} min** "
        f"({r['started']} → {r['finished']}); {r['train_seconds_per_fold']:.1f} s of training "
        f"per fold, {r['seconds_per_epoch']:.3f} s per epoch per worker. Mean fold accuracy "
        f"on the synthetic cohort: {r['mean_accuracy']:.3f} (descriptive only).\n"
    )


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.protocol")
    ap.add_argument("run_dir", type=Path, help="a finished nmosd-ms cv run folder")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the results")
    args = ap.parse_args(argv)
    res = summarise(args.run_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "protocol.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "protocol.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
