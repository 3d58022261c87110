"""Models by alias: load ``champion`` and ``challenger`` from the registry, poll for alias changes,
load a new version in the background and swap it in atomically (one reference assignment), so no
request is dropped. The rollout state (weight, shadow) is polled from the lake the same way. When
MLflow or the object store is unreachable the loaded models keep serving and health reports degraded.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.serving.fastpath import FastScorer, compile_scorer

log = logging.getLogger("pipelines.serving")
ROLES = ("champion", "challenger")


@dataclass
class LoadedModel:
    role: str
    version: str
    columns: list[str]
    threshold: float
    estimator: Any  # the skops-loaded estimator (e.g. an AnomalyScorer), called without pyfunc
    loaded_at: float = field(default_factory=time.time)
    fast: FastScorer | None = None  # equal to the estimator's predict, checked at load (fastpath.py)

    def runs_inline(self, rows: int) -> bool:
        """A batch the fast scorer takes in well under a millisecond a row: scored on the event loop,
        with no thread hand-off (and its wait for the GIL) in the way."""
        return self.fast is not None and rows <= self.fast.max_rows

    def predict(self, records: list[dict]) -> np.ndarray:
        cols = self.columns
        matrix = np.array([[r.get(c) for c in cols] for r in records], dtype=np.float64)
        if self.runs_inline(len(records)):
            return self.fast.score(matrix)  # type: ignore[union-attr]
        frame = pd.DataFrame(matrix, columns=cols)
        return np.asarray(self.estimator.predict(frame), dtype=np.float64).ravel()


class UntrustedModelError(ValueError):
    """A registry version the platform refuses to load: not skops, or skops naming unreviewed types."""


def trusted_skops_types() -> list[str]:
    """The one list of types a registry model may contain beyond skops' own safe defaults.

    Read at call time from ``pipelines.training.SKOPS_TRUSTED_TYPES`` (the list training checks before
    it logs a model), so a model family added there (e.g. the detectors in ``pipelines.detectors``)
    is loadable without a second list here. The trusted list in a model's own MLmodel file is never
    used: whoever can write the registry could name any type in it."""
    from pipelines import training

    return list(training.SKOPS_TRUSTED_TYPES)


def load_skops_model(local_dir: str, model_name: str, version: str) -> tuple[Any, Any]:
    """Load a downloaded MLflow model directory with skops only; return (estimator, mlflow Model).

    No pickle, cloudpickle or pyfunc loader ever runs: the sklearn flavour must say
    ``serialization_format: skops``, and skops loads the file with our trusted types only. Anything
    else raises UntrustedModelError naming the version and what to do."""
    import os

    import skops.io
    from mlflow.models import Model

    label = f"{model_name} v{version}"
    mlmodel = Model.load(local_dir)
    flavor = mlmodel.flavors.get("sklearn")
    if flavor is None:
        raise UntrustedModelError(
            f"{label} is refused: it has no sklearn flavour (flavours: {sorted(mlmodel.flavors)}); only "
            "skops-serialised scikit-learn models are loaded. Re-log it with "
            "mlflow.sklearn.log_model(..., serialization_format='skops')."
        )
    fmt = flavor.get("serialization_format", "pickle")
    if fmt != "skops":
        raise UntrustedModelError(
            f"{label} is refused: its artifact is serialised with {fmt!r}, which can run arbitrary code "
            "when loaded; only the skops format is loaded. Re-log it with "
            "mlflow.sklearn.log_model(..., serialization_format='skops', "
            "skops_trusted_types=pipelines.training.SKOPS_TRUSTED_TYPES)."
        )
    path = os.path.join(local_dir, flavor.get("pickled_model", "model.skops"))
    if not os.path.realpath(path).startswith(os.path.realpath(local_dir) + os.sep) or not os.path.isfile(path):
        raise UntrustedModelError(f"{label} is refused: its model file {flavor.get('pickled_model')!r} is missing")
    trusted = trusted_skops_types()
    unknown = sorted(set(skops.io.get_untrusted_types(file=path)) - set(trusted))
    if unknown:
        raise UntrustedModelError(
            f"{label} is refused: its skops file needs types that are not trusted: {unknown}. If they are "
            "the platform's own, review them and add them to pipelines.training.SKOPS_TRUSTED_TYPES."
        )
    return skops.io.load(path, trusted=trusted), mlmodel


def fetch_skops_model(model_name: str, version: str, tracking_uri: str) -> tuple[Any, Any, float]:
    """(estimator, mlflow Model, size in MB) of ``models:/name/version``: downloaded to a temporary
    directory and loaded with skops only (see load_skops_model). The one loader of registered models:
    the scoring service, the offline gate and the image gate all call it."""
    import os
    import tempfile

    import mlflow

    # a download is a log line of ours, not MLflow's progress bar (in the live scorer's and the gates'
    # output as in the scoring service's)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}",
            dst_path=tmp,
            tracking_uri=tracking_uri,
            registry_uri=tracking_uri,
        )
        size_mb = sum(p.stat().st_size for p in Path(local).rglob("*") if p.is_file()) / 1e6
        raw, mlmodel = load_skops_model(local, model_name, str(version))
    return raw, mlmodel, size_mb


def load_version(client, model_name: str, role: str, version: str, tracking_uri: str) -> LoadedModel:
    """Download and load ``models:/name/version`` (skops only, see load_skops_model)."""
    raw, mlmodel, _ = fetch_skops_model(model_name, version, tracking_uri)
    schema = mlmodel.get_input_schema()
    if schema is None:
        raise ValueError(f"{model_name} v{version} has no signature: cannot validate requests; re-log it")
    if not callable(getattr(raw, "predict", None)):
        raise UntrustedModelError(f"{model_name} v{version} is refused: its model has no predict method")
    estimator: Any = raw  # called directly: we validate inputs ourselves
    mv = client.get_model_version(model_name, version)
    threshold = float("inf")
    if mv.tags.get("decision_threshold"):
        threshold = float(mv.tags["decision_threshold"])
    elif mv.run_id:
        threshold = float(client.get_run(mv.run_id).data.metrics.get("decision_threshold", threshold))
    columns = list(schema.input_names())
    fast = compile_scorer(estimator, columns)
    log.info(
        "%s v%s: %s",
        model_name,
        version,
        f"fast scorer for batches up to {fast.max_rows} rows" if fast else "scored by its own predict",
    )
    return LoadedModel(role, str(version), columns, threshold, estimator, fast=fast)


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
        self._columns: tuple[tuple[LoadedModel | None, ...], list[str]] = ((), [])

    # -- reads (lock-free: each is one reference) ----------------------------------------------
    def get(self, role: str) -> LoadedModel | None:
        return self.models[role]

    def feature_columns(self) -> list[str]:
        """The union of the loaded models' columns: the same list object until a model changes."""
        loaded = tuple(self.models.values())
        cached, cols = self._columns
        if len(cached) != len(loaded) or any(a is not b for a, b in zip(cached, loaded, strict=True)):
            cols = []
            for m in loaded:
                for c in m.columns if m else []:
                    if c not in cols:
                        cols.append(c)
            self._columns = (loaded, cols)
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
            import mlflow
            from mlflow import MlflowClient

            uri = self.settings.mlflow_tracking_uri
            # download_artifacts resolves a version's logged model through the process-wide URI
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
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
                    loaded = load_version(client, self.model_name, role, str(wanted), self.settings.mlflow_tracking_uri)
                    self.models[role] = loaded  # the atomic swap: in-flight batches keep the old object
                    gc.freeze()  # the new model's objects join the heap the collector leaves alone (app.py)
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

            self.rollout = read_state(self.store, self.model_name)
            self.problems.pop("rollout_state", None)
        except Exception as exc:  # noqa: BLE001 - keep the last known weights
            self.problems["rollout_state"] = f"{type(exc).__name__}: {str(exc)[:300]}"
