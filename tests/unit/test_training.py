"""Training: time split, determinism, baseline comparison, and what one MLflow run holds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import training

REPO = Path(__file__).resolve().parents[2]
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
# no background job runner (it forks ~7 huey consumers): the tests need none of it
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

PARAMS = {
    "train": {
        "seed": 42,
        "test_fraction": 0.3,
        "families": ["isolation_forest", "hist_gradient_boosting"],
        "isolation_forest": {"n_estimators": 50, "contamination": 0.05},
        "hist_gradient_boosting": {"max_iter": 50},
        "threshold_rule": {"temp_above": 32.0},
    }
}


# --------------------------------------------------------------------------- synthetic gold


def make_gold(devices: int = 3, days: int = 2, seed: int = 7, freq: str = "1min") -> pd.DataFrame:
    """Per-minute readings with labelled injected faults and simply computed rolling features."""
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2026-01-05", periods=days * 24 * 60, freq=freq, tz="UTC")
    frames = []
    for d in range(devices):
        n = len(ts)
        hours = ts.hour.to_numpy() + ts.minute.to_numpy() / 60
        temp = 22 + 3 * np.sin(2 * np.pi * hours / 24) + rng.normal(0, 0.2, n)
        hum = 45 + 5 * np.cos(2 * np.pi * hours / 24) + rng.normal(0, 0.5, n)
        label = np.array(["normal"] * n, dtype=object)
        # faults spread over the whole range so train and test both have each kind
        starts = np.linspace(60, n - 200, 24).astype(int) + rng.integers(0, 40, 24)
        for i, start in enumerate(starts):
            kind = ["spike", "stuck", "drift", "dropout"][(i + d) % 4]
            if kind == "spike":
                temp[start] += rng.uniform(12, 18)
                label[start] = "spike"
            elif kind == "stuck":
                temp[start : start + 20] = temp[start]
                label[start : start + 20] = "stuck"
            elif kind == "drift":
                temp[start : start + 45] += np.linspace(5, 12, 45)
                label[start : start + 45] = "drift"
            else:
                temp[start : start + 10] = np.nan
                label[start : start + 10] = "dropout"
        label[rng.random(n) < 0.05] = None  # some rows unlabelled
        frames.append(pd.DataFrame({"device": f"dev-{d}", "ts": ts, "temp": temp, "humidity": hum, "label": label}))
    df = pd.concat(frames, ignore_index=True)
    df["event_date"] = df["ts"].dt.strftime("%Y-%m-%d")
    df["label"] = df["label"].astype("str").where(df["label"].notna(), None)
    df["is_anomaly"] = pd.array(
        [pd.NA if lab is None or pd.isna(lab) else int(lab != "normal") for lab in df["label"]], dtype="Int8"
    )
    g = df.groupby("device", sort=False)
    for col in ("temp", "humidity"):
        roll = g[col].rolling(15, min_periods=1)
        df[f"{col}_roll_mean"] = roll.mean().reset_index(level=0, drop=True)
        df[f"{col}_roll_std"] = roll.std().reset_index(level=0, drop=True)
        df[f"{col}_roll_min"] = roll.min().reset_index(level=0, drop=True)
        df[f"{col}_roll_max"] = roll.max().reset_index(level=0, drop=True)
        df[f"{col}_delta"] = g[col].diff()
        df[f"{col}_zscore"] = (df[col] - df[f"{col}_roll_mean"]) / df[f"{col}_roll_std"].replace(0, np.nan)
    hours = df["ts"].dt.hour + df["ts"].dt.minute / 60
    df["hour_sin"] = np.sin(2 * np.pi * hours / 24)
    df["hour_cos"] = np.cos(2 * np.pi * hours / 24)
    df["temp_missing"] = df["temp"].isna().astype("float64")
    return df


GX_BY_PARTITION = {  # the shape jobs/model.py passes: {partition: GateResult.to_dict()}
    "2026-01-05": {
        "partition": "2026-01-05",
        "success": True,
        "outcomes": [],
        "statistics": {
            "evaluated_expectations": 12,
            "unsuccessful_expectations": 0,
            "success_percent": 100.0,
        },
    },
    "2026-01-06": {
        "partition": "2026-01-06",
        "success": False,
        "outcomes": [{"success": False, "severity": "critical", "column": "temp"}],
        "statistics": {
            "evaluated_expectations": 12,
            "unsuccessful_expectations": 1,
            "success_percent": 91.66666,
        },
    },
}


# --------------------------------------------------------------------------- throwaway MLflow server


@pytest.fixture(scope="module")
def mlflow_uri(settings):
    """The session's real MLflow server (artifacts proxied into the real object store)."""
    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # loading our own test models
    return settings.mlflow_tracking_uri


# --------------------------------------------------------------------------- pure tests


@pytest.fixture(scope="module")
def gold():
    return make_gold()


def test_time_split_has_no_overlap(gold):
    train, test = training.split_by_time(gold, 0.3)
    assert train["ts"].max() < test["ts"].min()
    assert len(train) + len(test) == len(gold)
    assert 0.25 < len(test) / len(gold) < 0.35
    fit, val = training.split_by_time(train, 0.2)
    assert fit["ts"].max() < val["ts"].min()


def test_split_rejects_bad_fraction(gold):
    with pytest.raises(ValueError, match="test_fraction"):
        training.split_by_time(gold, 1.0)


def test_scores_higher_for_anomalies(gold):
    train, test = training.split_by_time(gold, 0.3)
    models = training.fit_candidates(train, PARAMS)
    assert set(models) == {"isolation_forest", "hist_gradient_boosting"}
    assert models["isolation_forest"].columns == [
        c for c in training.feature_columns(gold) if c.endswith(training.DEVIATION_SUFFIXES)
    ]
    lab = training.labelled(test)
    feats = training.feature_columns(gold)
    y = lab["is_anomaly"].astype(int).to_numpy()
    for model in models.values():
        s = training.anomaly_scores(model, lab[feats])
        assert s[y == 1].mean() > s[y == 0].mean()


def test_evaluate_and_rule():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3])
    y = np.array([0, 0, 1, 1, 0])
    m = training.evaluate(scores, y, np.array(["normal", "normal", "spike", "drift", "normal"]), 0.5)
    assert m["precision"] == m["recall"] == m["f1"] == m["pr_auc"] == 1.0
    assert m["recall_spike"] == 1.0 and m["recall_drift"] == 1.0
    df = pd.DataFrame({"temp": [20.0, np.nan, 40.0], "is_anomaly": [0, 1, 1], "label": ["normal", "dropout", "spike"]})
    s, pred = training.threshold_rule_scores(df, 32.0)
    assert pred.tolist() == [0, 0, 1]
    assert training.threshold_rule_metrics(df, 32.0)["recall_dropout"] == 0.0


def test_supervised_family_needs_labelled_anomalies(gold):
    unlabelled = gold.assign(is_anomaly=pd.array([pd.NA] * len(gold), dtype="Int8"))
    models = training.fit_candidates(unlabelled, PARAMS)
    assert set(models) == {"isolation_forest"}


def test_gx_summary_metrics_single_and_by_partition():
    assert training.gx_summary_metrics(None) == {}
    m = training.gx_summary_metrics(GX_BY_PARTITION)
    assert m["gx_gold_partitions"] == 2 and m["gx_gold_partitions_passed"] == 1
    single = training.gx_summary_metrics(GX_BY_PARTITION["2026-01-05"])
    assert single["gx_gold_partitions"] == 1 and single["gx_gold_failed"] == 0


def test_label_from_windows_and_window_metrics():
    ts = pd.Series(pd.date_range("2026-01-05", periods=10, freq="h", tz="UTC"))
    df = pd.DataFrame({"ts": ts, "temp": np.arange(10.0)})
    windows = [("2026-01-05 02:00:00", "2026-01-05 03:00:00"), ("2026-01-05 07:00:00", "2026-01-05 08:00:00")]
    out = training.label_from_windows(df, windows)
    assert out["is_anomaly"].tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1, 0]
    assert set(out["label"]) == {"normal", "anomaly"}
    alarm = np.zeros(10, dtype=bool)
    alarm[[3, 5]] = True  # one window hit (1 h before its end), one false alarm
    m = training.window_metrics(ts, alarm, windows)
    assert m["windows"] == 2 and m["windows_detected"] == 1 and m["false_alarm_episodes"] == 1
    assert m["window_lead_hours_mean"] == 0.0 and m["window_recall"] == 0.5
    with pytest.raises(ValueError, match="ends before"):
        training.label_from_windows(df, [("2026-01-05 03:00", "2026-01-05 01:00")])


def test_fit_threshold_rule_uses_training_labels():
    df = pd.DataFrame({"temp": [20.0, 21, 35, 36, 22], "is_anomaly": [0, 0, 1, 1, 0], "label": ["normal"] * 5})
    t = training.fit_threshold_rule(df)
    assert 22 <= t < 35
    assert training.threshold_rule_metrics(df, t)["f1"] == 1.0


def test_choose_threshold_uses_train_labels_only():
    scores = np.array([0.1, 0.2, 0.3, 0.9, 1.0])
    assert training.choose_threshold(scores, np.array([0, 0, 0, 1, 1])) == 0.9
    assert training.choose_threshold(scores, None, 0.2) == pytest.approx(np.quantile(scores, 0.8))


# --------------------------------------------------------------------------- the MLflow run


@pytest.fixture(scope="module")
def two_runs(gold, mlflow_uri):
    ctx = training.TrainingContext(
        dataset_name="gold-test",
        data_snapshot={"partitions": sorted(gold["event_date"].unique().tolist()), "content_hash": "abc123"},
        git_commit="deadbeef",
        dvc_lock_digest="md5:0123",
        gx_summary=GX_BY_PARTITION,
        airflow_dag_id="train_dag",
        airflow_run_id="manual__1",
    )
    lines: list[str] = []
    r1 = training.train_and_log(gold, PARAMS, ctx, tracking_uri=mlflow_uri, experiment="t", progress=lines.append)
    r2 = training.train_and_log(gold, PARAMS, ctx, tracking_uri=mlflow_uri, experiment="t", progress=lines.append)
    return r1, r2, lines


def test_metrics_are_deterministic(two_runs):
    r1, r2, _ = two_runs
    assert r1.run_id != r2.run_id
    assert r1.model_family == r2.model_family
    assert r1.threshold == r2.threshold
    assert json.dumps(r1.metrics, sort_keys=True) == json.dumps(r2.metrics, sort_keys=True)
    assert r1.candidate_metrics == r2.candidate_metrics


def test_model_reported_beside_baseline(two_runs):
    r1, _, lines = two_runs
    assert {"precision", "recall", "f1", "pr_auc"} <= set(r1.metrics)
    assert {"precision", "recall", "f1", "pr_auc"} <= set(r1.baseline_metrics)
    # the rule at 32 C misses drifts, stuck sensors and dropouts: the model must beat it on F1
    assert r1.metrics["f1"] > r1.baseline_metrics["f1"]
    assert r1.metrics["recall_dropout"] > r1.baseline_metrics["recall_dropout"]
    assert any("baseline rule" in line for line in lines)


def test_run_contents(two_runs, mlflow_uri, tmp_path):
    from matplotlib.image import imread

    import mlflow
    from mlflow import MlflowClient

    r1, _, _ = two_runs
    client = MlflowClient(mlflow_uri)
    run = client.get_run(r1.run_id)
    assert run.data.params["train.isolation_forest.n_estimators"] == "50"
    assert run.data.params["model_family"] == r1.model_family
    m = run.data.metrics
    for key in (
        "pr_auc",
        "f1",
        "baseline_threshold_pr_auc",
        "cand_isolation_forest_pr_auc",
        "cand_hist_gradient_boosting_pr_auc",
        "gx_gold_evaluated",
        "gx_gold_success_percent_min",
        "recall_spike",
        "recall_drift",
    ):
        assert key in m, key
    tags = run.data.tags
    assert tags["git_commit"] == "deadbeef" and tags["dvc_lock_digest"] == "md5:0123"
    assert tags["airflow_dag_id"] == "train_dag" and tags["airflow_run_id"] == "manual__1"
    assert json.loads(tags["gold_snapshot"])["content_hash"] == "abc123"
    assert tags["training_partitions"].startswith("2026-01-05")
    assert "success=False" in tags["gx_summary"] and "partitions_passed=1/2" in tags["gx_summary"]
    assert m["gx_gold_evaluated"] == 24 and m["gx_gold_failed"] == 1 and m["gx_gold_critical_failed"] == 1
    assert m["gx_gold_success_percent_min"] == pytest.approx(100 * 11 / 12)

    # inputs with digests
    contexts = {}
    for ds_input in run.inputs.dataset_inputs:
        ctx = {t.key: t.value for t in ds_input.tags}["mlflow.data.context"]
        contexts[ctx] = ds_input.dataset.digest
    assert set(contexts) == {"training", "evaluation"} and all(contexts.values())

    # plots are real PNGs; lineage artifacts present
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=r1.run_id, artifact_path="", tracking_uri=mlflow_uri, dst_path=str(tmp_path)
        )
    )
    for name in ("readings_over_time", "pr_curve", "confusion_matrix"):
        img = imread(local / "plots" / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 100
    assert (local / "lineage" / "gold_snapshot.json").exists()
    assert (local / "lineage" / "gx_result.json").exists()
    # the monitoring reference: every feature, the score and the alarm flag of the held-out rows
    from pipelines.monitoring.drift import ReferenceProfile

    profile = ReferenceProfile.from_json((local / "monitoring" / "reference_profile.json").read_text())
    assert {"score", "flagged", *r1.feature_columns} <= set(profile.features)

    # model: skops, signature, pyfunc predicts anomaly scores
    pyfunc = mlflow.pyfunc.load_model(r1.model_uri)
    assert pyfunc.metadata.signature is not None
    assert pyfunc.metadata.get_input_schema().input_names() == r1.feature_columns
    flavor = pyfunc.metadata.flavors["sklearn"]
    assert flavor["serialization_format"] == "skops"
    assert "pipelines.training.AnomalyScorer" in flavor["skops_trusted_types"]
    gold = make_gold()
    _, test = training.split_by_time(gold, 0.3)
    lab = training.labelled(test)
    s = np.asarray(pyfunc.predict(lab[r1.feature_columns]))
    y = lab["is_anomaly"].astype(int).to_numpy()
    assert s[y == 1].mean() > s[y == 0].mean()


def test_streaming_scorer_continues_each_device_stream_and_round_trips_through_skops():
    """The registered streaming model: scoring the rows after training equals scoring the whole stream
    online, per device, whatever the row order; its skops file needs only the platform's own type."""
    import skops.io

    from pipelines.detectors import DEFAULT_DETECTOR, DETECTORS

    rng = np.random.default_rng(3)
    n = 1200
    ts = pd.date_range("2026-01-01", periods=n, freq="5min", tz="UTC")
    a = 10 + np.sin(np.arange(n) / 20) + rng.normal(0, 0.1, n)
    b = 50 + rng.normal(0, 1.0, n)
    b[1000] = 90.0
    frame = pd.concat(
        [pd.DataFrame({"device": "a", "ts": ts, "value": a}), pd.DataFrame({"device": "b", "ts": ts, "value": b})],
        ignore_index=True,
    )
    train = frame[frame["ts"] < ts[900]]
    later = frame[frame["ts"] >= ts[900]].sample(frac=1.0, random_state=1)  # any row order
    model = training.StreamingScorer(DEFAULT_DETECTOR, readings=["value"]).fit(train)
    scores = pd.Series(model.predict(later), index=later.index)
    for device, values in (("a", a), ("b", b)):
        online = DETECTORS[DEFAULT_DETECTOR]().score_series(None, values)
        rows = later[later["device"] == device].sort_values("ts")
        np.testing.assert_array_equal(scores[rows.index].to_numpy(), online[900:])
    assert scores.max() > 0.5  # the spike of device b is seen
    data = skops.io.dumps(model)
    assert set(skops.io.get_untrusted_types(data=data)) <= set(training.SKOPS_TRUSTED_TYPES)
    again = skops.io.loads(data, trusted=training.SKOPS_TRUSTED_TYPES)
    np.testing.assert_array_equal(again.predict(later), scores.to_numpy())


def test_a_fleet_s_streams_step_on_two_threads_with_the_scores_of_one_stream_at_a_time(monkeypatch):
    """A live pass steps hundreds of (device, reading) states: `continue_streams` hands them to the
    compiled detector in one call, which releases the GIL and runs them as two halves at once. Each
    state is its own, so the scores are exactly those of stepping each series alone, including a
    device with a gap and a device first seen after training (both stepped one by one: the gap's NaNs
    and the warm-up are not the batch's fast path)."""
    from pipelines.detectors import DEFAULT_DETECTOR, DETECTORS, _contextual_jit

    rng = np.random.default_rng(5)
    n, cut, devices = 1000, 800, 40
    ts = pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC")
    series = {}
    for d in range(devices):
        phase = rng.uniform(0, 6)
        x = 20 + 3 * np.sin(np.arange(n) / 40 + phase) + rng.normal(0, 0.2, n)
        y = np.cumsum(rng.normal(0, 0.5, n)) + 100 * (d % 3)
        x[cut + 50 + d] += 15  # a spike after training, a different row per device
        if d == 7:
            y[cut + 20 : cut + 25] = np.nan  # a gap: not the fast path
        series[f"dev-{d:02d}"] = (x, y)
    frame = pd.concat(
        [pd.DataFrame({"device": k, "ts": ts, "x": x, "y": y}) for k, (x, y) in series.items()], ignore_index=True
    )
    train = frame[(frame["ts"] < ts[cut]) & (frame["device"] != "dev-39")]  # dev-39: first seen live
    later = frame[frame["ts"] >= ts[cut]].sort_values(["ts", "device"])  # as a stream delivers them
    model = training.StreamingScorer(DEFAULT_DETECTOR, readings=["x", "y"]).fit(train)
    states = model.training_states()
    from concurrent.futures import ThreadPoolExecutor

    class Counted(ThreadPoolExecutor):
        halves = 0

        def submit(self, *args, **kwargs):
            Counted.halves += 1
            return super().submit(*args, **kwargs)

    pool = Counted(1)
    monkeypatch.setattr(_contextual_jit, "_step_pool", lambda: pool)
    passes = range(0, len(later), 400)
    scores = np.concatenate([model.continue_streams(states, later.iloc[i : i + 400]) for i in passes])
    pool.shutdown()
    assert Counted.halves == len(passes), "every pass (80 states) stepped half its states on the worker thread"
    got = pd.Series(scores, index=later.index)
    for device, (x, y) in series.items():
        expected = np.zeros(n - cut)
        for v in (x, y):
            detector = DETECTORS[DEFAULT_DETECTOR]()
            state = detector.new_state()
            if device != "dev-39":
                detector.score_series(None, v[:cut], state=state)
            expected = np.fmax(expected, detector.score_series(None, v[cut:], state=state))
        rows = later[later["device"] == device].index
        np.testing.assert_array_equal(got[rows].to_numpy(), expected, err_msg=device)
    assert (got > 0.5).sum() >= devices // 2  # the spikes are seen


def test_state_decoding_builds_only_detector_state_classes():
    with pytest.raises(ValueError, match="not a pipelines.detectors state class"):
        training.decode_state('{"__state__": "os.system", "f": {}}')


def test_training_without_labels_and_another_reading_name_says_what_it_could_not_measure(mlflow_uri):
    """No label column, a reading not named temp: the unsupervised families train, the baseline is a
    range fitted on the reading itself, and what needs labels is named as unmeasured, never NaN."""
    from mlflow import MlflowClient

    gold = make_gold(devices=2, days=1).rename(columns=lambda c: c.replace("temp", "latency_ms"))
    gold["label"] = pd.Series(pd.NA, index=gold.index, dtype="str")
    gold["is_anomaly"] = pd.array([pd.NA] * len(gold), dtype="Int8")
    params = {"train": {**PARAMS["train"], "families": ["streaming_detector", "isolation_forest"]}}
    params["train"].pop("threshold_rule")
    ctx = training.TrainingContext(dataset_name="unlabelled-test", data_snapshot={"partitions": ["x"]})
    result = training.train_and_log(gold, params, ctx, tracking_uri=mlflow_uri, experiment="t", progress=lambda _: None)
    assert result.model_family == "streaming_detector"
    assert "pr_auc" not in result.metrics and {"rows", "flagged", "flag_rate"} <= set(result.metrics)
    assert "precision, recall, f1, pr_auc" in result.unmeasured and "event-level scores" in result.unmeasured
    assert "latency_ms outside [" in result.baseline_rule
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert all(v == v for v in run.data.metrics.values())  # nothing logged as NaN
    assert "no labels" in run.data.tags["unmeasured"]


def test_a_fitted_temperature_rule_without_labels_falls_back_to_the_range_rule_and_says_so(mlflow_uri):
    """`threshold_rule: {temp_above: fit}` (the NAB dataset's params) on a series with no labels (a NAB
    file landed on its own): nothing to fit the rule to, so the baseline is the range rule, said so,
    and training goes on (it had stopped with numpy's IndexError on an empty quantile)."""
    gold = make_gold(devices=2, days=1)
    gold["label"] = pd.Series(pd.NA, index=gold.index, dtype="str")
    gold["is_anomaly"] = pd.array([pd.NA] * len(gold), dtype="Int8")
    params = {"train": {**PARAMS["train"], "families": ["streaming_detector"], "threshold_rule": {"temp_above": "fit"}}}
    ctx = training.TrainingContext(dataset_name="unlabelled-fit-test", data_snapshot={"partitions": ["x"]})
    lines: list[str] = []
    result = training.train_and_log(gold, params, ctx, tracking_uri=mlflow_uri, experiment="t", progress=lines.append)
    assert result.model_family == "streaming_detector"
    assert "temp outside [" in result.baseline_rule
    assert any("temp_above is 'fit'" in line and "range rule" in line for line in lines), lines


def test_streams_are_each_device_s_rows_in_time_order_ties_in_row_order():
    """`StreamingScorer._streams` (one stable numpy sort, no pandas sort_values: ~1.5 ms a live pass):
    devices in order, each device's rows by time with ties kept in row order, a missing time last,
    rows without a device left out; positions are X's positions, whatever its index."""
    ts = pd.to_datetime(
        ["2026-01-01 00:02", "2026-01-01 00:01", None, "2026-01-01 00:01", "2026-01-01 00:00", "2026-01-01 00:00"],
        utc=True,
    )
    X = pd.DataFrame(
        {
            "device": pd.Series(["b", "a", "a", "a", None, "b"], dtype="string[pyarrow]"),
            "ts": ts,
            "x": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        }
    ).set_axis([50, 40, 30, 20, 10, 0])
    model = training.StreamingScorer("contextual", readings=["x"])
    got = [(device, order.tolist(), values["x"].tolist()) for device, order, values in model._streams(X)]
    assert got == [("a", [1, 3, 2], [1.0, 3.0, 2.0]), ("b", [5, 0], [5.0, 0.0])]
