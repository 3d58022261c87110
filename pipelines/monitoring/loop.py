"""The monitoring loop: judge a window of production data against the reference of the model that served it,
raise a drift alarm when the drift persists, and trace each alarm to the training run, version and rollout
it started.

* :func:`judge_window` (pure): the window's drift (every feature, the score and the alert flag) against
  the model version's reference profile, the window's verdict and the persistence rule over the previous
  windows judged against the same version.
* :func:`monitor_window` (the monitoring DAG's task): reads the window's gold rows and prediction log,
  loads the reference profile of the version that served them, judges, writes the report (JSON, HTML,
  figure) to the lake and to an MLflow run of the dataset's monitoring experiment, and decides whether
  the alarm emits the dataset's drift Asset (once per alarm, again only after the cooldown).
* :func:`record_retraining` / :func:`record_version` (the training DAG): tag the training run and the
  version it registered with the alarm that started them; :func:`loop_records` follows each alarm to
  its runs, versions, gate results and rollout outcomes (``platform monitor``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipelines.monitoring.drift import (
    DriftReport,
    DriftThresholds,
    ReferenceProfile,
    drift_report,
    persistent_alarm,
    persistent_features,
)
from pipelines.monitoring.job import FLAGGED, REPORTS_PREFIX, SCORE

Progress = Callable[[str], None]
OUTPUTS = (SCORE, FLAGGED)  # the model's outputs, profiled beside its input features at training time
ALARM_TAG = "monitoring.alarm_id"  # on a training run and the version it registered
HISTORY_DEPTH = 24  # reports read back to find the previous windows of the same model version
FEEDBACK_HORIZON = timedelta(days=7)  # feedback posted this long after a window still counts for it


# ---------------------------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class MonitoringPolicy:
    """What a window is and when it drifts (``datasets.<name>.monitoring`` in params.yaml)."""

    window_seconds: float = 86400.0
    thresholds: DriftThresholds = DriftThresholds()
    strong_wasserstein: float = 0.5
    alarm_windows: int = 3
    of_windows: int = 4
    exclude: tuple[str, ...] = ("hour_sin", "hour_cos")
    cooldown_seconds: float = 86400.0

    @classmethod
    def from_params(cls, p: Any, cadence_seconds: float | None = None) -> MonitoringPolicy:
        from pipelines.datasets import parse_duration

        window = parse_duration(p.window, what="monitoring.window")
        return cls(
            window_seconds=window,
            thresholds=DriftThresholds(
                wasserstein=p.wasserstein,
                jensen_shannon=p.jensen_shannon,
                min_rows=p.min_rows or default_min_rows(window, cadence_seconds),
                drift_share=p.drift_share,
            ),
            strong_wasserstein=p.strong_wasserstein,
            alarm_windows=p.alarm_windows,
            of_windows=p.of_windows,
            exclude=tuple(p.exclude),
            cooldown_seconds=parse_duration(p.cooldown, what="monitoring.cooldown"),
        )

    def describe(self) -> str:
        t = self.thresholds
        return (
            f"a feature drifts when normed Wasserstein > {t.wasserstein:g} or Jensen-Shannon > {t.jensen_shannon:g}; "
            f"a window of >= {t.min_rows:,} rows drifts when >= {t.drift_share:.0%} of its features drift or any "
            f"feature, the score or the alert flag moves >= {self.strong_wasserstein:g} reference stds; alarm when "
            f"{self.alarm_windows} of the last {self.of_windows} windows judged against the same model version drift"
        )


def default_min_rows(window_seconds: float, cadence_seconds: float | None) -> int:
    """1,000 rows, or half of what one device reports in a window when the cadence says that is fewer."""
    if not cadence_seconds:
        return 1000
    return int(min(1000, max(50, math.ceil(window_seconds / cadence_seconds / 2))))


def policy_for(dataset: str) -> MonitoringPolicy:
    """The dataset's monitoring rule: its params, its contract's cadence for what they leave unset."""
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset

    ds = get_dataset(dataset)
    return MonitoringPolicy.from_params(ds.params.monitoring, load_contract(ds.contract_path).cadence_seconds)


@dataclass(frozen=True)
class WindowVerdict:
    """One window judged: the drift report (input features, then score and alert flag), the window's
    verdict with its reasons, and the persistence rule over it and the previous windows."""

    report: DriftReport
    drifted: bool
    reasons: tuple[str, ...]
    responsible: tuple[str, ...]  # the features behind this window's drift
    alarm: bool
    alarm_features: tuple[str, ...]  # drifted in at least k of the last n windows
    history: tuple[bool, ...]  # the previous windows' verdicts (same model version), oldest first

    @property
    def status(self) -> str:
        if not self.report.enough_rows:
            return "too few rows"
        return "ALARM" if self.alarm else ("drift" if self.drifted else "ok")

    def summary(self) -> dict[str, Any]:
        """What the next windows need (persistence) and people read first."""
        return {
            "window_drift": self.drifted,
            "status": self.status,
            "reasons": list(self.reasons),
            "responsible_features": list(self.responsible),
            "alarm": self.alarm,
            "alarm_features": list(self.alarm_features),
            "previous_windows": list(self.history),
        }


def _merge(inputs: DriftReport, outputs: DriftReport | None) -> DriftReport:
    if outputs is None:
        return inputs
    return DriftReport(
        features=inputs.features + outputs.features,
        n_rows=inputs.n_rows,
        thresholds=inputs.thresholds,
        enough_rows=inputs.enough_rows,
        dataset_drift=inputs.dataset_drift,  # the share rule counts the input features
        drifted_share=inputs.drifted_share,
    )


def judge_window(
    profile: ReferenceProfile,
    features: pd.DataFrame,
    outputs: pd.DataFrame | None,
    policy: MonitoringPolicy,
    history: Sequence[Mapping[str, Any]] = (),
) -> WindowVerdict:
    """The window's verdict (pure).

    ``features``: the window's rows of the model's input features; ``outputs``: the window's ``score``
    and ``flagged`` (0/1) of the model version the profile belongs to, or None; ``history``: the
    previous windows' :meth:`WindowVerdict.summary` judged against the same version, oldest first.

    A window drifts when it has enough rows and either at least ``drift_share`` of the input features
    drift (Evidently's dataset drift), or any one feature, the score or the alert flag moves by at
    least ``strong_wasserstein`` reference stds: a calibration offset on one sensor moves a handful of
    level features far while the offset-free ones (deltas, z-scores, deviations) stay, so the share
    alone would not see it.
    """
    t = policy.thresholds
    inputs = [c for c in profile.features if c not in OUTPUTS and c not in policy.exclude]
    in_report = drift_report(profile, features, columns=inputs, thresholds=t)
    out_cols = [c for c in OUTPUTS if c in profile.features and outputs is not None and c in outputs.columns]
    out_report = drift_report(profile, outputs, columns=out_cols, thresholds=t) if out_cols else None
    report = _merge(in_report, out_report)

    reasons: list[str] = []
    responsible: list[str] = []
    judged = [f for f in in_report.features if f.status != "no reference"]
    if in_report.dataset_drift:
        drifted = [f.feature for f in judged if f.drifted]
        reasons.append(
            f"{len(drifted)} of {len(judged)} features drifted ({in_report.drifted_share:.0%} >= {t.drift_share:.0%})"
        )
        responsible += drifted
    strong = [
        f for f in report.features if f.status == "drift" and math.isfinite(f.wasserstein)
        and f.wasserstein >= policy.strong_wasserstein
    ]  # fmt: skip
    for f in sorted(strong, key=lambda f: -f.wasserstein):
        reasons.append(
            f"{f.feature} moved {f.wasserstein:.2f} reference stds (mean {f.mean_reference:.4g} -> "
            f"{f.mean_current:.4g}; >= {policy.strong_wasserstein:g})"
        )
        if f.feature not in responsible:
            responsible.append(f.feature)
    window_drift = bool(report.enough_rows and reasons)
    if not window_drift:
        responsible = []
    previous = [bool(h.get("window_drift", False)) for h in history]
    alarm = persistent_alarm([*previous, window_drift], k=policy.alarm_windows, n=policy.of_windows)
    alarm_features: list[str] = []
    if alarm:
        windows = [{"drifted_features": h.get("responsible_features", [])} for h in history]
        windows.append({"drifted_features": responsible})
        alarm_features = persistent_features(windows, k=policy.alarm_windows, n=policy.of_windows) or responsible
    return WindowVerdict(
        report=report,
        drifted=window_drift,
        reasons=tuple(reasons),
        responsible=tuple(responsible),
        alarm=alarm,
        alarm_features=tuple(alarm_features),
        history=tuple(previous[-(policy.of_windows - 1) :]) if policy.of_windows > 1 else (),
    )


def alarm_decision(
    verdict: WindowVerdict,
    *,
    dataset: str,
    version: str,
    window_end: datetime,
    previous_alarms: Sequence[Mapping[str, Any]],
    cooldown_seconds: float,
) -> tuple[bool, str, str]:
    """(emit, alarm id, note): a persistent alarm emits the drift Asset once; while it lasts on the same
    model version it emits again only after ``cooldown_seconds`` of windows (the retrained version may
    have failed the gate or the canary). A new version starts afresh."""
    if not verdict.alarm:
        return False, "", "no alarm"
    alarm_id = f"{dataset}-v{version}-{window_end.astimezone(UTC):%Y%m%dT%H%MZ}"
    same = [a for a in previous_alarms if str(a.get("model_version")) == str(version)]
    if any(a.get("alarm_id") == alarm_id for a in same):
        return False, alarm_id, f"alarm {alarm_id} was already raised for this window"
    if same:
        last = max(same, key=lambda a: a["window_end"])
        since = (window_end - datetime.fromisoformat(last["window_end"])).total_seconds()
        if since < cooldown_seconds:
            return (
                False,
                last["alarm_id"],
                (
                    f"alarm {last['alarm_id']} still open ({since / 3600:.1f} h of windows < cooldown "
                    f"{cooldown_seconds / 3600:.0f} h): not emitted again"
                ),
            )
    return True, alarm_id, f"alarm {alarm_id} raised: drift persists on {', '.join(verdict.alarm_features)}"


# ---------------------------------------------------------------------------------------------- serving


def served_version(predictions: pd.DataFrame) -> str | None:
    """The version that served most of the window's records as champion (else as anything)."""
    if predictions.empty:
        return None
    served = predictions[predictions["served"].fillna(False).astype(bool)]
    for rows in (served[served["role"] == "champion"], served):
        versions = rows["model_version"].dropna()
        if len(versions):
            return str(versions.value_counts().idxmax())
    return None


def serving_summary(predictions: pd.DataFrame) -> dict[str, float]:
    """Errors and latency of the window's served records; latency once per model call (a request's
    records share one), as the canary counts it."""
    if predictions.empty:
        return {"records": 0.0}
    served = predictions[predictions["served"].fillna(False).astype(bool)]
    if served.empty:
        return {"records": 0.0}
    calls = served.groupby("request_id", sort=False)
    latency = calls["latency_ms"].first().to_numpy(dtype=float)
    compute = calls["compute_ms"].first().to_numpy(dtype=float)
    out = {
        "records": float(len(served)),
        "requests": float(len(latency)),
        "error_rate": float(served["error"].notna().mean()),
        "latency_p50_ms": float(np.nanpercentile(latency, 50)) if np.isfinite(latency).any() else math.nan,
        "latency_p99_ms": float(np.nanpercentile(latency, 99)) if np.isfinite(latency).any() else math.nan,
        "compute_p99_ms": float(np.nanpercentile(compute, 99)) if np.isfinite(compute).any() else math.nan,
    }
    return out


# ---------------------------------------------------------------------------------------------- the task


def window_end_from_context(context: Mapping[str, Any]) -> str:
    """The end of the window a DAG run judges: conf ``window_end`` (ISO), else the run's data interval end,
    else (a manual run without a logical date) the hour it runs in."""
    dag_run = context.get("dag_run")
    conf = (dag_run.conf if dag_run is not None else None) or {}
    if conf.get("window_end"):
        return _utc(conf["window_end"]).isoformat()
    end = context.get("data_interval_end") or context.get("logical_date")
    if end is None:
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return _utc(end).isoformat()


def _utc(value: str | datetime) -> datetime:
    when = datetime.fromisoformat(str(value).replace("Z", "+00:00")) if not isinstance(value, datetime) else value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def read_window_features(store, dataset: str, start: datetime, end: datetime) -> pd.DataFrame:
    """The gold rows (the model's features) with event time in [start, end)."""
    from pipelines import storage
    from pipelines.datasets import get_dataset
    from pipelines.layers.gold import from_storage
    from pipelines.layers.partitioning import partition_of

    grain = get_dataset(dataset).grain
    wanted, day = set(), start.date()
    while day <= (end - timedelta(microseconds=1)).date():
        wanted.add(partition_of(day.isoformat(), grain))
        day += timedelta(days=1)
    present = sorted(wanted & set(storage.list_partitions(store, "gold", dataset)))
    if not present:
        return pd.DataFrame()
    frame = pd.concat(
        [from_storage(storage.read_partition(store, "gold", dataset, p)) for p in present], ignore_index=True
    )
    ts = pd.to_datetime(frame["ts"], utc=True)
    return frame[(ts >= pd.Timestamp(start)) & (ts < pd.Timestamp(end))].reset_index(drop=True)


def replay_outputs(client, model_name: str, version: str, features: pd.DataFrame, tracking_uri: str) -> pd.DataFrame:
    """The version's score and alert flag on the window's rows, as the scoring service computes them
    (same skops loader, columns and decision threshold): for windows no prediction log covers."""
    import warnings

    from pipelines.serving.models import load_version

    with warnings.catch_warnings():
        # skops walks every module's attributes; inside a task each deprecated Airflow one warns (~1,000 lines)
        warnings.filterwarnings("ignore", module=r"skops\.io\._utils")
        model = load_version(client, model_name, "champion", version, tracking_uri)
    scores = np.asarray(model.estimator.predict(features[model.columns].astype("float64")), dtype="float64").ravel()
    return pd.DataFrame({SCORE: scores, FLAGGED: (scores >= model.threshold).astype("float64")})


def _alarm_prefix(dataset: str) -> str:
    return f"{REPORTS_PREFIX}/{dataset}/alarms/"


def read_alarms(store, dataset: str) -> list[dict[str, Any]]:
    bucket = store.settings.lake_bucket
    keys = sorted(k for k in store.list_keys(bucket, _alarm_prefix(dataset)) if k.endswith(".json"))
    return [json.loads(store.get_bytes(bucket, k)) for k in keys]


def _history(store, dataset: str, start: datetime, version: str, depth: int) -> list[dict[str, Any]]:
    from pipelines.monitoring.job import recent_reports

    reports = recent_reports(store, dataset, n=HISTORY_DEPTH, before=start)
    same = [r["context"] for r in reports if str(r.get("context", {}).get("model_version")) == str(version)]
    return same[-depth:] if depth > 0 else []


def _window_performance(
    store,
    client,
    model_name: str,
    version: str,
    tracking_uri: str,
    served: pd.DataFrame,
    features: pd.DataFrame,
    outputs: pd.DataFrame | None,
    scores_from: str,
    end: datetime,
) -> dict[str, Any]:
    """The window's performance against the labels that have arrived: feedback on the version's served
    records (posted up to :data:`FEEDBACK_HORIZON` after the window), else the gold rows' labels beside
    the version's flags on those rows (replayed when the window's scores came from the prediction log,
    whose records do not line up with gold rows). Never fails the window: drift is judged regardless."""
    from pipelines.monitoring.performance import LABEL, feedback_rows, gold_rows, labelled_count, window_performance
    from pipelines.serving.predlog import FEEDBACK, read_table

    feedback = None
    if len(served):
        since = served["ts"].min().to_pydatetime()  # a label is posted after its prediction
        feedback = feedback_rows(
            served, read_table(store, FEEDBACK, since, min(datetime.now(UTC), end + FEEDBACK_HORIZON))
        )
    gold_labelled = int(features[LABEL].notna().sum()) if LABEL in features.columns else 0
    if feedback is not None and labelled_count(feedback):
        perf = window_performance(feedback)
        if gold_labelled:
            perf["note"] = f"feedback on served records preferred over gold labels on {gold_labelled:,} rows"
        return perf
    if not gold_labelled:
        return window_performance(feedback)
    if outputs is not None and scores_from != "prediction log":  # the version's flags on these very rows
        return window_performance(feedback, gold_rows(features, outputs[FLAGGED]), gold_flags_from=scores_from)
    try:
        replayed = replay_outputs(client, model_name, version, features, tracking_uri)
    except Exception as exc:  # noqa: BLE001 - the drift verdict must not depend on the labels
        perf = window_performance(feedback)
        perf["note"] = f"gold labels present, but v{version}'s flags on them could not be replayed: {exc}"[:500]
        return perf
    flags_from = f"replayed with v{version} (the prediction log's records are not gold rows)"
    return window_performance(feedback, gold_rows(features, replayed[FLAGGED]), gold_flags_from=flags_from)


def monitoring_experiment(dataset: str) -> str:
    return f"monitoring-{dataset}"


def monitor_window(
    window_end: str | datetime,
    *,
    dataset: str | None = None,
    store=None,
    dag_id: str | None = None,
    run_id: str | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Judge the window ending at ``window_end`` for ``dataset`` and record it; returns what the DAG's
    alarm task needs (``emit``, the ``alarm`` extra) and a one-line ``note``."""
    from mlflow import MlflowClient
    from pipelines.datasets import get_dataset
    from pipelines.monitoring.job import load_reference_profile, save_window_report
    from pipelines.monitoring.performance import describe as describe_performance
    from pipelines.monitoring.performance import performance_metrics
    from pipelines.monitoring.report import effect_size_figure, figure_png, render_html
    from pipelines.serving.predlog import PREDICTIONS, read_table
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    settings = get_settings()
    ds = get_dataset(dataset or settings.dataset)
    policy = policy_for(ds.name)
    clock = _Clock()
    store = store or ObjectStore(settings)
    uri = settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    end = _utc(window_end)
    start = end - timedelta(seconds=policy.window_seconds)
    label = f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC"

    predictions = read_table(store, PREDICTIONS, start, end)
    predictions = predictions[predictions["ts"] < pd.Timestamp(end)]
    # this dataset's model only: other scoring services may log to the same lake (rows of a service
    # older than the model_name column are kept: they cannot be told apart)
    predictions = predictions[predictions["model_name"].isna() | (predictions["model_name"] == ds.model_name)]
    version = served_version(predictions)
    if version is None:
        aliases = {k: str(v) for k, v in (_registered_aliases(client, ds.model_name)).items()}
        version = aliases.get("champion")
    if version is None:
        note = f"{ds.model_name} has no champion and nothing was served in {label}: nothing to monitor"
        progress(f"[monitor] {note}")
        return {"emit": False, "note": note, "dataset": ds.name, "window_end": end.isoformat()}
    clock.lap("prediction log")
    profile = load_reference_profile(ds.model_name, version, tracking_uri=uri)
    clock.lap("reference profile")
    features = read_window_features(store, ds.name, start, end)
    clock.lap("gold rows")
    mine = predictions[predictions["served"].fillna(False).astype(bool) & (predictions["model_version"] == version)]
    if len(mine):
        outputs, source = mine[[SCORE]].assign(**{FLAGGED: mine[FLAGGED].astype("float64")}), "prediction log"
    elif len(features):
        outputs, source = replay_outputs(client, ds.model_name, version, features, uri), f"replayed with v{version}"
    else:
        outputs, source = None, "none"
    clock.lap("scores")
    progress(f"[monitor] {ds.name} {label}: {len(features)} rows, model v{version}, scores from {source}")

    history = _history(store, ds.name, start, version, policy.of_windows - 1)
    verdict = judge_window(profile, features, outputs, policy, history)
    emit, alarm_id, alarm_note = alarm_decision(
        verdict,
        dataset=ds.name,
        version=version,
        window_end=end,
        previous_alarms=read_alarms(store, ds.name),
        cooldown_seconds=policy.cooldown_seconds,
    )
    serving = serving_summary(predictions)
    clock.lap("judge")
    perf = _window_performance(store, client, ds.model_name, version, uri, mine, features, outputs, source, end)
    clock.lap("performance")
    progress(f"[monitor] {describe_performance(perf)}")

    exp = client.get_experiment_by_name(monitoring_experiment(ds.name))
    exp_id = exp.experiment_id if exp else client.create_experiment(monitoring_experiment(ds.name))
    run = client.create_run(
        exp_id,
        run_name=f"window {end:%Y-%m-%dT%H:%MZ}",
        tags={
            "dataset": ds.name,
            "model_name": ds.model_name,
            "model_version": version,
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "scores_from": source,
            "status": verdict.status,
            "performance_source": perf["source"],
            "airflow_dag_id": dag_id or "",
            "airflow_run_id": run_id or "",
            **({ALARM_TAG: alarm_id} if alarm_id else {}),
        },
    )
    context = {
        "dataset": ds.name,
        "model_name": ds.model_name,
        "model_version": version,
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "rows": len(features),
        "scores_from": source,
        "rule": policy.describe(),
        **verdict.summary(),
        "alarm_id": alarm_id,
        "alarm_note": alarm_note,
        "serving": serving,
        "performance": perf,
        "mlflow_run_id": run.info.run_id,
    }
    figure = figure_png(effect_size_figure(verdict.report, title=f"{ds.name} {label}"))
    labels = [f"previous window {i - len(verdict.history)}" for i in range(len(verdict.history))]
    html = render_html(
        verdict.report,
        title=f"Drift of {ds.model_name} v{version} on {ds.name}, {label}",
        context={k: v for k, v in context.items() if not isinstance(v, (list, dict))}
        | {"reasons": "; ".join(verdict.reasons) or "-", "alarm features": ", ".join(verdict.alarm_features) or "-"},
        history=[*zip(labels, verdict.history, strict=True), ("this window", verdict.drifted)],
        alarm=verdict.alarm,
        figure=figure,
        performance=perf,
    )
    clock.lap("report")
    prefix = save_window_report(store, ds.name, start, verdict.report, html=html, figure=figure, context=context)
    clock.lap("lake")
    _log_window_run(client, run.info.run_id, verdict, context, html, figure, serving, performance_metrics(perf))
    clock.lap("mlflow")

    alarm = None
    if emit:
        alarm = {
            "alarm_id": alarm_id,
            "dataset": ds.name,
            "model_name": ds.model_name,
            "model_version": version,
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "features": list(verdict.alarm_features),
            "reasons": list(verdict.reasons)[:10],
            "monitoring_run_id": run.info.run_id,
            "raised_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        store.put_bytes(
            store.settings.lake_bucket,
            f"{_alarm_prefix(ds.name)}{alarm_id}.json",
            json.dumps(alarm).encode(),
            "application/json",
        )
    note = f"{verdict.status}: {'; '.join(verdict.reasons) or 'no drift'}; {alarm_note}"
    progress(f"[monitor] {note} (report s3://{store.settings.lake_bucket}/{prefix})")
    progress(f"[monitor] took {clock}")
    return {
        "emit": emit,
        "alarm": alarm,
        "note": note[:1000],
        "dataset": ds.name,
        "model_version": version,
        "window_end": end.isoformat(),
        "status": verdict.status,
        "report": prefix,
        "mlflow_run_id": run.info.run_id,
        "performance": {k: perf.get(k) for k in ("source", "labelled_rows", "f1", "event_recall")},
    }


class _Clock:
    """Seconds per step of a task, for its log line (where a slow window spends its time)."""

    def __init__(self) -> None:
        import time

        self._time = time.perf_counter
        self._last = self._start = self._time()
        self.laps: list[tuple[str, float]] = []

    def lap(self, what: str) -> None:
        now = self._time()
        self.laps.append((what, now - self._last))
        self._last = now

    def __str__(self) -> str:
        steps = ", ".join(f"{what} {seconds:.1f}" for what, seconds in self.laps)
        return f"{self._time() - self._start:.1f} s ({steps})"


def _registered_aliases(client, model_name: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(model_name).aliases or {})
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def _log_window_run(
    client,
    run_id: str,
    verdict: WindowVerdict,
    context: dict,
    html: str,
    figure: bytes,
    serving,
    performance: Mapping[str, float] | None = None,
) -> None:
    """Metrics in one request and the three files in one upload call (each MLflow request counts on a
    busy tracking server)."""
    import tempfile
    import time
    from pathlib import Path

    from mlflow.entities import Metric

    r = verdict.report
    metrics = {
        "rows": float(r.n_rows),
        "drifted_share": float(r.drifted_share),
        "window_drift": float(verdict.drifted),
        "alarm": float(verdict.alarm),
        "max_wasserstein": max((f.wasserstein for f in r.features if math.isfinite(f.wasserstein)), default=0.0),
        **{f"serving_{k}": v for k, v in serving.items()},
        **(performance or {}),
    }
    for f in r.features:
        if f.feature in OUTPUTS or f.feature in verdict.responsible:
            metrics[f"wasserstein.{f.feature}"] = f.wasserstein
            metrics[f"mean.{f.feature}"] = f.mean_current
    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, 0) for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)]
    client.log_batch(run_id, metrics=batch)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "report.html").write_text(html, encoding="utf-8")
        (folder / "report.json").write_text(json.dumps({**r.to_dict(), "context": context}, default=str))
        (folder / "figure.png").write_bytes(figure)
        client.log_artifacts(run_id, str(folder), "monitoring")
    client.set_terminated(run_id, "FINISHED")


# ---------------------------------------------------------------------------------------------- the loop


def alarms_from_events(triggering_asset_events: Any) -> list[dict[str, Any]]:
    """The drift alarms among a DAG run's triggering Asset events (their extra), oldest first, once each."""
    seen: dict[str, dict[str, Any]] = {}
    for events in (triggering_asset_events or {}).values():
        for event in events:
            extra = dict(getattr(event, "extra", None) or {})
            if extra.get("alarm_id"):
                seen.setdefault(str(extra["alarm_id"]), extra)
    return sorted(seen.values(), key=lambda a: str(a.get("window_end", "")))


def _loop_tags(alarms: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    features = sorted({f for a in alarms for f in a.get("features", [])})
    return {
        ALARM_TAG: ",".join(str(a["alarm_id"]) for a in alarms)[:5000],
        "monitoring.alarm_windows": ",".join(f"{a.get('window_start')}..{a.get('window_end')}" for a in alarms)[:5000],
        "monitoring.alarm_features": ",".join(features)[:5000],
        "monitoring.alarm_model_version": ",".join(str(a.get("model_version", "")) for a in alarms)[:5000],
        "retrain.trigger": "drift alarm",
    }


def record_retraining(
    alarms: Sequence[Mapping[str, Any]], trained: Mapping[str, Any], progress: Progress = print
) -> dict:
    """Tag the training run the alarms started (``monitoring.alarm_id`` ...); returns the tags."""
    from mlflow import MlflowClient
    from pipelines.settings import get_settings

    if not alarms:
        return {}
    uri = get_settings().mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri)
    tags = _loop_tags(alarms)
    for key, value in tags.items():
        client.set_tag(trained["run_id"], key, value)
    progress(f"[monitor] training run {trained['run_id']} started by drift alarm(s) {tags[ALARM_TAG]}")
    return tags


def record_version(
    alarms: Sequence[Mapping[str, Any]], registered: Mapping[str, Any], progress: Progress = print
) -> dict:
    """Tag the version a drift-started training run registered with the alarms (the gate's role may)."""
    from mlflow import MlflowClient
    from pipelines.settings import get_settings

    if not alarms:
        return {}
    uri = get_settings().mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = _loop_tags(alarms)
    for key, value in tags.items():
        client.set_model_version_tag(registered["model_name"], str(registered["version"]), key, value)
    progress(f"[monitor] {registered['model_name']} v{registered['version']} comes from alarm(s) {tags[ALARM_TAG]}")
    return tags


def recent_windows(store, dataset: str, n: int = 12) -> list[dict[str, Any]]:
    """The last ``n`` judged windows of ``dataset`` (their report context), oldest first."""
    from pipelines.monitoring.job import recent_reports

    return [
        {**r.get("context", {}), "drifted_share": r.get("drifted_share")} for r in recent_reports(store, dataset, n)
    ]


def loop_records(dataset: str, *, store=None, client=None) -> list[dict[str, Any]]:
    """Each alarm of ``dataset`` with the training runs it started, the versions they registered, the
    gate's verdict and how each version's rollout ended (canary history), oldest alarm first."""
    from mlflow import MlflowClient
    from pipelines.canary import history
    from pipelines.datasets import get_dataset
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    settings = get_settings()
    ds = get_dataset(dataset)
    store = store or ObjectStore(settings)
    uri = settings.mlflow_tracking_uri
    client = client or MlflowClient(tracking_uri=uri, registry_uri=uri)
    alarms = read_alarms(store, ds.name)
    if not alarms:
        return []
    events = [e for e in history.read_events(store) if e.get("model_name") == ds.model_name]
    # search_model_versions leaves a version's aliases empty: the registered model has them
    aliases = {str(a): str(v) for a, v in _registered_aliases(client, ds.model_name).items()}
    exp = client.get_experiment_by_name(settings.mlflow_experiment)
    runs = []
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{ALARM_TAG}` LIKE '%{ds.name}-v%'", max_results=500
        )
    records = []
    for alarm in sorted(alarms, key=lambda a: a["window_end"]):
        started = [r for r in runs if alarm["alarm_id"] in r.data.tags.get(ALARM_TAG, "").split(",")]
        trainings = []
        for run in sorted(started, key=lambda r: r.info.start_time):
            versions = []
            for mv in client.search_model_versions(f"name='{ds.model_name}' and run_id='{run.info.run_id}'"):
                tags = mv.tags or {}
                versions.append(
                    {
                        "version": str(mv.version),
                        "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                        "gate": tags.get("gate.reason", ""),
                        "rollout": history.rollout_outcome(events, str(mv.version)),
                    }
                )
            trainings.append({"run_id": run.info.run_id, "status": run.info.status, "versions": versions})
        records.append({**alarm, "trainings": trainings})
    return records


def _f1_cell(perf: Mapping[str, Any] | None) -> str:
    """`0.86 (gold, 5,760)`: the window's F1 against labels, their source and count; `-` without labels."""
    if not perf or not perf.get("labelled_rows"):
        return "-"
    f1 = perf.get("f1")
    source = str(perf.get("source", "")).split()[0]
    return f"{'n/a' if f1 is None else f'{f1:.2f}'} ({source}, {int(perf['labelled_rows']):,d})"


def format_monitor(windows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> str:
    """``platform monitor``: the recent windows' verdicts, then each alarm's loop."""
    lines = ["window end (UTC)        model  rows    share  status        F1 (labels)        why"]
    for w in windows:
        share = w.get("drifted_share")
        lines.append(
            f"{str(w.get('window_end', ''))[:16]:23s} v{str(w.get('model_version', '?')):5s} "
            f"{int(w.get('rows', 0)):7,d} {(share if share is not None else 0):5.0%}  {w.get('status', '?'):13s} "
            f"{_f1_cell(w.get('performance')):18s} {'; '.join(w.get('reasons', []))[:110] or '-'}"
        )
    if not windows:
        lines.append("(no window judged yet: the monitoring DAG writes one report per run)")
    lines.append("")
    lines.append("drift alarms and what they started:")
    if not records:
        lines.append("  (none)")
    for a in records:
        lines.append(
            f"  {a['alarm_id']}: window {a['window_start'][:16]} .. {a['window_end'][:16]}, "
            f"features {', '.join(a.get('features', [])) or '-'}"
        )
        if not a["trainings"]:
            lines.append("    -> no training run tagged with it yet")
        for t in a["trainings"]:
            lines.append(f"    -> training run {t['run_id']} ({t['status']})")
            for v in t["versions"]:
                outcome = v["rollout"]
                rollout = f"{outcome['event']} at {outcome['at'][:19]}" if outcome else "no rollout recorded"
                aliases = f" [{', '.join(v['aliases'])}]" if v["aliases"] else ""
                lines.append(f"       -> version {v['version']}{aliases}: gate: {v['gate'][:80] or '-'}; {rollout}")
    return "\n".join(lines)
