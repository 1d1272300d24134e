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


# --- Fitted lesion-load models as plain arrays (bundles carry them; nothing is pickled) --------
# A bundle must never unpickle (safetensors + JSON only), and scikit-learn offers no pickle-free
# format, so a fitted pipeline is written here as its parameters (scaler moments, coefficients,
# tree nodes) and evaluated by the few lines below. ``test_lesionload_arrays_equal_sklearn``
# checks the result equals scikit-learn's predict_proba on every model.

_TREE_FIELDS = ("left", "right", "feature", "threshold", "p_nmosd")


def _tree_arrays(trees) -> dict[str, np.ndarray]:
    """The nodes of fitted scikit-learn trees, concatenated; ``offsets`` delimits each tree."""
    parts = {k: [] for k in _TREE_FIELDS}
    offsets = [0]
    for t in trees:
        tree = t.tree_
        value = tree.value[:, 0, :]
        parts["left"].append(tree.children_left.astype(np.int64))
        parts["right"].append(tree.children_right.astype(np.int64))
        parts["feature"].append(tree.feature.astype(np.int64))
        parts["threshold"].append(tree.threshold.astype(np.float64))
        positive = list(t.classes_).index(1)
        parts["p_nmosd"].append(value[:, positive] / value.sum(axis=1))
        offsets.append(offsets[-1] + tree.node_count)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["offsets"] = np.asarray(offsets, dtype=np.int64)
    return out


def _trees_p_nmosd(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    # scikit-learn compares float32 inputs with float64 thresholds: do the same, for equality
    x = x.astype(np.float32).astype(np.float64)
    offsets = arrays["offsets"]
    rows = np.arange(len(x))
    probs = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        left, right = arrays["left"][a:b], arrays["right"][a:b]
        feature, threshold = arrays["feature"][a:b], arrays["threshold"][a:b]
        node = np.zeros(len(x), dtype=np.int64)
        while True:
            inner = left[node] >= 0
            if not inner.any():
                break
            f = np.where(inner, feature[node], 0)
            go_left = x[rows, f] <= threshold[node]
            node = np.where(inner, np.where(go_left, left[node], right[node]), node)
        probs.append(arrays["p_nmosd"][a:b][node])
    return np.mean(probs, axis=0)


def lesionload_arrays(name: str, pipeline: Pipeline) -> dict[str, np.ndarray]:
    """The parameters of a fitted :func:`build_lesionload` pipeline as named arrays (for a
    safetensors file); :class:`LesionLoadModel` evaluates them."""
    last = pipeline[-1]
    if name == "lesionload-logreg":
        scaler = pipeline[1]
        positive = list(last.classes_).index(1)
        sign = 1.0 if positive == 1 else -1.0
        return {
            "mean": scaler.mean_.astype(np.float64),
            "scale": scaler.scale_.astype(np.float64),
            "coef": sign * last.coef_[0].astype(np.float64),
            "intercept": sign * last.intercept_.astype(np.float64),
        }
    if name == "lesionload-stump":
        return _tree_arrays([last])
    if name == "lesionload-forest":
        return _tree_arrays(last.estimators_)
    raise ValueError(name)


class LesionLoadModel:
    """A fitted lesion-load model read back from its arrays: ``predict_proba(features)`` gives
    P(NMOSD) for rows of :data:`~nmosd_ms.data.features.FEATURES`, as scikit-learn would."""

    def __init__(self, name: str, arrays: dict[str, np.ndarray]):
        need = (
            ("mean", "scale", "coef", "intercept")
            if name == "lesionload-logreg"
            else (*_TREE_FIELDS, "offsets")
        )
        if name not in ("lesionload-logreg", "lesionload-stump", "lesionload-forest"):
            raise ValueError(f"unknown lesion-load model {name!r}")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ValueError(f"{name}: missing arrays {', '.join(missing)}")
        self.name = name
        self.arrays = {k: np.asarray(arrays[k]) for k in need}

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURES):
            raise ValueError(f"expected rows of {len(FEATURES)} features, got {x.shape}")
        a = self.arrays
        if self.name == "lesionload-logreg":
            z = (_log_volumes(x) - a["mean"]) / a["scale"]
            return 1.0 / (1.0 + np.exp(-(z @ a["coef"] + a["intercept"][0])))
        x = _load_columns(x) if self.name == "lesionload-stump" else _log_volumes(x)
        return _trees_p_nmosd(a, x)


#: The lesion-load models a bundle carries, fitted on its whole training cohort.
BUNDLED = ("lesionload-stump", "lesionload-logreg", "lesionload-forest")


def fit_lesionload_arrays(
    features: np.ndarray, labels: np.ndarray, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Fit every :data:`BUNDLED` model on ``features`` (rows of FEATURES) and ``labels``
    (1 = NMOSD); returns their parameters as arrays (:func:`lesionload_arrays`)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    return {n: lesionload_arrays(n, build_lesionload(n, seed).fit(x, y)) for n in BUNDLED}
