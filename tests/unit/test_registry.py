"""Registry: first champion, the gate never rewards a worse model, aliases survive concurrent gates."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import registry, training

MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
# no background job runner (it forks ~7 huey consumers): the tests need none of it
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
PARAMS = {"registry": {"primary_metric": "pr_auc", "margin": 0.02, "max_score_ms_per_1k": 5000, "max_model_mb": 50}}
FEATURES = ["temp", "temp_roll_std"]


# --------------------------------------------------------------------------- throwaway MLflow server


@pytest.fixture(scope="module")
def mlflow_uri(settings):
    """The session's real MLflow server (artifacts proxied into the real object store)."""
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # loading our own test models
    return settings.mlflow_tracking_uri


# --------------------------------------------------------------------------- tiny models of known quality


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    anomalous = rng.random(n) < 0.1
    temp = np.where(anomalous, rng.normal(35, 2, n), rng.normal(22, 1, n))
    return pd.DataFrame(
        {
            "device": "dev-0",
            "ts": pd.date_range("2026-01-05", periods=n, freq="1min", tz="UTC"),
            "event_date": "2026-01-05",
            "label": np.where(anomalous, "spike", "normal"),
            "is_anomaly": pd.array(anomalous.astype(int), dtype="Int8"),
            "temp": temp,
            "temp_roll_std": np.where(anomalous, rng.normal(1.5, 0.3, n), rng.normal(0.3, 0.05, n)),
        }
    )


EVAL = _frame(600, seed=1)


def _log_tiny_model(uri: str, quality: str, seed: int = 0) -> training.TrainResult:
    """good: fitted on normal rows (anomalies score high); bad: fitted on anomalies (ranking inverted)."""
    from mlflow.models import infer_signature
    from sklearn.ensemble import IsolationForest
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mlflow

    train = _frame(1000, seed=100)
    rows = train[train["is_anomaly"] == (1 if quality == "bad" else 0)]
    pipe = Pipeline(
        [
            ("impute", SimpleImputer()),
            ("scale", StandardScaler()),
            ("model", IsolationForest(n_estimators=50, random_state=seed)),
        ]
    )
    model = training.AnomalyScorer(pipe).fit(rows[FEATURES])
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-tests")
    with mlflow.start_run() as run:
        threshold = float(np.quantile(model.predict(train[FEATURES]), 0.9))
        mlflow.log_metric("decision_threshold", threshold)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(train[FEATURES], model.predict(train[FEATURES])),
            serialization_format="skops",
            skops_trusted_types=training.SKOPS_TRUSTED_TYPES,
            pip_requirements=["scikit-learn", "skops"],
        )
    lab = training.labelled(EVAL)
    metrics = training.evaluate(
        model.predict(lab[FEATURES]), lab["is_anomaly"].astype(int).to_numpy(), lab["label"], threshold
    )
    return training.TrainResult(
        run_id=run.info.run_id,
        model_uri=info.model_uri,
        model_family="isolation_forest",
        metrics=metrics,
        baseline_metrics={},
        threshold=threshold,
        candidate_metrics={},
        feature_columns=FEATURES,
        experiment_id=run.info.experiment_id,
        train_rows=len(rows),
        test_rows=len(EVAL),
        training_partitions=["2026-01-05"],
        model_id=info.model_id,
    )


def _register(uri: str, name: str, quality: str, seed: int = 0) -> str:
    return str(registry.register_version(_log_tiny_model(uri, quality, seed), name, tracking_uri=uri).version)


# --------------------------------------------------------------------------- the pure rule


@settings(max_examples=300, deadline=None)
@given(
    challenger=st.floats(0, 1),
    champion=st.one_of(st.none(), st.floats(0, 1)),
    margin=st.floats(0, 0.2),
    ms_ok=st.booleans(),
    mb_ok=st.booleans(),
)
def test_decide_never_passes_a_worse_challenger(challenger, champion, margin, ms_ok, mb_ok):
    guardrails = {
        "score_ms_per_1k": {"value": 1, "limit": 2, "passed": ms_ok},
        "model_mb": {"value": 1, "limit": 2, "passed": mb_ok},
    }
    passed, reason = registry.decide(challenger, champion, margin, guardrails)
    if not (ms_ok and mb_ok):
        assert not passed and "guardrail" in reason
    elif champion is None:
        assert passed
    else:
        assert passed == (challenger >= champion - margin)
        if challenger < champion - margin:
            assert not passed


def test_decide_nan_never_passes():
    ok = {"g": {"passed": True}}
    assert not registry.decide(float("nan"), 0.5, 0.02, ok)[0]
    assert not registry.decide(0.9, float("nan"), 0.02, ok)[0]


# --------------------------------------------------------------------------- end to end


def test_first_version_becomes_champion_then_gate_and_promote(mlflow_uri):
    from mlflow import MlflowClient

    name = "e2e-lifecycle"
    v1 = _register(mlflow_uri, name, "good", seed=0)
    d1 = registry.offline_gate(name, v1, EVAL, PARAMS, tracking_uri=mlflow_uri, progress=lambda s: None)
    assert d1.passed and d1.new_aliases == {"champion": v1} and d1.champion_metric is None
    assert registry.describe_aliases(name, tracking_uri=mlflow_uri) == {"champion": v1}

    v2 = _register(mlflow_uri, name, "bad", seed=1)
    d2 = registry.offline_gate(name, v2, EVAL, PARAMS, tracking_uri=mlflow_uri, progress=lambda s: None)
    assert not d2.passed and d2.new_aliases == {}
    assert d2.challenger_metric < d2.champion_metric - d2.margin
    assert registry.describe_aliases(name, tracking_uri=mlflow_uri) == {"champion": v1}

    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    tags = client.get_model_version(name, v2).tags
    assert tags["gate.passed"] == "false" and float(tags["gate.champion_pr_auc"]) == pytest.approx(d2.champion_metric)
    assert client.get_run(tags["run_id"]).data.tags["gate.passed"] == "false"
    with pytest.raises(ValueError, match="not passed the offline gate"):
        registry.promote(name, v2, tracking_uri=mlflow_uri)

    v3 = _register(mlflow_uri, name, "good", seed=2)
    d3 = registry.offline_gate(name, v3, EVAL, PARAMS, tracking_uri=mlflow_uri, progress=lambda s: None)
    assert d3.passed and d3.new_aliases == {"challenger": v3}

    assert registry.promote(name, v3, tracking_uri=mlflow_uri, actor="canary", reason="canary ok") == {
        "champion": v3,
        "previous": v1,
    }
    assert client.get_model_version(name, v3).tags["promoted.by"] == "canary"
    assert registry.rollback(name, tracking_uri=mlflow_uri, actor="oncall", reason="alert") == {"champion": v1}
    assert client.get_model_version(name, v3).tags["rolled_back.reason"] == "alert"


def test_guardrail_blocks_even_a_better_model(mlflow_uri):
    name = "e2e-guardrail"
    v1 = _register(mlflow_uri, name, "good", seed=0)
    registry.offline_gate(name, v1, EVAL, PARAMS, tracking_uri=mlflow_uri, progress=lambda s: None)
    v2 = _register(mlflow_uri, name, "good", seed=3)
    tight = {"registry": {**PARAMS["registry"], "max_model_mb": 1e-6}}
    d = registry.offline_gate(name, v2, EVAL, tight, tracking_uri=mlflow_uri, progress=lambda s: None)
    assert not d.passed and not d.guardrails["model_mb"]["passed"]
    assert registry.describe_aliases(name, tracking_uri=mlflow_uri) == {"champion": v1}


def _gate_process(name: str, version: str, mlflow_uri: str, results) -> None:
    try:
        decision = registry.offline_gate(name, version, EVAL, PARAMS, tracking_uri=mlflow_uri, progress=lambda s: None)
        results.put(("ok", version, decision.passed))
    except BaseException as exc:  # reported to the parent
        results.put(("error", version, repr(exc)))


def test_concurrent_gates_never_leave_alias_on_loser(mlflow_uri):
    from mlflow import MlflowClient

    name = "e2e-concurrent"
    champion = _register(mlflow_uri, name, "good", seed=0)
    registry.offline_gate(name, champion, EVAL, PARAMS, tracking_uri=mlflow_uri, progress=lambda s: None)
    bad = _register(mlflow_uri, name, "bad", seed=4)
    good = _register(mlflow_uri, name, "good", seed=5)

    # Two processes, as two Airflow gate tasks are (threads would also trip CPython 3.11.7's
    # thread-unsafe AST construction, gh-106905, inside the libraries a gate imports).
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers = [ctx.Process(target=_gate_process, args=(name, v, mlflow_uri, results)) for v in (bad, good)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    errors = [o for o in outcomes if o[0] == "error"]
    assert not errors, errors
    decisions = {version: passed for _, version, passed in outcomes}
    assert [w.exitcode for w in workers] == [0, 0]
    assert not decisions[bad] and decisions[good], decisions

    aliases = registry.describe_aliases(name, tracking_uri=mlflow_uri)
    assert aliases == {"champion": champion, "challenger": good}, (aliases, decisions)
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    for alias, version in aliases.items():
        assert client.get_model_version(name, version).tags["gate.passed"] == "true", alias
    assert registry.LEASE_TAG not in (client.get_registered_model(name).tags or {})


def test_set_alias_safely_is_compare_and_set(mlflow_uri):
    from mlflow import MlflowClient

    name = "e2e-cas"
    v1 = _register(mlflow_uri, name, "good", seed=0)
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    assert registry.set_alias_safely(client, name, "challenger", v1, expected_current=None)
    assert not registry.set_alias_safely(client, name, "challenger", v1, expected_current=None)
    assert registry.set_alias_safely(client, name, "challenger", v1, expected_current=v1)
