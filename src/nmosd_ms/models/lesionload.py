"""Classical lesion-load baselines (scikit-learn) on the features computed by ``prepare``.

- ``lesionload-stump``: the shortcut a reviewer asks about first — the best single threshold on
  one *load* feature (lesion count, total, mean or largest volume), a depth-1 tree chosen on the
  training part of each fold. It sees no location at all: an imaging model that cannot beat it
  has learnt nothing but a lesion counter could.
- ``lesionload-logreg`` / ``-forest``: classical baselines on every feature, including coarse
  location (central fraction, asymmetry, extents); not pure shortcuts.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.tree import DecisionTreeClassifier

from ..data.features import FEATURES

#: Volumes are log-transformed (log1p) before scaling: lesion volumes are lognormal.
LOG_FEATURES = ("total_ml", "mean_lesion_ml", "max_lesion_ml", "n_lesions")
#: What the stump may threshold: lesion load only, no location.
LOAD_FEATURES = ("n_lesions", "total_ml", "mean_lesion_ml", "max_lesion_ml")
#: The models that see lesion load alone (shortcut baselines, shown beside every deep model).
SHORTCUT_MODELS = ("lesionload-stump",)


def _load_columns(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)[:, [FEATURES.index(f) for f in LOAD_FEATURES]]


def _log_volumes(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float64, copy=True)
    for i, name in enumerate(FEATURES):
        if name in LOG_FEATURES:
            x[:, i] = np.log1p(x[:, i])
    return x


def build_lesionload(name: str, seed: int = 0) -> Pipeline:
    log = FunctionTransformer(_log_volumes)
    if name == "lesionload-logreg":
        return make_pipeline(log, StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    if name == "lesionload-stump":
        return make_pipeline(
            FunctionTransformer(_load_columns),
            DecisionTreeClassifier(max_depth=1, random_state=seed),
        )
    if name == "lesionload-forest":
        return make_pipeline(
            log, RandomForestClassifier(n_estimators=500, min_samples_leaf=2, random_state=seed)
        )
    raise ValueError(name)
