"""Monitoring I/O at the edges: the reference profile stored with a model version, window reports in the lake.

Training calls :func:`log_reference_profile` inside its MLflow run; the monitoring job loads it back with
:func:`load_reference_profile` for the version that served a window, and keeps each window's report
(JSON, HTML, figure) under ``s3://<lake>/monitoring/<dataset>/window=<start>/`` so the persistence rule
reads the recent windows' verdicts from the lake (:func:`recent_reports`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from pipelines.monitoring.drift import DriftError, DriftReport, ReferenceProfile, reference_profile

PROFILE_ARTIFACT = "monitoring/reference_profile.json"
SCORE, FLAGGED = "score", "flagged"  # the prediction log's columns profiled beside the features
REPORTS_PREFIX = "monitoring"


def training_reference_profile(
    frame: pd.DataFrame,
    features: Sequence[str],
    scores: np.ndarray,
    alarm: np.ndarray,
    *,
    metadata: dict[str, str] | None = None,
) -> ReferenceProfile:
    """The profile of the rows a model was evaluated on: its input features plus its score and alarm flag
    (so score drift and alert-rate drift are measured against the same reference)."""
    if len(scores) != len(frame) or len(alarm) != len(frame):
        raise DriftError(
            f"{len(frame)} rows but {len(scores)} scores and {len(alarm)} alarms: pass the scores of these rows"
        )
    reference = frame[list(features)].assign(
        **{SCORE: np.asarray(scores, dtype="float64"), FLAGGED: np.asarray(alarm, dtype="float64")}
    )
    return reference_profile(reference, [*features, SCORE, FLAGGED], metadata=metadata)


def log_reference_profile(
    frame: pd.DataFrame,
    features: Sequence[str],
    scores: np.ndarray,
    alarm: np.ndarray,
    *,
    metadata: dict[str, str] | None = None,
) -> ReferenceProfile:
    """Build the reference profile and log it to the active MLflow run as ``monitoring/reference_profile.json``."""
    import mlflow

    profile = training_reference_profile(frame, features, scores, alarm, metadata=metadata)
    mlflow.log_dict(profile.to_dict(), PROFILE_ARTIFACT)
    return profile


def load_reference_profile(model_name: str, version: str | int, *, tracking_uri: str | None = None) -> ReferenceProfile:
    """The reference profile stored with version ``version`` of ``model_name`` (its training run's artifact)."""
    from mlflow.exceptions import MlflowException

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run_id = client.get_model_version(model_name, str(version)).run_id
    try:
        data = mlflow.artifacts.load_dict(f"runs:/{run_id}/{PROFILE_ARTIFACT}")
    except MlflowException as exc:
        raise DriftError(
            f"{model_name} version {version} (run {run_id}) has no {PROFILE_ARTIFACT}: it was trained before "
            "monitoring existed; retrain it (the training run logs the profile) to monitor it"
        ) from exc
    return ReferenceProfile.from_dict(data)


def window_prefix(dataset: str, start: datetime) -> str:
    return f"{REPORTS_PREFIX}/{dataset}/window={start.strftime('%Y-%m-%dT%H%M%SZ')}/"


def save_window_report(
    store: Any,
    dataset: str,
    start: datetime,
    report: DriftReport,
    *,
    html: str,
    figure: bytes,
    context: dict[str, Any],
) -> str:
    """Write one window's report.json (verdict, context, per-feature numbers), report.html and figure.png.

    report.json is written last: a reader that finds it finds the whole report."""
    bucket, prefix = store.settings.lake_bucket, window_prefix(dataset, start)
    store.put_bytes(bucket, prefix + "figure.png", figure, content_type="image/png")
    store.put_bytes(bucket, prefix + "report.html", html.encode("utf-8"), content_type="text/html; charset=utf-8")
    summary = {**report.to_dict(), "context": context, "window_start": start.isoformat()}
    store.put_bytes(bucket, prefix + "report.json", json.dumps(summary).encode(), content_type="application/json")
    return prefix


def recent_reports(store: Any, dataset: str, n: int = 4, before: datetime | None = None) -> list[dict[str, Any]]:
    """The last ``n`` windows' report.json (oldest first), strictly before ``before`` when given."""
    bucket = store.settings.lake_bucket
    keys = sorted(
        k for k in store.list_keys(bucket, f"{REPORTS_PREFIX}/{dataset}/") if k.endswith("/report.json")
    )  # window=<ISO start> sorts in time order
    if before is not None:
        keys = [k for k in keys if k < window_prefix(dataset, before)]
    return [json.loads(store.get_bytes(bucket, k)) for k in keys[-n:]]
