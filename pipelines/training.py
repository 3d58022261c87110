"""Train anomaly detectors on gold data, evaluate them on a later held-out time range, log all to MLflow.

Leakage rules, in one place:
- the test set is the LATEST ``train.test_fraction`` of the time range (``split_by_time``);
- the model family is chosen by PR-AUC on a validation slice at the END of the training range
  (candidates are fitted on the part before it), then the winner is refitted on the whole training range;
- the decision threshold is chosen inside the training range only: F1-best on the validation slice's
  labels (scores of the candidate that never saw it), else F1-best on the training labels, else the
  score quantile matching ``contamination`` when the training range has no labels;
- the test set is touched once, for reporting.

Families: ``isolation_forest`` (unsupervised, learns "normal"; the one that works on unlabelled
data such as NAB) and ``hist_gradient_boosting`` (supervised, fitted on the labelled rows of the
training range; only a candidate when those rows hold enough anomalies). ``local_outlier_factor``
is still available via ``train.families`` but off by default: its kd-tree scoring is ~50x slower.
Each family may score a subset of the gold features (``AnomalyScorer.columns``): the model's input
schema stays the whole gold feature set, so serving and the gate never depend on the family.

The logged model is an ``AnomalyScorer`` (a tiny sklearn estimator defined here) wrapping the
fitted sklearn Pipeline; its ``predict`` returns the anomaly score (higher = more anomalous), so the
pyfunc flavour, ``mlflow models serve`` and the registry gate all get scores, not labels.
It is serialised with skops; the types skops must trust are listed in ``SKOPS_TRUSTED_TYPES``.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

# skops finds a model's types by walking sys.modules with getattr; inside an Airflow task that touches
# every deprecated Airflow attribute and printed ~1,160 DeprecatedImportWarning lines per training log.
# Known noise attributed to skops' own module, so only it is silenced.
warnings.filterwarnings("ignore", module=r"skops\.io\._utils")

NON_FEATURE_COLUMNS = ("device", "ts", "event_date", "label", "is_anomaly")
FAULT_TYPES = ("spike", "stuck", "drift", "dropout")
FAMILIES = ("streaming_detector", "isolation_forest", "hist_gradient_boosting", "local_outlier_factor")
DEFAULT_FAMILIES = ("streaming_detector", "isolation_forest", "hist_gradient_boosting")
# Families that score a device's readings in time order from per-device state (pipelines.detectors):
# their input is (device, ts, readings), not the gold features.
STREAMING_FAMILIES = ("streaming_detector",)
SUPERVISED_FAMILIES = ("hist_gradient_boosting",)
# A supervised candidate needs at least this many labelled anomalies in the rows it is fitted on.
MIN_SUPERVISED_POSITIVES = 10
# Gold feature suffixes that describe a deviation from the recent past rather than a level: the
# unsupervised families see only these by default (levels like co or hour_sin are mostly noise to
# an isolation forest and drown the faults; see README "Model").
DEVIATION_SUFFIXES = ("_roll_std", "_delta", "_zscore", "_flat_count", "_long_dev")
DEFAULT_VALIDATION_FRACTION = 0.2
GX_SUMMARY_TAG_MAX = 250
TAG_VALUE_MAX = 5000  # MLflow caps tag values (8,000 chars); full JSON goes to artifacts

# Exactly the type names skops reports as untrusted for our families (skops 0.16,
# scikit-learn 1.9). Anything else showing up is refused, not silently trusted (see _check_skops_types).
SKOPS_TRUSTED_TYPES = [
    "pipelines.training.AnomalyScorer",
    "pipelines.training.StreamingScorer",
    "numpy.dtype",
    "sklearn.tree._tree.Tree",  # IsolationForest trees
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",  # HistGradientBoosting trees
    "sklearn.neighbors._kd_tree.KDTree",  # LocalOutlierFactor neighbour index
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
]

Progress = Callable[[str], Any]


class AnomalyScorer(BaseEstimator):
    """sklearn-compatible wrapper whose ``predict`` returns the anomaly score (higher = more anomalous).

    Unsupervised detectors (IsolationForest / LocalOutlierFactor): ``score_samples`` is higher for
    normal points, so the score is its negation. Classifiers: the predicted probability of an anomaly.
    ``columns`` (optional) is the subset of input columns the pipeline uses. Top-level class so skops
    can serialise it (trusted as its dotted name).
    """

    def __init__(self, pipeline=None, columns=None):
        self.pipeline = pipeline
        self.columns = columns

    def _select(self, X):
        if self.columns is None or not hasattr(X, "loc"):
            return X
        return X[list(self.columns)]

    def fit(self, X, y=None):
        if self._supervised:
            self.pipeline.fit(self._select(X), np.asarray(y, dtype=int))
        else:
            self.pipeline.fit(self._select(X))
        return self

    @property
    def _supervised(self) -> bool:
        return hasattr(self.pipeline, "predict_proba") and not hasattr(self.pipeline, "score_samples")

    def predict(self, X):
        X = self._select(X)
        if self._supervised:
            return np.asarray(self.pipeline.predict_proba(X)[:, 1], dtype=np.float64)
        return -np.asarray(self.pipeline.score_samples(X), dtype=np.float64)


_DETECTORS: dict = {}


class StreamingScorer(BaseEstimator):
    """A causal streaming detector (``pipelines.detectors``) as a model: one detector state per device
    and reading, learned from the training rows in time order; ``predict`` continues each device's
    stream from the state at the end of its training rows (a copy: the model itself never changes),
    so scoring the rows that follow training gives exactly what online scoring gives. A row's score
    is the highest over its readings. Input columns: device, ts and the readings.

    The states are kept as numpy arrays when the detector packs them (the compiled contextual
    detector: ``_encode``), else as JSON text (``encode_state``; models saved before the compiled
    detector too). skops serialises both as plain data, and decoding builds only the detectors' own
    state classes."""

    def __init__(self, detector: str = "contextual", readings=None, config=None, states=None):
        self.detector = detector
        self.readings = readings
        self.config = config
        self.states = states

    def _detector(self):
        from pipelines.detectors import DETECTORS

        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; use one of {sorted(DETECTORS)}")
        key = (self.detector, json.dumps(self.config or {}, sort_keys=True))
        if key not in _DETECTORS:  # one instance per configuration: live passes call this per pass
            _DETECTORS[key] = DETECTORS[self.detector](**(self.config or {}))
        return _DETECTORS[key]

    @property
    def columns(self) -> list[str]:
        return ["device", "ts", *(self.readings or [])]

    def _streams(self, X: pd.DataFrame):
        """Each device's rows in time order: (device, positions in X, {reading: values}). One sort for
        the whole frame (ties keep their order), then slices: no per-device pandas indexing, which cost
        more than the detector itself when a live pass holds a few readings of each of 100 devices."""
        if not len(X):
            return
        # codes whose order is the values' order (NA: -1), then one stable sort by (device, ts): pandas'
        # sort_values on the frame cost ~1.5 ms a live pass, more than stepping its readings
        devices, names = pd.factorize(X["device"], sort=True)
        times, _ = pd.factorize(X["ts"], sort=True)
        times = np.where(times < 0, len(X), times)  # a missing time sorts last within its device
        order = np.lexsort((times, devices))
        order = order[devices[order] >= 0]  # rows without a device are not anyone's stream
        if not len(order):
            return
        codes = devices[order]
        names = np.asarray(names.astype(str), dtype=object)
        values = {c: X[c].to_numpy(dtype=float, na_value=np.nan)[order] for c in self.readings or []}
        bounds = np.concatenate(([0], np.flatnonzero(codes[1:] != codes[:-1]) + 1, [len(codes)]))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            yield names[codes[a]], order[a:b], {c: v[a:b] for c, v in values.items()}

    def fit(self, X, y=None):
        detector = self._detector()
        states: dict = {}
        for device, _, values in self._streams(X):
            states[device] = {}
            for col, series in values.items():
                state = detector.new_state()
                detector.score_series(None, series, state=state)
                states[device][col] = state
        self.states = self._encode(detector, states)
        # where the training rows end: a live scorer that restarts replays what came after (warm_streams)
        ts = pd.to_datetime(X["ts"], utc=True) if len(X) else pd.Series([], dtype="datetime64[ns, UTC]")
        self.trained_until_ = None if ts.isna().all() else ts.max().isoformat()
        return self

    @staticmethod
    def _encode(detector, states: dict):
        """A detector that packs its states into arrays (the compiled contextual detector) stores
        them so: {"keys": [[device, reading], ...], <array name>: array, ...}, loaded in milliseconds.
        Otherwise JSON text (``encode_state``). skops serialises both as plain data."""
        keys = [[device, col] for device, per in states.items() for col in per]
        packed = getattr(detector, "pack_states", lambda _: None)([states[d][c] for d, c in keys])
        if packed is None:
            return encode_state(states)
        return {"keys": keys, **packed}

    def predict(self, X):
        return self.continue_streams(self.training_states(), X)

    def training_states(self) -> dict:
        """A fresh copy of each device's detector state at the end of its training rows."""
        if not self.states:
            return {}
        if isinstance(self.states, str):
            return decode_state(self.states)
        unpacked = self._detector().unpack_states({k: v for k, v in self.states.items() if k != "keys"})
        states: dict = {}
        for (device, col), state in zip(self.states["keys"], unpacked, strict=True):
            states.setdefault(device, {})[col] = state
        return states

    def continue_streams(self, states: dict, X) -> np.ndarray:
        """The score of each row of ``X``, each device's stream continued from ``states`` (from
        `training_states`), which it advances: the live path keeps them from one pass to the next, so
        scoring rows pass by pass gives what one call on all of them gives."""
        detector = self._detector()
        out = np.zeros(len(X), dtype=np.float64)
        work = []  # (rows of X, state, values): one per device and reading, each state its own
        for device, order, values in self._streams(X):
            per_reading = states.setdefault(device, {})
            for col, series in values.items():
                state = per_reading.get(col)
                if state is None:
                    state = per_reading[col] = detector.new_state()
                work.append((order, state, series))

        scores = detector.score_many([state for _, state, _ in work], [series for _, _, series in work])
        for (order, _, _), score in zip(work, scores, strict=True):
            out[order] = np.fmax(out[order], score)  # a device's score: its readings' highest
        return out

    def alarm_threshold(self) -> float | None:
        """The detector's own alarm threshold (chosen by measurement on NAB), if it declares one."""
        value = getattr(self._detector().config, "alarm_threshold", None)
        return None if value is None else float(value)


def encode_state(value: Any) -> str:
    """A detector's state (dataclasses, dicts with any keys, tuples, lists, numbers) as JSON text."""

    def enc(v: Any) -> Any:
        import dataclasses as dc

        if dc.is_dataclass(v) and not isinstance(v, type):
            if callable(getattr(v, "sync", None)):
                v.sync()  # a detector state advanced by compiled code: its fields brought up to date
            return {
                "__state__": f"{type(v).__module__}.{type(v).__qualname__}",
                "f": {f.name: enc(getattr(v, f.name)) for f in dc.fields(v)},
            }
        if isinstance(v, dict):
            return {"__dict__": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray):
            return {"__array__": v.tolist(), "dtype": str(v.dtype)}
        if isinstance(v, float) and not np.isfinite(v):
            return {"__float__": repr(v)}
        return v

    return json.dumps(enc(value), separators=(",", ":"))


def decode_state(text: str) -> Any:
    """Inverse of ``encode_state``; builds only state classes defined in ``pipelines.detectors``."""
    import importlib

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__state__" in v:
            module, _, name = v["__state__"].rpartition(".")
            if not module.startswith("pipelines.detectors"):
                raise ValueError(f"refusing to build {v['__state__']!r}: not a pipelines.detectors state class")
            cls = getattr(importlib.import_module(module), name)
            return cls(**{k: dec(x) for k, x in v["f"].items()})
        if "__dict__" in v:
            return {_hashable(dec(k)): dec(x) for k, x in v["__dict__"]}
        if "__tuple__" in v:
            return tuple(dec(x) for x in v["__tuple__"])
        if "__array__" in v:
            return np.asarray(v["__array__"], dtype=v["dtype"])
        if "__float__" in v:
            return float(v["__float__"])
        return {k: dec(x) for k, x in v.items()}

    return dec(json.loads(text))


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def default_detector() -> str:
    from pipelines.detectors import DEFAULT_DETECTOR

    return DEFAULT_DETECTOR


def model_inputs(model, feats: list[str]) -> list[str]:
    """The columns a fitted family reads from a gold frame."""
    return model.columns if isinstance(model, StreamingScorer) else list(feats)


@dataclass
class TrainingContext:
    """Lineage recorded with a run: where the data came from and who ran the training."""

    dataset_name: str = "gold"
    data_snapshot: dict = field(default_factory=dict)  # e.g. gold manifest: partitions, content hash
    git_commit: str | None = None
    dvc_lock_digest: str | None = None
    gx_summary: dict | None = None
    airflow_dag_id: str | None = None
    airflow_run_id: str | None = None
    label_windows: list | None = None  # known anomaly windows [(start, end)], for event-level scores


@dataclass
class TrainResult:
    run_id: str
    model_uri: str
    model_family: str
    metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    threshold: float
    candidate_metrics: dict[str, float]
    feature_columns: list[str]
    experiment_id: str
    train_rows: int
    test_rows: int
    training_partitions: list[str]
    model_id: str | None = None
    baseline_temp_above: float | None = None  # the threshold rule's T (params, or fitted on training)
    baseline_rule: str = ""  # what the baseline rule is, e.g. "temp outside [12.1, 31.4] celsius"
    unmeasured: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed

    @property
    def beats_baseline(self) -> bool:
        return self.metrics.get("pr_auc", float("nan")) > self.baseline_metrics.get("pr_auc", float("nan"))


# --------------------------------------------------------------------------- pure functions


def feature_columns(df: pd.DataFrame) -> list[str]:
    """The gold layer's feature columns (its own function when available, same rule otherwise)."""
    try:
        from pipelines.layers.gold import feature_columns as gold_feature_columns
    except ImportError:
        return [c for c in df.columns if c not in NON_FEATURE_COLUMNS]
    return list(gold_feature_columns(df))


def train_params(params: dict) -> dict:
    """Accept either the whole params.yaml mapping or its ``train`` section."""
    return params["train"] if "train" in params else params


def split_by_time(gold: pd.DataFrame, test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split at one timestamp: train = earlier rows, test = the latest ``test_fraction`` of distinct times.

    Every device shares the cut, so max(train.ts) < min(test.ts): nothing from the test time range
    reaches training.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}; fix train.test_fraction")
    times = np.sort(gold["ts"].dropna().unique())
    if len(times) < 2:
        raise ValueError(f"split_by_time needs at least 2 distinct timestamps, got {len(times)}")
    cut_index = min(max(int(round(len(times) * (1.0 - test_fraction))), 1), len(times) - 1)
    cutoff = times[cut_index]
    ordered = gold.sort_values(["ts", "device"], kind="stable")
    train = ordered[ordered["ts"] < cutoff].reset_index(drop=True)
    test = ordered[ordered["ts"] >= cutoff].reset_index(drop=True)
    return train, test


def model_families(params: dict) -> list[str]:
    """Families compared in a run (``train.families``), validated against ``FAMILIES``."""
    chosen = list(train_params(params).get("families", DEFAULT_FAMILIES))
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown or not chosen:
        raise ValueError(f"train.families={chosen}: each must be one of {FAMILIES}; fix params.yaml")
    return chosen


def family_columns(family: str, feats: list[str], params: dict) -> list[str]:
    """Gold features a family scores: ``train.<family>.features`` = "all" or "deviations" (suffixes).

    Defaults: supervised families see all features (they learn which matter), unsupervised ones the
    deviation features. Falls back to all features when the selection would be empty.
    """
    default = "all" if family in SUPERVISED_FAMILIES else "deviations"
    choice = train_params(params).get(family, {}).get("features", default)
    if choice == "all":
        return list(feats)
    if choice != "deviations":
        raise ValueError(f"train.{family}.features={choice!r}: use 'all' or 'deviations'")
    selected = [c for c in feats if c.endswith(DEVIATION_SUFFIXES)]
    return selected or list(feats)


def _pipeline(family: str, tp: dict):
    from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest
    from sklearn.impute import SimpleImputer
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    seed = int(tp.get("seed", 42))
    if family == "isolation_forest":
        cfg = tp.get("isolation_forest", {})
        model = IsolationForest(
            n_estimators=int(cfg.get("n_estimators", 100)),
            contamination=cfg.get("contamination", "auto"),
            random_state=seed,
            n_jobs=1,
        )
    elif family == "hist_gradient_boosting":
        cfg = tp.get("hist_gradient_boosting", {})
        model = HistGradientBoostingClassifier(
            max_iter=int(cfg.get("max_iter", 200)),
            learning_rate=float(cfg.get("learning_rate", 0.1)),
            max_leaf_nodes=int(cfg.get("max_leaf_nodes", 31)),
            early_stopping=False,  # its internal split is random, not by time: keep the run deterministic
            random_state=seed,
        )
    elif family == "local_outlier_factor":
        cfg = tp.get("local_outlier_factor", {})
        model = LocalOutlierFactor(
            n_neighbors=int(cfg.get("n_neighbors", 35)),
            contamination=cfg.get("contamination", "auto"),
            novelty=True,
            algorithm="kd_tree",  # pinned: the skops trusted types name the KDTree index
            n_jobs=1,
        )
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    # Dropout readings leave NaN features; the median imputer keeps them scorable.
    return Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler()), ("model", model)])


def can_fit_supervised(df: pd.DataFrame) -> bool:
    """Enough labelled anomalies and normals in ``df`` for a supervised family."""
    y = df["is_anomaly"].dropna().astype(int)
    return int(y.sum()) >= MIN_SUPERVISED_POSITIVES and int((y == 0).sum()) >= MIN_SUPERVISED_POSITIVES


def fit_candidates(
    train_df: pd.DataFrame, params: dict, families: Iterable[str] | None = None
) -> dict[str, AnomalyScorer]:
    """Fit one seeded scorer per family on ``train_df``.

    Unsupervised families: with ``train.exclude_known_anomalies`` (default true) rows labelled
    anomalous are left out of the fit: the detectors learn "normal"; unlabelled rows stay in.
    Supervised families: fitted on the labelled rows only, and skipped (absent from the result)
    when those hold fewer than ``MIN_SUPERVISED_POSITIVES`` anomalies.
    """
    tp = train_params(params)
    feats = feature_columns(train_df)
    normal_rows = train_df
    if tp.get("exclude_known_anomalies", True):
        normal_rows = train_df[~(train_df["is_anomaly"].fillna(0).astype(int) == 1)]
    lab = labelled(train_df)
    out: dict[str, AnomalyScorer] = {}
    for family in families if families is not None else model_families(params):
        if family in STREAMING_FAMILIES:
            # a stream has no holes: every training row, in time order (labels are not used)
            cfg = dict(tp.get(family, {}) or {})
            detector = str(cfg.pop("detector", "") or default_detector())
            streaming = StreamingScorer(detector, readings=reading_columns(train_df), config=cfg or None)
            out[family] = streaming.fit(train_df[streaming.columns])
            continue
        scorer = AnomalyScorer(_pipeline(family, tp), columns=family_columns(family, feats, params))
        if family in SUPERVISED_FAMILIES:
            if not can_fit_supervised(train_df):
                continue
            out[family] = scorer.fit(lab[feats], lab["is_anomaly"].astype(int).to_numpy())
        else:
            out[family] = scorer.fit(normal_rows[feats])
    return out


def anomaly_scores(model, X: pd.DataFrame) -> np.ndarray:
    """Anomaly score per row, higher = more anomalous (AnomalyScorer, raw estimator or pyfunc model)."""
    if isinstance(model, AnomalyScorer) or not hasattr(model, "score_samples"):
        return np.asarray(model.predict(X), dtype=np.float64).ravel()
    return -np.asarray(model.score_samples(X), dtype=np.float64)


def labelled(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ground truth is known (is_anomaly not null)."""
    return df[df["is_anomaly"].notna()]


def choose_threshold(scores: np.ndarray, y_true: np.ndarray | None, contamination: float = 0.05) -> float:
    """Decision threshold from TRAINING scores: F1-best on labels, else the (1 - contamination) quantile."""
    from sklearn.metrics import precision_recall_curve

    scores = np.asarray(scores, dtype=np.float64)
    if y_true is not None:
        y = np.asarray(y_true, dtype=int)
        if 0 < y.sum() < len(y):
            precision, recall, thresholds = precision_recall_curve(y, scores)
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            return float(thresholds[int(np.argmax(f1[:-1]))])
    return float(np.quantile(scores, 1.0 - float(contamination)))


def evaluate(scores: np.ndarray, y_true: np.ndarray, labels: np.ndarray | None, threshold: float) -> dict:
    """precision/recall/f1 at ``threshold`` (score >= threshold = anomaly), pr_auc, recall per fault."""
    from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_true, dtype=int)
    pred = (scores >= threshold).astype(int)
    has_both = 0 < y.sum() < len(y)
    out = {
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        # NaN, not absent: callers compare it (the gate treats NaN as "not measurable")
        "pr_auc": float(average_precision_score(y, scores)) if has_both else float("nan"),
        "rows": float(len(y)),
        "positives": float(y.sum()),
        "flagged": float(pred.sum()),
    }
    if labels is not None:
        lab = np.asarray(pd.Series(labels).astype("object").fillna("").to_numpy())
        for fault in FAULT_TYPES:
            mask = lab == fault
            if mask.any():
                out[f"recall_{fault}"] = float(pred[mask].mean())
    return out


def threshold_rule_scores(df: pd.DataFrame, temp_above: float) -> tuple[np.ndarray, np.ndarray]:
    """The field's starting rule: anomaly when temp > temp_above. Returns (scores = temp, predicted).

    Missing temperatures (dropouts) get the lowest score: the rule cannot see them.
    """
    temp = df["temp"].to_numpy(dtype=np.float64, na_value=np.nan)
    floor = np.nanmin(temp) - 1.0 if np.isfinite(temp).any() else 0.0
    scores = np.where(np.isnan(temp), floor, temp)
    return scores, (scores > temp_above).astype(int)


def threshold_rule_metrics(df: pd.DataFrame, temp_above: float) -> dict:
    """Metrics of the temperature rule on ``df`` (its labelled rows)."""
    scores, _ = threshold_rule_scores(df, temp_above)
    # evaluate() flags score >= threshold; the rule is strictly "above".
    return evaluate(
        scores, df["is_anomaly"].astype(int).to_numpy(), df["label"], float(np.nextafter(temp_above, np.inf))
    )


def reading_columns(gold: pd.DataFrame) -> list[str]:
    """The contract's numeric readings in a gold frame (each has its rolling features beside it)."""
    return [c for c in gold.columns if f"{c}_roll_mean" in gold.columns]


@dataclass
class RangeRule:
    """The baseline a field starts from, fitted per reading on the training range: an alarm when any
    reading leaves its usual band [lo, hi] (quantiles ``tail`` and ``1 - tail`` of the training rows).
    Score: the largest distance from a band's centre in half-widths, so > 1 means outside a band."""

    bounds: dict[str, tuple[float, float]]
    units: dict[str, str] = field(default_factory=dict)
    threshold: float = float(np.nextafter(1.0, 2.0))

    def scores(self, df: pd.DataFrame) -> np.ndarray:
        out = np.zeros(len(df))
        for col, (lo, hi) in self.bounds.items():
            values = df[col].to_numpy(dtype=np.float64, na_value=np.nan)
            half = max((hi - lo) / 2.0, 1e-12)
            out = np.fmax(out, np.abs(values - (lo + hi) / 2.0) / half)
        return np.nan_to_num(out, nan=0.0)

    def describe(self) -> str:
        return "; ".join(
            f"{c} outside [{lo:.4g}, {hi:.4g}]{' ' + self.units[c] if self.units.get(c) else ''}"
            for c, (lo, hi) in self.bounds.items()
        )


def fit_range_rule(train_df: pd.DataFrame, tail: float = 0.005, units: dict[str, str] | None = None) -> RangeRule:
    """A two-sided range per reading from the training range's own values (no labels needed)."""
    if not 0.0 <= tail < 0.5:
        raise ValueError(f"train.threshold_rule.tail={tail}: must be in [0, 0.5)")
    normal = train_df
    if "is_anomaly" in train_df and (train_df["is_anomaly"].fillna(0).astype(int) == 0).any():
        normal = train_df[train_df["is_anomaly"].fillna(0).astype(int) == 0]
    bounds = {}
    for col in reading_columns(train_df):
        values = normal[col].to_numpy(dtype=np.float64, na_value=np.nan)
        values = values[np.isfinite(values)]
        if len(values):
            bounds[col] = (float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail)))
    if not bounds:
        raise ValueError("no numeric reading in gold to fit the baseline range rule on; check the contract's columns")
    return RangeRule(bounds, {c: u for c, u in (units or {}).items() if c in bounds})


def device_windows(df: pd.DataFrame, known: list | None = None) -> dict[str, list[tuple[Any, Any]]]:
    """Anomaly windows per device: the contract's windows file (the same windows for every device),
    else runs of consecutive rows labelled anomalous (a fault's span). Empty without either."""
    devices = sorted(str(d) for d in df["device"].unique())
    if known:
        return {d: list(known) for d in devices}
    if "is_anomaly" not in df or not df["is_anomaly"].fillna(0).astype(int).any():
        return {}
    out: dict[str, list[tuple[Any, Any]]] = {}
    for device, rows in df[["device", "ts", "is_anomaly"]].groupby("device", sort=True):
        rows = rows.sort_values("ts")
        flag = rows["is_anomaly"].fillna(0).astype(int).to_numpy() == 1
        starts = np.flatnonzero(flag & ~np.r_[False, flag[:-1]])
        ends = np.flatnonzero(flag & ~np.r_[flag[1:], False])
        ts = rows["ts"].to_numpy()
        out[str(device)] = [(pd.Timestamp(ts[a]), pd.Timestamp(ts[b])) for a, b in zip(starts, ends, strict=True)]
    return out


def event_scores(df: pd.DataFrame, alarm: np.ndarray, windows: dict[str, list]) -> dict[str, float]:
    """Event-level metrics (``window_metrics``) per device, summed over devices: windows detected,
    false-alarm episodes per day, mean lead time of the first alarm inside a detected window."""
    frame = df[["device", "ts"]].assign(_alarm=np.asarray(alarm, dtype=bool))
    total = {"windows": 0.0, "windows_detected": 0.0, "alarm_episodes": 0.0, "false_alarm_episodes": 0.0}
    days = lead_sum = 0.0
    for device, rows in frame.groupby("device", sort=True):
        rows = rows.sort_values("ts")
        m = window_metrics(rows["ts"], rows["_alarm"].to_numpy(), windows.get(str(device), []))
        for key in total:
            total[key] += m[key]
        lead_sum += m["window_lead_hours_mean"] * m["windows_detected"]
        if len(rows):
            days += max((rows["ts"].max() - rows["ts"].min()).total_seconds() / 86400.0, 1e-9)
    return {
        **total,
        "window_recall": total["windows_detected"] / total["windows"] if total["windows"] else float("nan"),
        "false_alarm_episodes_per_day": total["false_alarm_episodes"] / days if days else 0.0,
        "window_lead_hours_mean": lead_sum / total["windows_detected"] if total["windows_detected"] else 0.0,
    }


def nab_scores(df: pd.DataFrame, alarm: np.ndarray, windows: dict[str, list]) -> tuple[dict[str, float], str | None]:
    """NAB's normalised score (three profiles) of the model's alarms at its decision threshold, each
    device a series with its windows, on rows already out of sample (no probationary period).
    (metrics, why absent)."""
    from pipelines.evaluation.nab import PROFILES, CorpusFile, normalised_scores

    files = []
    frame = df[["device", "ts"]].assign(_alarm=np.asarray(alarm, dtype=float))
    for device, rows in frame.groupby("device", sort=True):
        rows = rows.sort_values("ts")
        ts = pd.to_datetime(rows["ts"], utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
        bounds = [(_naive_utc(a), _naive_utc(b)) for a, b in windows.get(str(device), [])]
        files.append((CorpusFile(str(device), "", ts, np.zeros(len(ts)), bounds), rows["_alarm"].to_numpy()))
    out = {}
    try:
        for name, profile in PROFILES.items():
            out[f"nab_{name}"] = normalised_scores(files, profile, threshold=0.5, probation_percent=0.0).normalised
    except ValueError as exc:
        return {}, f"{exc} (no known window inside the test range)"
    return out, None


def _naive_utc(value: Any) -> pd.Timestamp:
    t = pd.Timestamp(value)
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def context_units(context: TrainingContext) -> dict[str, str]:
    """Units of the dataset's readings, from its contract (empty when it cannot be found)."""
    try:
        from pipelines.contracts import load_contract
        from pipelines.datasets import get_dataset

        contract = load_contract(get_dataset(context.dataset_name).contract_path)
    except Exception:  # noqa: BLE001 - units only label plots and the rule's description
        return {}
    return {c.name: c.unit for c in contract.columns if c.unit}


def _has_both_classes(df: pd.DataFrame) -> bool:
    """Labelled anomalies and labelled normal rows are both among ``df``'s rows."""
    y = labelled(df)["is_anomaly"].astype(int)
    return 0 < int(y.sum()) < len(y)


def fit_threshold_rule(train_df: pd.DataFrame) -> float:
    """The fairest fixed "temp above T" rule: T F1-best on the TRAINING range's labels (never the test)."""
    lab = labelled(train_df)
    scores, _ = threshold_rule_scores(lab, float("inf"))
    best = choose_threshold(scores, lab["is_anomaly"].astype(int).to_numpy())
    # evaluate() flags score >= threshold, the rule is strictly above: step just below the F1-best score
    return float(np.nextafter(best, -np.inf))


def label_from_windows(df: pd.DataFrame, windows: Iterable[tuple[Any, Any]], label: str = "anomaly") -> pd.DataFrame:
    """Copy of ``df`` with label/is_anomaly set from labelled time windows (inclusive, e.g. NAB's).

    Rows inside any window get ``label`` and is_anomaly 1; all other rows "normal" and 0.
    Naive window bounds are read as UTC, like the NAB contract's timestamps.
    """
    ts = pd.to_datetime(df["ts"], utc=True)
    inside = np.zeros(len(df), dtype=bool)
    for start, end in windows:
        lo, hi = pd.Timestamp(start), pd.Timestamp(end)
        lo = lo.tz_localize("UTC") if lo.tzinfo is None else lo.tz_convert("UTC")
        hi = hi.tz_localize("UTC") if hi.tzinfo is None else hi.tz_convert("UTC")
        if hi < lo:
            raise ValueError(f"window ({start}, {end}) ends before it starts; fix the windows file")
        inside |= ((ts >= lo) & (ts <= hi)).to_numpy()
    out = df.copy()
    out["label"] = pd.Series(np.where(inside, label, "normal"), index=df.index, dtype="str")
    out["is_anomaly"] = pd.array(inside.astype("int8"), dtype="Int8")
    return out


def window_metrics(
    ts: pd.Series, alarm: np.ndarray, windows: Iterable[tuple[Any, Any]], gap: str = "1h"
) -> dict[str, float]:
    """NAB-style event scoring: a window counts as detected when any alarm falls inside it.

    Alarms closer than ``gap`` form one alarm episode; an episode starting outside every window is a
    false alarm. Only windows overlapping ``ts``'s range count. ``window_lead_hours_mean`` is how
    long before a detected window's end its first alarm came (earlier = more time to act).
    """
    t = pd.Series(pd.to_datetime(ts, utc=True)).reset_index(drop=True)
    alarm = np.asarray(alarm, dtype=bool)
    bounds = []
    for start, end in windows:
        lo, hi = pd.Timestamp(start), pd.Timestamp(end)
        lo = lo.tz_localize("UTC") if lo.tzinfo is None else lo
        hi = hi.tz_localize("UTC") if hi.tzinfo is None else hi
        if len(t) and hi >= t.min() and lo <= t.max():
            bounds.append((lo, hi))
    leads = []
    for lo, hi in bounds:
        hits = t[((t >= lo) & (t <= hi)).to_numpy() & alarm]
        if len(hits):
            leads.append((hi - hits.min()).total_seconds() / 3600)
    alarm_times = t[alarm].sort_values()
    starts = alarm_times[alarm_times.diff().isna() | (alarm_times.diff() > pd.Timedelta(gap))]
    false_episodes = sum(not any(lo <= s <= hi for lo, hi in bounds) for s in starts)
    days = max((t.max() - t.min()).total_seconds() / 86_400, 1e-9) if len(t) else float("nan")
    detected = len(leads)
    return {
        "windows": float(len(bounds)),
        "windows_detected": float(detected),
        "window_recall": detected / len(bounds) if bounds else float("nan"),
        "alarm_episodes": float(len(starts)),
        "false_alarm_episodes": float(false_episodes),
        "false_alarm_episodes_per_day": false_episodes / days,
        "window_precision": (len(starts) - false_episodes) / len(starts) if len(starts) else 0.0,
        "window_lead_hours_mean": float(np.mean(leads)) if leads else 0.0,
    }


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _gx_results(gx: dict | None) -> list[dict]:
    """One GX result (has "statistics"/"success") or {partition: result}, as a list of results."""
    if not gx:
        return []
    if "statistics" in gx or "success" in gx:
        return [gx]
    return [r for _, r in sorted(gx.items()) if isinstance(r, dict)]


def gx_summary_metrics(gx: dict | None, layer: str = "gold") -> dict[str, float]:
    """Run metrics from the GX results of the training data: one result or {partition: result}.

    ``gx_<layer>_success_percent_min`` is the worst partition; ``..._failed`` counts failed
    expectations over all partitions, ``..._critical_failed`` those of critical severity.
    """
    results = _gx_results(gx)
    if not results:
        return {}
    stats = [r.get("statistics", {}) for r in results]
    outcomes = [o for r in results for o in r.get("outcomes", []) or []]
    percents = [float(s["success_percent"]) for s in stats if s.get("success_percent") is not None]
    p = f"gx_{layer}"
    out = {
        f"{p}_partitions": float(len(results)),
        f"{p}_partitions_passed": float(sum(bool(r.get("success")) for r in results)),
        f"{p}_evaluated": float(sum(int(s.get("evaluated_expectations", 0) or 0) for s in stats)),
        f"{p}_failed": float(sum(int(s.get("unsuccessful_expectations", 0) or 0) for s in stats)),
        f"{p}_critical_failed": float(
            sum(1 for o in outcomes if not o.get("success") and o.get("severity") == "critical")
        ),
    }
    if percents:
        out[f"{p}_success_percent_min"] = min(percents)
    return out


def gx_summary_text(gx: dict | None) -> str | None:
    """Short one-line summary of a GX result (or {partition: result}) for a tag; full JSON in artifacts."""
    if not gx:
        return None
    results = _gx_results(gx)
    if len(results) > 1 or (results and "partition" in results[0] and gx is not results[0]):
        m = gx_summary_metrics(gx)
        text = (
            f"success={m['gx_gold_partitions_passed'] == m['gx_gold_partitions']}; "
            f"partitions_passed={int(m['gx_gold_partitions_passed'])}/{int(m['gx_gold_partitions'])}; "
            f"evaluated_expectations={int(m['gx_gold_evaluated'])}; "
            f"unsuccessful_expectations={int(m['gx_gold_failed'])} "
            f"(critical {int(m['gx_gold_critical_failed'])})"
        )
        if "gx_gold_success_percent_min" in m:
            text += f"; success_percent_min={m['gx_gold_success_percent_min']:.1f}"
        return text[:GX_SUMMARY_TAG_MAX]
    keys = ("success", "evaluated_expectations", "successful_expectations", "unsuccessful_expectations")
    stats = gx.get("statistics", gx)
    parts = [f"{k}={stats[k]}" for k in keys if k in stats]
    if "success" in gx and "success" not in stats:
        parts.insert(0, f"success={gx['success']}")
    text = "; ".join(parts) if parts else json.dumps(gx, sort_keys=True, default=str)
    return text[:GX_SUMMARY_TAG_MAX]


def _check_skops_types(model: AnomalyScorer) -> None:
    """Refuse to log a model whose skops file needs a type we have not reviewed (no pickle fallback)."""
    import skops.io

    untrusted = set(skops.io.get_untrusted_types(data=skops.io.dumps(model)))
    unknown = sorted(untrusted - set(SKOPS_TRUSTED_TYPES))
    if unknown:
        raise RuntimeError(
            f"skops reports types not in pipelines.training.SKOPS_TRUSTED_TYPES: {unknown}. "
            "Review them and add them to that list if they are safe; the model is not logged as pickle."
        )


# --------------------------------------------------------------------------- the run


def train_and_log(
    gold: pd.DataFrame,
    params: dict,
    context: TrainingContext,
    *,
    tracking_uri: str,
    experiment: str,
    progress: Progress = print,
) -> TrainResult:
    """Split, fit both families, pick one on validation, evaluate on test, log everything to MLflow."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    import mlflow
    from pipelines import plots

    started = time.monotonic()
    tp = train_params(params)
    feats = feature_columns(gold)
    readings = reading_columns(gold)

    def scores_of(m, df: pd.DataFrame, in_sample: bool = False) -> np.ndarray:
        """Scores of family `m` on `df`. A streaming detector continues from the end of its training
        rows; ``in_sample`` scores the training rows themselves as the stream saw them (causally)."""
        if in_sample and isinstance(m, StreamingScorer):
            m = StreamingScorer(m.detector, m.readings, m.config)
        return anomaly_scores(m, df[model_inputs(m, feats)])

    if not readings:
        raise ValueError(
            f"gold of {context.dataset_name} has no numeric reading: the contract must declare at least one "
            "float64 column"
        )
    test_fraction = float(tp.get("test_fraction", 0.3))
    validation_fraction = float(tp.get("validation_fraction", DEFAULT_VALIDATION_FRACTION))
    unmeasured: dict[str, str] = {}

    train_df, test_df = split_by_time(gold, test_fraction)
    fit_df, val_df = split_by_time(train_df, validation_fraction)
    progress(
        f"[train] split {len(gold)} rows: train {len(train_df)}"
        f" (fit {len(fit_df)} + validation {len(val_df)}),"
        f" test {len(test_df)}; cut at {test_df['ts'].min()}"
    )

    # 1. family selection on the validation slice at the end of the training range
    requested = model_families(params)
    candidates = fit_candidates(fit_df, params, families=requested)
    for skipped in (f for f in requested if f not in candidates):
        progress(f"[train] candidate {skipped}: skipped (fewer than {MIN_SUPERVISED_POSITIVES} labelled anomalies)")
    val_lab = labelled(val_df)
    y_val = val_lab["is_anomaly"].astype(int).to_numpy()
    val_measurable = 0 < y_val.sum() < len(y_val)
    candidate_metrics: dict[str, float] = {}
    val_scores: dict[str, np.ndarray] = {}
    if not val_measurable:
        unmeasured["family_choice"] = "no labelled anomalies and normals in the validation slice"
    for family, cand in candidates.items():
        if not val_measurable:
            continue
        val_scores[family] = scores_of(cand, val_lab)
        ap = evaluate(val_scores[family], y_val, None, float("inf"))["pr_auc"]
        candidate_metrics[f"cand_{family}_pr_auc"] = ap
        progress(f"[train] candidate {family}: validation PR-AUC {ap:.4f}")
    valid_aps = {
        f: candidate_metrics[f"cand_{f}_pr_auc"] for f in candidates if f"cand_{f}_pr_auc" in candidate_metrics
    }
    valid_aps = {f: v for f, v in valid_aps.items() if not np.isnan(v)}
    # Ties and a label-less validation slice fall back to the first requested family: deterministic.
    family = (
        max(valid_aps, key=lambda f: (valid_aps[f], -requested.index(f)))
        if valid_aps
        else next(f for f in requested if f in candidates)
    )
    nothing = "" if valid_aps else " (the first requested: nothing to compare on)"
    progress(f"[train] kept {family}{nothing}; refitting on the whole training range")

    # 2. refit the winner on all training rows; threshold from the training range only
    model = fit_candidates(train_df, params, families=[family])[family]
    contamination = tp.get(family, {}).get("contamination", 0.05)
    contamination = 0.05 if contamination == "auto" else float(contamination)
    train_lab = labelled(train_df)
    if val_measurable and family in val_scores:
        # out-of-sample scores: a supervised model's in-sample probabilities are over-confident
        threshold = choose_threshold(val_scores[family], y_val, contamination)
        threshold_source = "f1_best_on_validation_labels"
    elif 0 < int(train_lab["is_anomaly"].astype(int).sum()) < len(train_lab):
        threshold = choose_threshold(
            scores_of(model, train_lab, in_sample=True),
            train_lab["is_anomaly"].astype(int).to_numpy(),
            contamination,
        )
        threshold_source = "f1_best_on_train_labels"
    else:
        own = model.alarm_threshold() if isinstance(model, StreamingScorer) else None
        if own is not None:
            threshold = own
            threshold_source = f"detector_default ({model.detector}: one threshold chosen on the NAB corpus)"
        else:
            threshold = choose_threshold(scores_of(model, train_df, in_sample=True), None, contamination)
            threshold_source = "contamination_quantile_of_training_scores"

    # 3. the held-out test range, touched once
    test_lab = labelled(test_df)
    y_test = test_lab["is_anomaly"].astype(int).to_numpy()
    test_measurable = 0 < y_test.sum() < len(y_test)
    all_test_scores = scores_of(model, test_df)
    all_test_alarm = all_test_scores >= threshold
    rule_cfg = tp.get("threshold_rule", {}) or {}
    temp_above: float | None = None
    field_rule = "temp_above" in rule_cfg and "temp" in gold.columns
    if field_rule and rule_cfg["temp_above"] == "fit" and not _has_both_classes(train_df):
        # "fit" picks the F1-best fixed threshold on the training range's labels: without labelled
        # anomalies and normal rows there (a series with no labels, as a NAB file landed on its own)
        # there is nothing to fit it to, and the baseline is the range rule, which needs no labels
        progress(
            "[train] baseline: threshold_rule.temp_above is 'fit', but the training range has no labelled "
            "anomalies and normal rows to fit it on; using the range rule"
        )
        field_rule = False
    if field_rule:
        # a field rule named in params ("fit": the best fixed threshold on the training range's labels)
        temp_above = fit_threshold_rule(train_df) if rule_cfg["temp_above"] == "fit" else float(rule_cfg["temp_above"])
        rule_name = f"temp > {temp_above:.4g}"

        def rule_scores(df: pd.DataFrame) -> np.ndarray:
            return threshold_rule_scores(df, temp_above)[0]

        rule_threshold = float(np.nextafter(temp_above, np.inf))
    else:
        rule = fit_range_rule(train_df, float(rule_cfg.get("tail", 0.005)), context_units(context))
        rule_name, rule_scores, rule_threshold = rule.describe(), rule.scores, rule.threshold
    if test_measurable:
        test_scores = scores_of(model, test_lab)
        metrics = evaluate(test_scores, y_test, test_lab["label"], threshold)
        baseline = evaluate(rule_scores(test_lab), y_test, test_lab["label"], rule_threshold)
        for fam, cand in candidates.items():  # informative only: not used for any choice
            refit = model if fam == family else cand
            candidate_metrics[f"cand_{fam}_test_pr_auc"] = evaluate(
                scores_of(refit, test_lab), y_test, None, float("inf")
            )["pr_auc"]
        progress(
            f"[train] test: model PR-AUC {metrics['pr_auc']:.4f} F1 {metrics['f1']:.4f} | "
            f"baseline rule ({rule_name[:80]}) PR-AUC {baseline['pr_auc']:.4f} F1 {baseline['f1']:.4f}"
        )
    else:
        test_scores = np.zeros(0)
        metrics = {"rows": float(len(test_df)), "flagged": float(all_test_alarm.sum())}
        baseline = {"rows": float(len(test_df)), "flagged": float((rule_scores(test_df) >= rule_threshold).sum())}
        unmeasured["precision, recall, f1, pr_auc"] = (
            "the test range has no labels (neither a label column nor a contract windows file)"
            if not len(test_lab)
            else "the test range's labels hold only one class"
        )
        progress(
            f"[train] test: {int(metrics['flagged'])} of {len(test_df)} rows flagged "
            f"(baseline rule: {int(baseline['flagged'])}); not measured: precision, recall, F1, PR-AUC "
            f"({unmeasured['precision, recall, f1, pr_auc']})"
        )
    metrics["flag_rate"] = float(all_test_alarm.mean()) if len(test_df) else 0.0
    days = max((test_df["ts"].max() - test_df["ts"].min()).total_seconds() / 86400.0, 1e-9) if len(test_df) else 0.0
    metrics["flags_per_day"] = float(all_test_alarm.sum() / days) if days else 0.0
    windows = device_windows(test_df, context.label_windows)
    if windows:
        events = event_scores(test_df, all_test_alarm, windows)
        metrics.update({f"event_{k}": v for k, v in events.items()})
        rule_events = event_scores(test_df, rule_scores(test_df) >= rule_threshold, windows)
        baseline.update({f"event_{k}": v for k, v in rule_events.items()})
        progress(
            f"[train] events: {int(events['windows_detected'])}/{int(events['windows'])} windows detected, "
            f"{events['false_alarm_episodes_per_day']:.2f} false alarms/day "
            f"(baseline rule: {int(rule_events['windows_detected'])}/{int(rule_events['windows'])}, "
            f"{rule_events['false_alarm_episodes_per_day']:.2f}/day)"
        )
        nab, why = nab_scores(test_df, all_test_alarm, windows)
        metrics.update(nab)
        if why:
            unmeasured["nab score"] = why
    else:
        unmeasured["event-level scores"] = (
            "no anomaly windows known (no labels, and the contract names no label_windows file)"
        )
    for name, metric_set in (("model", metrics), ("baseline", baseline)):
        for key in [k for k, v in metric_set.items() if not np.isfinite(v)]:
            unmeasured[f"{name} {key}"] = "not computable on the test range (one class only)"
            del metric_set[key]

    # 4. log the run
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.set_experiment(experiment)
    partitions = sorted({str(p) for p in train_df["event_date"].unique()})
    tags = {
        "model_family": family,
        "dataset_name": context.dataset_name,
        "gold_snapshot": json.dumps(context.data_snapshot, sort_keys=True, default=str)[:TAG_VALUE_MAX],
        "training_partitions": ",".join(partitions)[:TAG_VALUE_MAX],
        "test_partitions": ",".join(sorted({str(p) for p in test_df["event_date"].unique()}))[:TAG_VALUE_MAX],
        "git_commit": context.git_commit or "",
        "dvc_lock_digest": context.dvc_lock_digest or "",
        "airflow_dag_id": context.airflow_dag_id or "",
        "airflow_run_id": context.airflow_run_id or "",
        "gx_summary": gx_summary_text(context.gx_summary) or "",
        "baseline_rule": rule_name[:TAG_VALUE_MAX],
        "unmeasured": "; ".join(f"{k}: {v}" for k, v in unmeasured.items())[:TAG_VALUE_MAX],
    }
    if "pr_auc" in metrics and "pr_auc" in baseline:
        tags["beats_threshold_baseline"] = str(metrics["pr_auc"] > baseline["pr_auc"]).lower()
    with mlflow.start_run(run_name=f"{family}-{context.dataset_name}") as run:
        mlflow.set_tags(tags)
        mlflow.log_params(
            {
                **flatten_params(tp, "train."),
                "train.test_fraction": str(test_fraction),
                "train.validation_fraction": str(validation_fraction),
                "model_family": family,
                "feature_columns": ",".join(feats),
                "threshold_choice": threshold_source,
                "model_columns": ",".join(model.columns or feats)[:TAG_VALUE_MAX],
            }
        )
        mlflow.log_metrics(
            {
                **{k: v for k, v in metrics.items()},
                **{f"baseline_threshold_{k}": v for k, v in baseline.items()},
                **candidate_metrics,
                **gx_summary_metrics(context.gx_summary),
                "decision_threshold": threshold,
                **({"threshold_rule_temp_above": temp_above} if temp_above is not None else {}),
                "train_rows": float(len(train_df)),
                "test_rows": float(len(test_df)),
            }
        )
        progress("[train] logging datasets")
        train_ds = mlflow.data.from_pandas(train_df, name=f"{context.dataset_name}-train", targets="is_anomaly")
        test_ds = mlflow.data.from_pandas(test_df, name=f"{context.dataset_name}-test", targets="is_anomaly")
        mlflow.log_input(train_ds, context="training")
        mlflow.log_input(test_ds, context="evaluation")
        mlflow.log_dict(context.data_snapshot, "lineage/gold_snapshot.json")
        # what monitoring compares production windows with: the held-out rows' features, scores and
        # alarms (in-sample scores would be biased), logged with the model
        from pipelines.monitoring.job import log_reference_profile

        log_reference_profile(
            test_df, feats, all_test_scores, all_test_alarm, metadata={"dataset": context.dataset_name}
        )
        if context.gx_summary:
            mlflow.log_dict(context.gx_summary, "lineage/gx_result.json")

        progress("[train] plotting")
        units = context_units(context)
        figures = {
            "plots/readings_over_time.png": plots.readings_over_time(
                test_df,
                all_test_alarm,
                value_col=readings[0],
                unit=units.get(readings[0]),
                windows=context.label_windows,
            ),
        }
        if test_measurable:
            figures["plots/pr_curve.png"] = plots.pr_curves(
                y_test, {family: test_scores, f"rule: {rule_name[:40]}": rule_scores(test_lab)}
            )
            figures["plots/confusion_matrix.png"] = plots.confusion_matrix_figure(
                y_test, (test_scores >= threshold).astype(int)
            )
        for path, fig in figures.items():
            mlflow.log_figure(fig, path)
            plots.close(fig)

        progress("[train] logging model (skops)")
        _check_skops_types(model)
        X_sig = train_df[model_inputs(model, feats)]
        example = X_sig.dropna().head(5)
        if example.empty:
            example = X_sig.head(5)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(X_sig.head(200), anomaly_scores(model, X_sig.head(200))),
            input_example=example,
            serialization_format="skops",
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
            # explicit: skips MLflow's requirement inference, which re-loads the model in a subprocess
            pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
        )
        with tempfile.TemporaryDirectory() as tmp:
            summary = Path(tmp) / "training_summary.json"
            summary.write_text(
                json.dumps(
                    {
                        "context": asdict(context),
                        "metrics": metrics,
                        "baseline_threshold": baseline,
                        "candidates": candidate_metrics,
                        "threshold": threshold,
                        "model_family": family,
                        "baseline_rule": rule_name,
                        "unmeasured": unmeasured,
                    },
                    sort_keys=True,
                    indent=2,
                    default=str,
                )
            )
            mlflow.log_artifact(str(summary), "lineage")
        run_id = run.info.run_id
    progress(f"[train] done in {time.monotonic() - started:.1f}s: run {run_id}, model {info.model_uri}")
    return TrainResult(
        run_id=run_id,
        model_uri=info.model_uri,
        model_family=family,
        metrics=metrics,
        baseline_metrics=baseline,
        threshold=threshold,
        candidate_metrics=candidate_metrics,
        feature_columns=feats,
        experiment_id=exp.experiment_id,
        train_rows=len(train_df),
        test_rows=len(test_df),
        training_partitions=partitions,
        model_id=getattr(info, "model_id", None),
        baseline_temp_above=temp_above,
        baseline_rule=rule_name,
        unmeasured=unmeasured,
    )
