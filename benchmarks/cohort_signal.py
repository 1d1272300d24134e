"""Where a prepared cohort's class signal lies: lesion load, coarse location, or the map itself.

Four classical models on the splits ``nmosd-ms cv`` would use (same seed, folds, repeats):

- ``lesionload-stump``, ``-logreg``, ``-forest``: the registry's lesion-load baselines (load
  features; logreg and forest also the coarse location summaries), seeded as in ``cv``;
- ``lesionmap-forest``: a random forest on the prepared lesion maps mean-pooled to ``cells``³
  blocks (10³ by default: blocks of 10 voxels at 100³, ~15 mm of brain). It sees *where*
  lesion lies at that scale and nothing of shape below it.

If the map forest beats the load models by a wide margin, the cohort can tell a spatial model
from a lesion counter, whatever a network makes of it. This is a diagnostic of the cohort, not
one of the toolkit's models: nothing exports it, and a network is compared in ``cv``'s report
with the registry's baselines only.

    python -m benchmarks.cohort_signal CACHE [--cells 10] [--folds 5] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.ensemble import RandomForestClassifier

from benchmarks import ArgumentParser
from nmosd_ms.data.cache import load_prepared
from nmosd_ms.data.features import FEATURES
from nmosd_ms.errors import NmosdError
from nmosd_ms.evaluation.metrics import binary_metrics
from nmosd_ms.evaluation.stats import corrected_ci
from nmosd_ms.models.lesionload import build_lesionload
from nmosd_ms.training.plan import fold_seed, plan_splits

LOAD_MODELS = ("lesionload-stump", "lesionload-logreg", "lesionload-forest")
MAP_MODEL = "lesionmap-forest"


def pooled_maps(volumes: np.ndarray, cells: int) -> np.ndarray:
    """(N, cells³): each map's mean over ``cells``³ blocks (the edge that does not fill a
    block is dropped)."""
    if cells < 1:
        raise ValueError("cells must be at least 1")
    n, size = volumes.shape[0], volumes.shape[1]
    step = size // cells
    if step < 1:
        raise ValueError(f"cells must be at most the volume size ({size})")
    v = volumes[:, : step * cells, : step * cells, : step * cells]
    return v.reshape(n, cells, step, cells, step, cells, step).mean(axis=(2, 4, 6)).reshape(n, -1)


def cohort_signal(
    cache, cells: int = 10, folds: int = 5, repeats: int = 3, seed: int = 0
) -> dict[str, list[float]]:
    """Fold accuracies of the three lesion-load models and the map forest on ``cache``."""
    cohort = load_prepared(cache)
    y = cohort.labels
    features = cohort.features().loc[cohort.ids, list(FEATURES)].to_numpy(float)
    maps = pooled_maps(cohort.volumes, cells)
    scores: dict[str, list[float]] = {m: [] for m in (*LOAD_MODELS, MAP_MODEL)}
    for split in plan_splits(y, folds, repeats, seed, groups=cohort.participants):
        tr, te = split.train_idx, split.test_idx
        for name in scores:
            s = fold_seed(seed, name, split.repeat, split.fold)
            if name == MAP_MODEL:
                model, x = RandomForestClassifier(n_estimators=500, random_state=s), maps
            else:
                model, x = build_lesionload(name, seed=s), features
            model.fit(x[tr], y[tr])
            prob = model.predict_proba(x[te])[:, 1]
            scores[name].append(binary_metrics(y[te], prob)["accuracy"])  # cv's metrics
    return scores


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cache")
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        scores = cohort_signal(a.cache, a.cells, a.folds, a.repeats, a.seed)
    except (NmosdError, ValueError) as e:  # a bad cache or option: one line, as the CLI does
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    n_test = 1.0 / a.folds
    print(f"{a.repeats} x {a.folds} folds, map pooled to {a.cells}^3; mean fold accuracy [95 % CI]")
    for name, s in scores.items():
        lo, hi = corrected_ci(s, 1.0 - n_test, n_test)
        # accuracy is a proportion: clip the t interval to [0, 1], as the report's table 2 does
        print(f"  {name:18s} {np.mean(s):.3f} [{max(lo, 0.0):.2f}, {min(hi, 1.0):.2f}]")


if __name__ == "__main__":
    main()
