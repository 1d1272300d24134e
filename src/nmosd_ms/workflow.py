"""The demo workflow: synthetic cohort -> prepare -> quick cross-validation -> report.

A quick version of the paper's protocol that finishes in minutes on two CPU cores; re-running it
resumes every step (the phantom is reused, the cache is reused, finished folds are skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from .config import CVConfig, PrepareConfig, TrainConfig
from .data.ingest import load_cohort
from .data.preprocess import prepare
from .phantom import generate_cohort
from .report import build_report
from .training.cv import run_cv

ProgressFactory = Callable[[str], contextlib.AbstractContextManager]

DEMO_MODELS = ("twoview-18", "resnet3d-18", "lesionload-logreg")
DEMO_TRAIN = TrainConfig(epochs=15, batch_size=8, eval_every=3)
DEMO_3D_SIZE = 32  # the 3D baseline at 100³ costs ~30x the two-view model per step (make bench)

FULL_PROTOCOL = (
    "nmosd-ms cv {cache} --out {out}/paper-run "
    "--models twoview-18,twoview-34,resnet3d-18,resnet3d-34,lesionload-logreg "
    "--repeats 15 --folds 5 --epochs 100 && nmosd-ms report {out}/paper-run"
)


@contextlib.contextmanager
def _silent(label: str):
    yield lambda *a, **k: None


def run_demo(
    out_dir: str | Path,
    seed: int = 0,
    difficulty: str = "paper",
    repeats: int = 1,
    folds: int = 5,
    progress: ProgressFactory = _silent,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo into ``out_dir``; returns paths of what it wrote."""
    out = Path(out_dir)
    cohort_dir, cache, run = out / "cohort", out / "cache", out / "run"
    if (cohort_dir / "participants.tsv").is_file():
        log(f"reusing the synthetic cohort in {cohort_dir}")
    else:
        with progress("1/4 phantom") as bar:
            generate_cohort(cohort_dir, 41, 47, seed, difficulty, workers=2, progress=bar)
    with progress("2/4 prepare") as bar:
        prepare(load_cohort(cohort_dir), cache, PrepareConfig(size=100), workers=2, progress=bar)
    config = CVConfig(
        models=DEMO_MODELS,
        repeats=repeats,
        folds=folds,
        seed=seed,
        model_sizes={"resnet3d-18": DEMO_3D_SIZE},
        train=DEMO_TRAIN,
    )
    with progress("3/4 cv") as bar:
        run_cv(cache, run, config, device="auto", progress=bar)
    log("4/4 report")
    index = build_report(run)
    return {
        "cohort": cohort_dir,
        "cache": cache,
        "run": run,
        "report": index,
        "full_protocol": FULL_PROTOCOL.format(cache=cache, out=out),
    }
