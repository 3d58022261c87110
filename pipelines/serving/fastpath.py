"""Flat-array scorers for the served model families, used only where they equal the model exactly.

scikit-learn's predict costs 10-20 ms for one row whatever the batch (per-tree Python calls, input
checks, and for HistGradientBoosting 200 OpenMP parallel regions per call), so a record-at-a-time
service spends nearly all its time in overhead. The models the platform trains are
``AnomalyScorer(Pipeline([SimpleImputer, StandardScaler, IsolationForest | HistGradientBoosting]))``:
here the imputer and scaler are array arithmetic; an isolation forest's trees are walked by each
tree's own compiled `apply` (without score_samples' input checks, chunking and joblib dispatch), a
gradient-boosting model's trees all at once with numpy, a level per step; in the same float32/float64
arithmetic and the same summation order as scikit-learn. ``compile_scorer`` checks the result against the
model's own ``predict`` on probe rows (missing values included) and returns None, so the caller keeps
scikit-learn's path, for any other model or any difference beyond 1e-12.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("pipelines.serving")
Scorer = Callable[[np.ndarray], np.ndarray]  # raw feature matrix (rows x model columns, NaN = null) -> scores
MAX_ABS_DIFFERENCE = 1e-12
MIN_FAST_ROWS, MAX_FAST_ROWS = 16, 4096


class _Forest:
    """A gradient-boosting model's trees as one node table: a leaf points to itself, so walking
    ``depth`` steps ends at every leaf; a missing value goes where its node's ``nan_left`` says."""

    def __init__(self, lefts, rights, features, thresholds):
        sizes = [len(a) for a in lefts]
        self.roots = np.cumsum([0, *sizes[:-1]])
        left, right, feature, threshold = [], [], [], []
        for offset, lt, rt, ft, th in zip(self.roots, lefts, rights, features, thresholds, strict=True):
            own = np.arange(len(lt)) + offset
            leaf = lt < 0
            left.append(np.where(leaf, own, lt + offset))
            right.append(np.where(leaf, own, rt + offset))
            feature.append(np.where(leaf, 0, ft))
            threshold.append(np.where(leaf, np.inf, th))
        self.left, self.right = np.concatenate(left), np.concatenate(right)
        self.feature = np.concatenate(feature).astype(np.intp)
        self.threshold = np.concatenate(threshold).astype(np.float64)
        self.leaf = self.left == np.arange(len(self.left))

    def leaves(self, X: np.ndarray, nan_left: np.ndarray) -> np.ndarray:
        """Leaf node (global index) of every row in every tree: shape (rows, trees)."""
        n_rows, n_trees = X.shape[0], len(self.roots)
        nodes = np.tile(self.roots, n_rows)  # row-major: (row, tree) pairs
        row_of = np.repeat(np.arange(n_rows), n_trees)
        flat = X.ravel()
        width = X.shape[1]
        active = np.flatnonzero(~self.leaf[nodes])
        while len(active):  # only the (row, tree) pairs not at a leaf yet take the next step
            at = nodes[active]
            values = flat[row_of[active] * width + self.feature[at]]
            go_left = np.where(np.isnan(values), nan_left[at], values <= self.threshold[at])
            at = np.where(go_left, self.left[at], self.right[at])
            nodes[active] = at
            active = active[~self.leaf[at]]
        return nodes.reshape(n_rows, n_trees)


def _preprocess(steps: list) -> Callable[[np.ndarray], np.ndarray] | None:
    """The imputer and scaler steps as array arithmetic, or None if a step is something else."""
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    ops = []
    for step in steps:
        if isinstance(step, SimpleImputer):
            stats = np.asarray(step.statistics_, dtype=np.float64)
            missing = step.missing_values
            if step.add_indicator or np.isnan(stats).any() or not (isinstance(missing, float) and np.isnan(missing)):
                return None  # columns dropped or added, or another missing marker: keep sklearn's path
            ops.append(lambda X, s=stats: np.where(np.isnan(X), s, X))
        elif isinstance(step, StandardScaler):
            mean = None if step.mean_ is None or not step.with_mean else np.asarray(step.mean_, np.float64)
            scale = None if step.scale_ is None or not step.with_std else np.asarray(step.scale_, np.float64)

            def scaled(X, mean=mean, scale=scale):
                X = X.copy()
                if mean is not None:
                    X -= mean
                if scale is not None:
                    X /= scale
                return X

            ops.append(scaled)
        elif step is not None and step != "passthrough":
            return None

    def run(X: np.ndarray) -> np.ndarray:
        for op in ops:
            X = op(X)
        return X

    return run


def _isolation_forest(model) -> Scorer | None:
    from sklearn.ensemble._iforest import _average_path_length

    if model._max_features != model.n_features_in_:
        return None  # per-tree feature subsets: keep sklearn's path
    trees = [est.tree_ for est in model.estimators_]
    offsets = np.cumsum([0, *(t.node_count for t in trees[:-1])]).astype(np.intp)
    depth_of = np.concatenate(
        [
            path + average - 1.0
            for path, average in zip(model._decision_path_lengths, model._average_path_length_per_tree, strict=True)
        ]
    ).astype(np.float64)
    denominator = len(trees) * _average_path_length([model._max_samples])[0]

    def score(X: np.ndarray) -> np.ndarray:
        # Each tree's own compiled walk (`Tree.apply`, what score_samples calls): isolation trees are
        # deep and unbalanced, and a level-per-step numpy walk of all trees at once cost 2-3.5x more
        # at 250-1,000 rows. float32 inputs against float64 thresholds, as sklearn compares them.
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        leaves = np.empty((len(X), len(trees)), dtype=np.intp)
        for j, tree in enumerate(trees):
            leaves[:, j] = tree.apply(X32)
        leaves += offsets
        depths = np.cumsum(depth_of[leaves], axis=1)[:, -1]  # tree by tree, as sklearn adds them
        if denominator == 0:
            return np.ones(len(X))
        return 2.0 ** (-(depths / denominator))  # AnomalyScorer: -score_samples

    return score


def _hist_gradient_boosting(model) -> Scorer | None:
    from scipy.special import expit

    if (
        getattr(model, "_preprocessor", None) is not None
        or model.n_trees_per_iteration_ != 1
        or len(getattr(model, "classes_", ())) != 2
        or type(model._loss).__name__ != "HalfBinomialLoss"
    ):
        return None
    predictors = [p[0] for p in model._predictors]
    if any(p.nodes["is_categorical"].any() for p in predictors):
        return None
    nodes = [p.nodes for p in predictors]
    forest = _Forest(
        [np.where(n["is_leaf"].astype(bool), -1, n["left"].astype(np.int64)) for n in nodes],
        [n["right"].astype(np.int64) for n in nodes],
        [n["feature_idx"] for n in nodes],
        [n["num_threshold"] for n in nodes],
    )
    value = np.concatenate([n["value"] for n in nodes]).astype(np.float64)
    nan_left = np.concatenate([n["missing_go_to_left"].astype(bool) for n in nodes])
    baseline = float(np.asarray(model._baseline_prediction).ravel()[0])

    def score(X: np.ndarray) -> np.ndarray:
        leaves = forest.leaves(X, nan_left)
        contributions = np.concatenate([np.full((len(X), 1), baseline), value[leaves]], axis=1)
        raw = np.cumsum(contributions, axis=1)[:, -1]  # baseline, then each iteration, as sklearn adds them
        return expit(raw)  # AnomalyScorer: predict_proba[:, 1]

    return score


def _build(estimator: Any, columns: list[str]) -> Scorer | None:
    from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest
    from sklearn.pipeline import Pipeline

    from pipelines.training import AnomalyScorer

    if type(estimator) is not AnomalyScorer or not isinstance(estimator.pipeline, Pipeline):
        return None
    pick = None
    if estimator.columns is not None:
        if not set(estimator.columns) <= set(columns):
            return None
        pick = np.array([columns.index(c) for c in estimator.columns], dtype=np.intp)
    steps = [s for _, s in estimator.pipeline.steps]
    final = steps[-1]
    pre = _preprocess(steps[:-1])
    if pre is None:
        return None
    if type(final) is IsolationForest:
        model_score = _isolation_forest(final)
    elif type(final) is HistGradientBoostingClassifier:
        model_score = _hist_gradient_boosting(final)
    else:
        return None
    if model_score is None:
        return None

    def score(X: np.ndarray) -> np.ndarray:
        return model_score(pre(X if pick is None else X[:, pick]))

    return score


def probe_rows(columns: list[str], n: int = 512, seed: int = 0) -> np.ndarray:
    """Rows on many scales with missing values: every branch of a tree is likely taken somewhere."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.integers(-2, 4, size=(n, 1))
    X = rng.normal(size=(n, len(columns))) * scales
    X[rng.random(X.shape) < 0.1] = np.nan
    return X


@dataclass
class FastScorer:
    """``score(matrix)`` equal to the model's predict; faster than it for batches up to ``max_rows``."""

    score: Scorer
    max_rows: int


def compile_scorer(estimator: Any, columns: list[str], reference: np.ndarray | None = None) -> FastScorer | None:
    """A flat-array scorer equal to ``estimator.predict`` on ``columns``, or None (see the module doc).

    ``reference``: rows to check on besides the synthetic probes (e.g. the model's training range).
    ``max_rows`` is where the two cost the same, timed here: the flat walk grows with rows x trees,
    scikit-learn's cost is mostly per call."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    try:
        score = _build(estimator, columns)
        if score is None:
            return None
        probes = probe_rows(columns)
        if reference is not None and len(reference):
            probes = np.concatenate([np.asarray(reference, dtype=np.float64), probes])
        expected = np.asarray(estimator.predict(pd.DataFrame(probes, columns=columns)), dtype=np.float64).ravel()
        with threadpool_limits(limits=1):  # as the predict thread runs it (batching._one_native_thread)
            started = time.perf_counter()
            estimator.predict(pd.DataFrame(probes[:MIN_FAST_ROWS], columns=columns))
            model_seconds = time.perf_counter() - started  # mostly per call: about the same for more rows
        started = time.perf_counter()
        got = score(probes)
        fast_seconds_per_row = (time.perf_counter() - started) / len(probes)
        difference = float(np.max(np.abs(got - expected))) if len(got) == len(expected) else np.inf
        if not difference <= MAX_ABS_DIFFERENCE:
            log.warning("fast scorer differs from the model by %.3g: using the model's own predict", difference)
            return None
        max_rows = int(min(MAX_FAST_ROWS, max(MIN_FAST_ROWS, model_seconds / max(fast_seconds_per_row, 1e-9))))
        return FastScorer(score, max_rows)
    except Exception as exc:  # noqa: BLE001 - an unexpected model layout: the model's own predict serves
        log.warning("no fast scorer for %s (%s): using the model's own predict", type(estimator).__name__, exc)
        return None
