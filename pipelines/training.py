"""Train anomaly detectors on gold data, evaluate them on a later held-out time range, log all to MLflow.

Leakage rules, in one place:
- the test set is the LATEST ``train.test_fraction`` of the time range (``split_by_time``);
- the model family is chosen by PR-AUC on a validation slice at the END of the training range
  (candidates are fitted on the part before it), then the winner is refitted on the whole training range;
- the decision threshold is chosen on the training range only (F1-best on its labels, or the
  score quantile matching ``contamination`` when the training range has no labels);
- the test set is touched once, for reporting.

The logged model is an ``AnomalyScorer`` (a tiny sklearn estimator defined here) wrapping the
fitted sklearn Pipeline; its ``predict`` returns the anomaly score (higher = more anomalous), so the
pyfunc flavour, ``mlflow models serve`` and the registry gate all get scores, not labels.
It is serialised with skops; the types skops must trust are listed in ``SKOPS_TRUSTED_TYPES``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

NON_FEATURE_COLUMNS = ("device", "ts", "event_date", "label", "is_anomaly")
FAULT_TYPES = ("spike", "stuck", "drift", "dropout")
FAMILIES = ("isolation_forest", "local_outlier_factor")
DEFAULT_VALIDATION_FRACTION = 0.2
GX_SUMMARY_TAG_MAX = 250
TAG_VALUE_MAX = 5000  # MLflow caps tag values (8,000 chars); full JSON goes to artifacts

# Exactly the type names skops reports as untrusted for our two families (skops 0.16,
# scikit-learn 1.9). Anything else showing up is refused, not silently trusted (see _check_skops_types).
SKOPS_TRUSTED_TYPES = [
    "pipelines.training.AnomalyScorer",
    "numpy.dtype",
    "sklearn.tree._tree.Tree",  # IsolationForest trees
    "sklearn.neighbors._kd_tree.KDTree",  # LocalOutlierFactor neighbour index
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
]

Progress = Callable[[str], Any]


class AnomalyScorer(BaseEstimator):
    """sklearn-compatible wrapper whose ``predict`` returns the anomaly score (higher = more anomalous).

    ``score_samples`` of IsolationForest / LocalOutlierFactor is higher for normal points, so the score
    is its negation. Top-level class so skops can serialise it (trusted as its dotted name).
    """

    def __init__(self, pipeline=None):
        self.pipeline = pipeline

    def fit(self, X, y=None):
        self.pipeline.fit(X)
        return self

    def predict(self, X):
        return -np.asarray(self.pipeline.score_samples(X), dtype=np.float64)


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


def _pipeline(family: str, tp: dict):
    from sklearn.ensemble import IsolationForest
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
    return Pipeline(
        [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler()), ("model", model)]
    )


def fit_candidates(
    train_df: pd.DataFrame, params: dict, families: Iterable[str] = FAMILIES
) -> dict[str, AnomalyScorer]:
    """Fit one seeded scorer per family on ``train_df``.

    With ``train.exclude_known_anomalies`` (default true) rows labelled anomalous are left out of the
    fit: the detectors learn "normal"; unlabelled rows stay in.
    """
    tp = train_params(params)
    feats = feature_columns(train_df)
    fit_rows = train_df
    if tp.get("exclude_known_anomalies", True):
        fit_rows = train_df[~(train_df["is_anomaly"].fillna(0).astype(int) == 1)]
    X = fit_rows[feats]
    return {family: AnomalyScorer(_pipeline(family, tp)).fit(X) for family in families}


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


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def gx_summary_text(gx: dict | None) -> str | None:
    """Short one-line summary of a GX result for a tag (the full JSON goes to artifacts)."""
    if not gx:
        return None
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
    if "temp" not in gold.columns:
        raise ValueError("gold frame has no 'temp' column: the threshold baseline and plots need it")
    test_fraction = float(tp.get("test_fraction", 0.3))
    validation_fraction = float(tp.get("validation_fraction", DEFAULT_VALIDATION_FRACTION))

    train_df, test_df = split_by_time(gold, test_fraction)
    fit_df, val_df = split_by_time(train_df, validation_fraction)
    progress(
        f"[train] split {len(gold)} rows: train {len(train_df)}"
        f" (fit {len(fit_df)} + validation {len(val_df)}),"
        f" test {len(test_df)}; cut at {test_df['ts'].min()}"
    )

    # 1. family selection on the validation slice at the end of the training range
    candidates = fit_candidates(fit_df, params)
    val_lab = labelled(val_df)
    y_val = val_lab["is_anomaly"].astype(int).to_numpy()
    candidate_metrics: dict[str, float] = {}
    for family, cand in candidates.items():
        val_scores = anomaly_scores(cand, val_lab[feats])
        ap = evaluate(val_scores, y_val, None, float("inf"))["pr_auc"]
        candidate_metrics[f"cand_{family}_pr_auc"] = ap
        progress(f"[train] candidate {family}: validation PR-AUC {ap:.4f}")
    valid_aps = {f: candidate_metrics[f"cand_{f}_pr_auc"] for f in candidates}
    valid_aps = {f: v for f, v in valid_aps.items() if not np.isnan(v)}
    # Ties and a label-less validation slice fall back to the first family: deterministic.
    family = max(valid_aps, key=lambda f: (valid_aps[f], -FAMILIES.index(f))) if valid_aps else FAMILIES[0]
    progress(f"[train] kept {family}; refitting on the whole training range")

    # 2. refit the winner on all training rows; threshold from training rows only
    model = fit_candidates(train_df, params, families=[family])[family]
    train_lab = labelled(train_df)
    contamination = tp.get(family, {}).get("contamination", 0.05)
    contamination = 0.05 if contamination == "auto" else float(contamination)
    threshold = choose_threshold(
        anomaly_scores(model, train_lab[feats]), train_lab["is_anomaly"].astype(int).to_numpy(), contamination
    )

    # 3. the held-out test range, touched once
    test_lab = labelled(test_df)
    y_test = test_lab["is_anomaly"].astype(int).to_numpy()
    test_scores = anomaly_scores(model, test_lab[feats])
    metrics = evaluate(test_scores, y_test, test_lab["label"], threshold)
    temp_above = float(tp.get("threshold_rule", {}).get("temp_above", 32.0))
    baseline = threshold_rule_metrics(test_lab, temp_above)
    for fam, cand in candidates.items():  # informative only: not used for any choice
        refit = model if fam == family else cand
        candidate_metrics[f"cand_{fam}_test_pr_auc"] = evaluate(
            anomaly_scores(refit, test_lab[feats]), y_test, None, float("inf")
        )["pr_auc"]
    progress(
        f"[train] test: model PR-AUC {metrics['pr_auc']:.4f} F1 {metrics['f1']:.4f} | "
        f"threshold rule (temp > {temp_above}) PR-AUC {baseline['pr_auc']:.4f} F1 {baseline['f1']:.4f}"
    )

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
        "beats_threshold_baseline": str(metrics["pr_auc"] > baseline["pr_auc"]).lower(),
    }
    with mlflow.start_run(run_name=f"{family}-{context.dataset_name}") as run:
        mlflow.set_tags(tags)
        mlflow.log_params(
            {
                **flatten_params(tp, "train."),
                "train.test_fraction": str(test_fraction),
                "train.validation_fraction": str(validation_fraction),
                "model_family": family,
                "feature_columns": ",".join(feats),
                "threshold_choice": "f1_best_on_train_labels_else_contamination_quantile",
            }
        )
        mlflow.log_metrics(
            {
                **{k: v for k, v in metrics.items()},
                **{f"baseline_threshold_{k}": v for k, v in baseline.items()},
                **candidate_metrics,
                "decision_threshold": threshold,
                "train_rows": float(len(train_df)),
                "test_rows": float(len(test_df)),
            }
        )
        progress("[train] logging datasets")
        train_ds = mlflow.data.from_pandas(
            train_df, name=f"{context.dataset_name}-train", targets="is_anomaly"
        )
        test_ds = mlflow.data.from_pandas(test_df, name=f"{context.dataset_name}-test", targets="is_anomaly")
        mlflow.log_input(train_ds, context="training")
        mlflow.log_input(test_ds, context="evaluation")
        mlflow.log_dict(context.data_snapshot, "lineage/gold_snapshot.json")
        if context.gx_summary:
            mlflow.log_dict(context.gx_summary, "lineage/gx_result.json")

        progress("[train] plotting")
        all_test_scores = anomaly_scores(model, test_df[feats])
        figures = {
            "plots/readings_over_time.png": plots.readings_over_time(test_df, all_test_scores >= threshold),
            "plots/pr_curve.png": plots.pr_curves(
                y_test,
                {family: test_scores, f"temp > {temp_above}": threshold_rule_scores(test_lab, temp_above)[0]},
            ),
            "plots/confusion_matrix.png": plots.confusion_matrix_figure(
                y_test, (test_scores >= threshold).astype(int)
            ),
        }
        for path, fig in figures.items():
            mlflow.log_figure(fig, path)
            plots.close(fig)

        progress("[train] logging model (skops)")
        _check_skops_types(model)
        X_sig = train_df[feats]
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
    )
