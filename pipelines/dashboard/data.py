"""What the dashboard shows, read from the platform's own stores with the platform's own code.

Readings: the dataset's latest bronze partitions (the live path commits there within a second of a
reading; batch deliveries land there first too), typed and filtered by silver's own `to_silver`, and
scored with the registry's champion through the live scorer's own `OnlineScorer` (gold's features,
the canary's routing, the model's threshold). A reading is red when that score reaches the threshold:
what the stream's scorer alerts on for the same readings (tests/integration/test_stream.py shows the
two agree). The scored frame is recomputed only when a bronze manifest or the loaded model changes.

Beside it: the registry's versions and aliases (MLflow), the canary's rollout state (the lake object
the scoring service routes by), the monitoring job's window reports (`pipelines.monitoring.job`, when
it has written any), and the stream's latest state per device (Redis, when configured).

Each part fails on its own: an unreachable service leaves its part empty with the reason, never the
page blank.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("pipelines.dashboard")


@dataclass
class DashboardConfig:
    hours: float = 24.0  # readings shown: this long before each device's latest
    max_rows: int = 200_000  # bronze rows read per refresh (the newest partitions up to this)
    max_points: int = 1500  # points drawn per device (every anomaly; normal points thinned beyond)
    refresh_seconds: float = 2.0  # the lake is re-read this often while someone watches
    slow_refresh_seconds: float = 10.0  # registry versions, drift reports, rollout state
    alerts: int = 15  # recent alerts listed
    idle_seconds: float = 120.0  # nobody polled for this long: stop refreshing until someone does


def _iso(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), UTC).isoformat(timespec="seconds")
    return pd.Timestamp(value).isoformat()


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


# --------------------------------------------------------------------------- pure parts


def flag_readings(silver: pd.DataFrame, scored: list, columns: list[str]) -> pd.DataFrame:
    """device, ts, `columns`, score, threshold, flagged (1, 0; -1 unscored), model_version, role: one
    row per silver row. `scored` is `OnlineScorer.score_silver(silver)`: row i scores silver's row i,
    or empty when no champion is loaded."""
    frame = silver[["device", "ts", *columns]].reset_index(drop=True).copy()
    if scored and len(scored) == len(frame):
        frame["score"] = np.array([s.score for s in scored], dtype="float64")
        frame["threshold"] = np.array([s.threshold for s in scored], dtype="float64")
        frame["flagged"] = (frame["score"] >= frame["threshold"]).astype("int8")
        frame["model_version"] = [s.model_version for s in scored]
        frame["role"] = [s.role for s in scored]
    else:
        frame["score"] = np.nan
        frame["threshold"] = np.nan
        frame["flagged"] = np.int8(-1)
        frame["model_version"] = ""
        frame["role"] = ""
    return frame


def recent_window(frame: pd.DataFrame, hours: float) -> pd.DataFrame:
    """Each device's readings within `hours` of its own latest."""
    if frame.empty:
        return frame
    latest = frame.groupby("device")["ts"].transform("max")
    return frame[frame["ts"] >= latest - pd.Timedelta(hours=hours)]


def device_series(frame: pd.DataFrame, column: str, max_points: int) -> dict[str, dict[str, Any]]:
    """Per device the points to draw: t (epoch ms), v (the reading), f (1 anomaly, 0 normal, -1 not
    scored), s (score). Beyond `max_points`, normal points are thinned evenly; anomalies all stay."""
    out: dict[str, dict[str, Any]] = {}
    for device, rows in frame.groupby("device", sort=True):
        rows = rows.sort_values("ts", kind="stable")
        if len(rows) > max_points:
            anomalous = rows["flagged"].to_numpy() == 1
            keep = np.zeros(len(rows), dtype=bool)
            budget = max(max_points - int(anomalous.sum()), 2)
            keep[np.linspace(0, len(rows) - 1, budget).astype(int)] = True
            rows = rows[keep | anomalous]
        t = (rows["ts"].astype("datetime64[ms, UTC]").astype("int64")).tolist()
        v = [_num(x) for x in rows[column].tolist()]
        s = [None if x is None else round(x, 6) for x in (_num(x) for x in rows["score"].tolist())]
        out[str(device)] = {
            "t": t,
            "v": v,
            "f": rows["flagged"].astype(int).tolist(),
            "s": s,
            "anomalies": int((rows["flagged"] == 1).sum()),
            "last": _iso(rows["ts"].iloc[-1]) if len(rows) else None,
        }
    return out


def recent_alerts(frame: pd.DataFrame, column: str, n: int) -> list[dict[str, Any]]:
    """The newest `n` flagged readings, newest first."""
    flagged = frame[frame["flagged"] == 1].sort_values("ts", ascending=False).head(n)
    return [
        {
            "device": str(r.device),
            "ts": _iso(r.ts),
            "value": _num(getattr(r, column)),
            "score": _num(r.score),
            "threshold": _num(r.threshold),
            "model_version": str(r.model_version),
            "role": str(r.role),
        }
        for r in flagged.itertuples(index=False)
    ]


def drift_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The monitoring job's window reports (oldest first) as the page shows them: each window's verdict
    (the job's own, from the report's context: drift, alarm, status; the report's dataset-level share
    rule where a report has no context) and the latest window's numbers per feature."""
    windows = []
    for r in reports:
        context = r.get("context") or {}
        drifted = context.get("window_drift", r.get("dataset_drift"))
        windows.append(
            {
                "window_start": r.get("window_start") or context.get("window_start"),
                "window_end": context.get("window_end"),
                "drifted": bool(drifted),
                "alarm": bool(context.get("alarm", False)),
                "status": context.get("status") or ("drift" if drifted else "ok"),
                "reasons": list(context.get("reasons") or [])[:5],
                "model_version": context.get("model_version"),
                "n_rows": r.get("n_rows"),
            }
        )
    features = []
    responsible: set[str] = set()
    if reports:
        latest_context = reports[-1].get("context") or {}
        responsible = set(latest_context.get("responsible_features") or []) | set(
            latest_context.get("alarm_features") or []
        )
        for f in reports[-1].get("features") or []:
            features.append(
                {
                    "feature": f.get("feature"),
                    "status": f.get("status"),
                    "drifted": bool(f.get("drifted")) or f.get("feature") in responsible,
                    "wasserstein": _num(f.get("wasserstein")),
                    "jensen_shannon": _num(f.get("jensen_shannon")),
                    "psi": _num(f.get("psi")),
                    "n_current": f.get("n_current"),
                }
            )
    thresholds = reports[-1].get("thresholds") if reports else None
    return {"windows": windows, "features": features, "thresholds": thresholds}


def canary_summary(rollout: Any) -> dict[str, Any] | None:
    if rollout is None:
        return None
    from pipelines.canary.controller import stage_note

    fields = ("status", "rollout_id", "step_name", "weight", "shadow", "champion_version", "challenger_version")
    out = {k: getattr(rollout, k, None) for k in fields}
    out["updated_at"] = getattr(rollout, "updated_at", None)
    out["reason"] = getattr(rollout, "reason", None)
    try:
        out["note"] = stage_note(rollout)
    except Exception:  # noqa: BLE001 - the note is a nicety
        out["note"] = ""
    return out


# --------------------------------------------------------------------------- one dataset, kept fresh


class DatasetView:
    """One dataset's snapshot, refreshed by a thread of its own while the page polls it."""

    def __init__(self, dataset: str, *, settings, store, cfg: DashboardConfig, model_name: str | None = None):
        from pipelines.contracts import load_contract
        from pipelines.datasets import effective_params, get_dataset
        from pipelines.serving.models import ModelManager

        ds = get_dataset(dataset)
        self.dataset, self.settings, self.store, self.cfg = dataset, settings, store, cfg
        self.contract = load_contract(ds.contract_path)
        self.model_name = model_name or ds.model_name
        gold = effective_params(dataset)["gold"]
        self.window, self.long_window = gold["window"], gold["long_window"]
        self.columns = list(self.contract.numeric_columns)
        self.units = {c.name: c.unit for c in self.contract.columns}
        self.manager = ModelManager(settings, self.model_name, cfg.slow_refresh_seconds, store)
        self._frame = pd.DataFrame()
        self._fingerprint: tuple | None = None
        self._lake: dict[str, Any] = {}
        self._slow: dict[str, Any] = {}
        self._slow_at = 0.0
        self._errors: dict[str, str] = {}
        self._updated_at: float | None = None
        self._refreshes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._polled = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> DatasetView:
        self._thread = threading.Thread(target=self._loop, name=f"dashboard-{self.dataset}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)  # a refresh in flight finishes before the stores go away

    def _loop(self) -> None:
        while not self._stop.is_set():
            if time.monotonic() - self._polled <= self.cfg.idle_seconds or self._updated_at is None:
                try:
                    self.refresh()
                except Exception as exc:  # noqa: BLE001 - a refresh never ends the loop
                    log.exception("dashboard refresh of %s failed", self.dataset)
                    self._errors["refresh"] = f"{type(exc).__name__}: {exc}"[:300]
            self._wake.wait(self.cfg.refresh_seconds)
            self._wake.clear()

    # -- one refresh --------------------------------------------------------------------------------
    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._slow_at >= self.cfg.slow_refresh_seconds or not self._slow_at:
            self._slow_at = now
            self._refresh_slow()
        self._refresh_readings()
        self._refresh_live()
        self._updated_at = time.time()
        self._refreshes += 1

    def _attempt(self, part: str, fn):
        try:
            value = fn()
            self._errors.pop(part, None)
            return value
        except Exception as exc:  # noqa: BLE001 - shown on the page beside its part
            self._errors[part] = f"{type(exc).__name__}: {str(exc)[:300]}"
            return None

    def _refresh_slow(self) -> None:
        self.manager.poll_once()  # loads the champion/challenger versions, reads the rollout state
        for role, problem in self.manager.problems.items():
            self._errors[f"model:{role}"] = problem
        for key in [k for k in self._errors if k.startswith("model:")]:
            if key[len("model:") :] not in self.manager.problems:
                self._errors.pop(key)
        self._slow["registry"] = self._attempt("registry", self._registry)
        self._slow["drift"] = self._attempt("drift", self._drift)

    def _registry(self) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        from mlflow import MlflowClient

        uri = self.settings.mlflow_tracking_uri
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            aliases = {a: str(v) for a, v in (client.get_registered_model(self.model_name).aliases or {}).items()}
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return {"model_name": self.model_name, "aliases": {}, "versions": [], "note": "not registered yet"}
            raise
        found = client.search_model_versions(
            f"name='{self.model_name}'", max_results=10, order_by=["version_number DESC"]
        )
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(version, []).append(alias)
        versions = [
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "created": _iso((v.creation_timestamp or 0) / 1000),
                "run_id": v.run_id,
                "status": v.status,
            }
            for v in found
        ]
        return {"model_name": self.model_name, "aliases": aliases, "versions": versions}

    def _drift(self) -> dict[str, Any]:
        try:
            from pipelines.monitoring.job import recent_reports
        except ImportError:
            return {"windows": [], "features": [], "note": "no drift monitoring in this version"}
        reports = recent_reports(self.store, self.dataset, n=12)
        summary = drift_summary(reports)
        if not reports:
            summary["note"] = "no monitoring window has been reported for this dataset yet"
        return summary

    def _refresh_readings(self) -> None:
        from pipelines import storage

        def read() -> tuple[list[str], list[Any]]:
            partitions = storage.list_partitions(self.store, "bronze", self.dataset)
            chosen, manifests, rows = [], [], 0
            for partition in reversed(partitions):  # newest first, up to max_rows
                manifest = storage.read_manifest(self.store, "bronze", self.dataset, partition)
                if manifest is None:
                    continue
                if chosen and rows + manifest.rows > self.cfg.max_rows:
                    break
                chosen.append(partition)
                manifests.append(manifest)
                rows += manifest.rows
                if rows >= self.cfg.max_rows:
                    break
            return chosen[::-1], manifests[::-1]

        found = self._attempt("lake", read)
        if found is None:
            return
        partitions, manifests = found
        models = tuple((r, m.version) if m else (r, None) for r, m in self.manager.models.items())
        rollout = self.manager.rollout
        fingerprint = (
            tuple((m.partition, m.committed_at, m.rows, m.content_sha256) for m in manifests),
            models,
            getattr(rollout, "rollout_id", None),
            getattr(rollout, "weight", None),
        )
        self._lake = {
            "layer": "bronze",
            "partitions": partitions,
            "rows": sum(m.rows for m in manifests),
            "last_commit": max((m.committed_at for m in manifests), default=None),
            "last_run_id": max(manifests, key=lambda m: m.committed_at).run_id if manifests else None,
        }
        if fingerprint == self._fingerprint:
            return
        frame = self._attempt("readings", lambda: self._score(partitions))
        if frame is not None:
            with self._lock:
                self._frame, self._fingerprint = frame, fingerprint

    def _score(self, partitions: list[str]) -> pd.DataFrame:
        from pipelines import storage
        from pipelines.layers.silver import to_silver
        from pipelines.streaming.scoring import OnlineScorer

        if not partitions:
            return pd.DataFrame(columns=["device", "ts", *self.columns, "score", "threshold", "flagged"])
        raw = pd.concat(
            [storage.read_partition(self.store, "bronze", self.dataset, p).to_pandas() for p in partitions],
            ignore_index=True,
        )
        silver, _ = to_silver(raw, self.contract)
        # every device's windows warm up on what precedes the shown range, as gold's do
        warm = pd.Timedelta(hours=self.cfg.hours) + pd.Timedelta(self.long_window) * 2
        latest = silver.groupby("device")["ts"].transform("max")
        silver = silver[silver["ts"] >= latest - warm].reset_index(drop=True)
        scorer = OnlineScorer(self.contract, self.window, self.long_window, self.manager, self.model_name)
        scored = scorer.score_silver(silver) if self.manager.get("champion") is not None else []
        return recent_window(flag_readings(silver, scored, self.columns), self.cfg.hours)

    def _refresh_live(self) -> None:
        stream = getattr(self.settings, "stream", None)
        url = getattr(stream, "redis_url", None)
        if not url:
            self._slow["live"] = None
            return

        def read() -> dict[str, Any]:
            from pipelines.streaming.state import state_store

            state = state_store(url, self.dataset, stream.secret("redis_password"))
            devices = state.devices()[:200]
            return {d: state.get(d) for d in devices}

        self._slow["live"] = self._attempt("device state", read)

    # -- what the page polls ------------------------------------------------------------------------
    def snapshot(self, column: str | None = None, device: str | None = None, max_devices: int = 12) -> dict[str, Any]:
        """What the page draws: every device's readings when `device` is None (the first
        `max_devices` of them: a fleet of hundreds is browsed one device at a time), or one device's."""
        self._polled = time.monotonic()
        column = column if column in self.columns else self._default_column()
        with self._lock:
            frame = self._frame
        devices = sorted(frame["device"].unique().tolist()) if len(frame) else []
        if device and len(frame):
            frame = frame[frame["device"] == device]
        elif len(devices) > max_devices:
            frame = frame[frame["device"].isin(devices[:max_devices])]
        models = {r: (m.version if m else None) for r, m in self.manager.models.items()}
        scored = bool(len(frame)) and bool((frame["flagged"] >= 0).any())
        return {
            "dataset": self.dataset,
            "loading": self._updated_at is None,  # the first refresh (model download, lake read) runs
            "updated_at": _iso(self._updated_at) if self._updated_at else None,
            "refreshes": self._refreshes,
            "column": column,
            "columns": self.columns,
            "unit": self.units.get(column),
            "devices": devices,
            "series": device_series(frame, column, self.cfg.max_points) if len(frame) else {},
            "scored": scored,
            "threshold": _num(frame["threshold"].max()) if scored else None,
            "alerts": recent_alerts(frame, column, self.cfg.alerts) if len(frame) else [],  # of those shown
            "lake": self._lake,
            "model": {"name": self.model_name, "loaded": models, **(self._slow.get("registry") or {})},
            "canary": canary_summary(self.manager.rollout),
            "drift": self._slow.get("drift"),
            "live": self._slow.get("live"),
            "errors": dict(self._errors),
            "hours": self.cfg.hours,
        }

    def _default_column(self) -> str:
        return "temp" if "temp" in self.columns else (self.columns[0] if self.columns else "")


class Dashboard:
    """Every dataset's view, created on first request (a dataset nobody opens costs nothing)."""

    def __init__(
        self,
        datasets: list[str],
        *,
        settings=None,
        store=None,
        cfg: DashboardConfig | None = None,
        model_names: dict[str, str] | None = None,
    ):
        from pipelines.settings import get_settings

        self.datasets = datasets
        self.settings = settings or get_settings()
        self._store = store
        self.cfg = cfg or DashboardConfig()
        self.model_names = model_names or {}
        self._views: dict[str, DatasetView] = {}
        self._lock = threading.Lock()

    @property
    def store(self):
        if self._store is None:
            from pipelines.storage import ObjectStore

            self._store = ObjectStore(self.settings)
        return self._store

    def view(self, dataset: str) -> DatasetView:
        if dataset not in self.datasets:
            raise KeyError(f"unknown dataset {dataset!r}: the dashboard shows {self.datasets}")
        with self._lock:
            view = self._views.get(dataset)
            if view is None:
                view = self._views[dataset] = DatasetView(
                    dataset,
                    settings=self.settings,
                    store=self.store,
                    cfg=self.cfg,
                    model_name=self.model_names.get(dataset),
                ).start()
            return view

    def stop(self) -> None:
        for view in self._views.values():
            view.stop()
