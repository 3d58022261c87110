"""Models by alias: load ``champion`` and ``challenger`` from the registry, poll for alias changes,
load a new version in the background and swap it in atomically (one reference assignment), so no
request is dropped. The rollout state (weight, shadow) is polled from the lake the same way. When
MLflow or the object store is unreachable the loaded models keep serving and health reports degraded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("pipelines.serving")
ROLES = ("champion", "challenger")


@dataclass
class LoadedModel:
    role: str
    version: str
    columns: list[str]
    threshold: float
    estimator: Any  # the raw AnomalyScorer when available (skips pyfunc per-call schema work), else pyfunc
    loaded_at: float = field(default_factory=time.time)

    def predict(self, records: list[dict]) -> np.ndarray:
        cols = self.columns
        matrix = np.array([[r.get(c) for c in cols] for r in records], dtype=np.float64)
        frame = pd.DataFrame(matrix, columns=cols)
        return np.asarray(self.estimator.predict(frame), dtype=np.float64).ravel()


def load_version(client, model_name: str, role: str, version: str, tracking_uri: str) -> LoadedModel:
    """Download and load ``models:/name/version``; our own registry's models are trusted (skops)."""
    import tempfile

    import mlflow
    from pipelines.registry import _trusted_loading

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}",
            dst_path=tmp,
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
        with _trusted_loading(True):
            pyfunc = mlflow.pyfunc.load_model(local)
    schema = pyfunc.metadata.get_input_schema()
    if schema is None:
        raise ValueError(f"{model_name} v{version} has no signature: cannot validate requests; re-log it")
    estimator: Any = pyfunc
    try:
        from sklearn.base import BaseEstimator

        raw = pyfunc.get_raw_model()
        if isinstance(raw, BaseEstimator):  # sklearn flavour: call it directly, we validate inputs ourselves
            estimator = raw
    except Exception:  # noqa: BLE001 - other flavours go through pyfunc predict
        pass
    mv = client.get_model_version(model_name, version)
    threshold = float("inf")
    if mv.tags.get("decision_threshold"):
        threshold = float(mv.tags["decision_threshold"])
    elif mv.run_id:
        threshold = float(client.get_run(mv.run_id).data.metrics.get("decision_threshold", threshold))
    return LoadedModel(role, str(version), list(schema.input_names()), threshold, estimator)


class ModelManager:
    """Holds the loaded models and the rollout state; a daemon thread keeps both current."""

    def __init__(self, settings, model_name: str, poll_seconds: float, store=None):
        self.settings = settings
        self.model_name = model_name
        self.poll_seconds = poll_seconds
        self.store = store
        self.models: dict[str, LoadedModel | None] = {role: None for role in ROLES}
        self.rollout = None  # canary.state.RolloutState
        self.problems: dict[str, str] = {}
        self.last_poll: float = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    # -- reads (lock-free: each is one reference) ----------------------------------------------
    def get(self, role: str) -> LoadedModel | None:
        return self.models[role]

    def feature_columns(self) -> list[str]:
        cols: list[str] = []
        for m in self.models.values():
            for c in m.columns if m else []:
                if c not in cols:
                    cols.append(c)
        return cols

    # -- the poller --------------------------------------------------------------------------
    def start(self) -> None:
        self.poll_once()
        self._thread = threading.Thread(target=self._loop, name="registry-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def reload_now(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if not self._stop.is_set():
                self.poll_once()

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            uri = self.settings.mlflow_tracking_uri
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def poll_once(self) -> None:
        self.last_poll = time.time()
        self._poll_registry()
        self._poll_rollout()

    def _poll_registry(self) -> None:
        try:
            client = self._mlflow()
            aliases = client.get_registered_model(self.model_name).aliases or {}
            for role in ROLES:
                wanted = aliases.get(role)
                current = self.models[role]
                if wanted is None:
                    if current is not None:
                        log.info("alias %s removed: unloading v%s", role, current.version)
                    self.models[role] = None
                elif current is None or current.version != str(wanted):
                    loaded = load_version(
                        client, self.model_name, role, str(wanted), self.settings.mlflow_tracking_uri
                    )
                    self.models[role] = loaded  # the atomic swap: in-flight batches keep the old object
                    log.info("%s now v%s (was %s)", role, loaded.version, current and current.version)
            self.problems.pop("mlflow", None)
        except Exception as exc:  # noqa: BLE001 - keep serving what is loaded
            self.problems["mlflow"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("registry poll failed, serving loaded models: %s", self.problems["mlflow"])

    def _poll_rollout(self) -> None:
        if self.store is None:
            return
        try:
            from pipelines.canary.state import read_state

            self.rollout = read_state(self.store)
            self.problems.pop("rollout_state", None)
        except Exception as exc:  # noqa: BLE001 - keep the last known weights
            self.problems["rollout_state"] = f"{type(exc).__name__}: {str(exc)[:300]}"
