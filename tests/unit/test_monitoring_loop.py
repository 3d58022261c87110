"""The monitoring loop's rule on simulator data, no stack: false alarms over 200 no-drift days, a calibration
drift alarmed within 3 windows and cleared against a reference of the drifted data, alarm emission once per
alarm, serving errors and latency per call, alarms read from Asset events, performance against labels
(feedback preferred over gold labels, anomaly events, "no labels" never reported as zeros)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from pipelines.contracts import load_contract
from pipelines.datasets import get_dataset
from pipelines.layers.gold import META_COLUMNS, to_gold
from pipelines.monitoring.job import FLAGGED, SCORE, training_reference_profile
from pipelines.monitoring.loop import (
    MonitoringPolicy,
    alarm_decision,
    alarms_from_events,
    judge_window,
    policy_for,
    serving_summary,
)
from pipelines.monitoring.performance import (
    feedback_rows,
    gold_rows,
    performance_metrics,
    window_performance,
)
from pipelines.monitoring.report import render_html
from pipelines.simulator import simulate_telemetry

DATASET = "iot_telemetry"
START = dt.date(2026, 1, 5)


def simulated_gold(start: dt.date, days: int, temp_offset: float = 0.0) -> pd.DataFrame:
    """Gold features of simulated days (one warm-up day before them, dropped), a calibration offset on
    the temperature sensor if asked. Silver's typed shape is built directly from the simulator's frame."""
    ds = get_dataset(DATASET)
    contract = load_contract(ds.contract_path)
    sim = simulate_telemetry(start - dt.timedelta(days=1), days + 1, devices=4, freq_seconds=60, seed=42)
    silver = pd.DataFrame({"device": sim["device"], "ts": pd.to_datetime(sim["ts"], unit="s", utc=True)})
    for col in ("co", "humidity", "lpg", "smoke", "temp"):
        silver[col] = sim[col].astype("float64")
    for col in ("light", "motion"):
        silver[col] = sim[col].astype(bool)
    silver["temp"] += temp_offset
    silver["label"] = sim["fault"].where(sim["fault"] != "", "normal")
    silver["event_date"] = silver["ts"].dt.date.astype(str)
    short, long_ = ds.windows(contract.cadence_seconds)
    gold = to_gold(silver, contract, window=short, long_window=long_)
    return gold[gold["ts"] >= pd.Timestamp(start, tz="UTC")].reset_index(drop=True)


@dataclass
class Model:
    """A model as training registers one: fitted on the earlier 70% of three days, its reference profile
    from the held-out latest 30% (features, score, alert flag)."""

    estimator: HistGradientBoostingClassifier
    features: list[str]
    threshold: float
    profile: object

    def outputs(self, frame: pd.DataFrame) -> pd.DataFrame:
        score = self.estimator.predict_proba(frame[self.features])[:, 1]
        return pd.DataFrame({SCORE: score, FLAGGED: (score >= self.threshold).astype(float)})


def train(gold: pd.DataFrame) -> Model:
    features = [c for c in gold.columns if c not in META_COLUMNS]
    ts = gold["ts"]
    cut = ts.min() + (ts.max() - ts.min()) * 0.7
    fit, held_out = gold[ts < cut], gold[ts >= cut]
    est = HistGradientBoostingClassifier(max_iter=60, random_state=0).fit(fit[features], fit["is_anomaly"].astype(int))
    model = Model(est, features, 0.5, None)
    out = model.outputs(held_out)
    model.profile = training_reference_profile(held_out, features, out[SCORE].to_numpy(), out[FLAGGED].to_numpy())
    return model


def days_of(gold: pd.DataFrame) -> list[pd.DataFrame]:
    day = gold["ts"].dt.floor("D")
    return [w.reset_index(drop=True) for _, w in gold.groupby(day, sort=True)]


def replay(model: Model, windows: list[pd.DataFrame], policy: MonitoringPolicy, history=()) -> list:
    """Judge windows one after another as the hourly DAG does, each seeing the previous verdicts."""
    history, verdicts = list(history), []
    for w in windows:
        v = judge_window(model.profile, w, model.outputs(w), policy, history[-(policy.of_windows - 1) :])
        verdicts.append(v)
        history.append(v.summary())
    return verdicts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """HGB's OpenMP threads spin against other processes on a busy 2-core machine (measured: 20 s instead
    of 1 s to fit): one thread is faster here."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def policy() -> MonitoringPolicy:
    return policy_for(DATASET)


@pytest.fixture(scope="module")
def model() -> Model:
    return train(simulated_gold(START, 3))


def test_200_no_drift_days_give_at_most_1_percent_false_alarms(model, policy):
    """200 daily windows of a no-drift replay (the simulator's later days: same devices, new noise, new
    faults), judged in order against the first days' model: at most 2 windows in alarm."""
    verdicts, history = [], []
    for chunk in range(8):  # 25 days at a time: bounded memory
        gold = simulated_gold(START + dt.timedelta(days=3 + 25 * chunk), 25)
        new = replay(model, days_of(gold), policy, history)
        history += [v.summary() for v in new]
        verdicts += new
    assert len(verdicts) == 200 and all(v.report.enough_rows for v in verdicts)
    alarms = sum(v.alarm for v in verdicts)
    drifted = sum(v.drifted for v in verdicts)
    print(f"\n200 no-drift windows: {drifted} drifted, {alarms} in alarm")
    assert alarms <= 2, [v.reasons for v in verdicts if v.alarm]
    # not vacuous: the features do move day to day, below the rule
    shares = [v.report.drifted_share for v in verdicts]
    assert max(shares) > 0.1, max(shares)


def test_a_calibration_offset_alarms_within_3_windows_and_clears_against_the_retrained_reference(model, policy):
    drifted_days = days_of(simulated_gold(START + dt.timedelta(days=3), 6, temp_offset=4.0))
    first = replay(model, drifted_days[:3], policy)
    assert [v.drifted for v in first] == [True, True, True], [v.reasons for v in first]
    assert [v.alarm for v in first] == [False, False, True]
    assert "temp" in first[-1].alarm_features and "temp_roll_mean" in first[-1].alarm_features
    assert any(r.startswith("temp") and "reference stds" in r for r in first[0].reasons), first[0].reasons
    # offset-free features (deltas, z-scores) are not blamed
    assert not {"temp_delta", "temp_zscore", "humidity"} & set(first[-1].alarm_features)

    # retrained on data that includes the drift: its reference is the drifted distribution
    retrained = train(pd.concat(drifted_days[:3], ignore_index=True))
    after = replay(retrained, drifted_days[3:], policy)
    assert not any(v.drifted or v.alarm for v in after), [v.reasons for v in after]


def test_too_few_rows_are_reported_never_judged(model, policy):
    window = days_of(simulated_gold(START + dt.timedelta(days=3), 1, temp_offset=10.0))[0].head(300)
    history = [{"window_drift": True, "responsible_features": ["temp"]}] * 3
    v = judge_window(model.profile, window, model.outputs(window), policy, history)
    assert v.status == "too few rows" and not v.drifted and v.report.feature("temp").wasserstein > 1
    assert v.alarm  # the 3 previous windows of 4 still drifted: the alarm stands, it is not cleared by silence


def test_alarm_is_emitted_once_then_after_the_cooldown_and_afresh_for_a_new_version(model, policy):
    window = days_of(simulated_gold(START + dt.timedelta(days=3), 1, temp_offset=4.0))[0]
    history = [{"window_drift": True, "responsible_features": ["temp"]}] * 2
    verdict = judge_window(model.profile, window, model.outputs(window), policy, history)
    assert verdict.alarm
    end = dt.datetime(2026, 1, 9, tzinfo=dt.UTC)
    emit, alarm_id, _ = alarm_decision(
        verdict, dataset=DATASET, version="3", window_end=end, previous_alarms=[], cooldown_seconds=86400
    )
    assert emit and alarm_id == "iot_telemetry-v3-20260109T0000Z"
    raised = [{"alarm_id": alarm_id, "model_version": "3", "window_end": end.isoformat()}]
    for hours, version, expected in ((0, "3", False), (5, "3", False), (24, "3", True), (1, "4", True)):
        emit, _, note = alarm_decision(
            verdict,
            dataset=DATASET,
            version=version,
            window_end=end + dt.timedelta(hours=hours),
            previous_alarms=raised,
            cooldown_seconds=86400,
        )
        assert emit is expected, (hours, version, note)


def test_serving_errors_and_latency_count_model_calls_not_records():
    rows = []
    for call, latency in enumerate([5.0, 7.0, 400.0]):
        for _ in range(50):
            rows.append(
                {
                    "request_id": f"r{call}",
                    "served": True,
                    "role": "champion",
                    "model_version": "2",
                    "latency_ms": latency,
                    "compute_ms": latency / 2,
                    "error": "boom" if call == 2 else None,
                }
            )
    rows.append({**rows[0], "served": False, "request_id": "shadow", "latency_ms": 9000.0})  # a shadow copy
    summary = serving_summary(pd.DataFrame(rows))
    assert summary["records"] == 150 and summary["requests"] == 3
    assert summary["error_rate"] == pytest.approx(1 / 3)
    assert 7.0 < summary["latency_p99_ms"] <= 400.0 and summary["latency_p50_ms"] == 7.0


def test_alarms_are_read_from_the_triggering_asset_events_once_each():
    @dataclass
    class Event:
        extra: dict

    a = {"alarm_id": "d-v1-20260109T0000Z", "window_end": "2026-01-09T00:00:00+00:00"}
    b = {"alarm_id": "d-v1-20260110T0000Z", "window_end": "2026-01-10T00:00:00+00:00"}
    events = {"drift": [Event(b), Event(a), Event(a)], "gold": [Event({"partitions": ["2026-01-09"]})]}
    assert [x["alarm_id"] for x in alarms_from_events(events)] == [a["alarm_id"], b["alarm_id"]]
    assert alarms_from_events(None) == [] and alarms_from_events({"gold": [Event({})]}) == []


def test_the_rule_comes_from_the_dataset_params():
    p = get_dataset(DATASET).params.monitoring
    policy = MonitoringPolicy.from_params(p)
    assert policy.window_seconds == 86400 and (policy.alarm_windows, policy.of_windows) == (3, 4)
    assert policy.thresholds.min_rows == 1000 and "hour_sin" in policy.exclude  # no cadence in the contract
    # a 5-minute series reports 288 readings a day: its windows need half of them, not 1,000
    assert MonitoringPolicy.from_params(p, cadence_seconds=300).thresholds.min_rows == 144
    assert policy_for(DATASET).thresholds.min_rows == 1000
    assert np.isfinite(policy.strong_wasserstein)


# ---------------------------------------------------------------------------------------------- performance

T0 = pd.Timestamp("2026-01-09T00:00:00Z")


def labelled_gold(device_labels: dict[str, str], device_flags: dict[str, str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Gold rows, one a minute per device, from strings: label '1' anomaly, '0' normal, '.' unknown;
    flag '1' flagged. The rows are interleaved across devices, as gold stores them."""
    rows, flags = [], []
    for device, labels in device_labels.items():
        for i, (y, f) in enumerate(zip(labels, device_flags[device], strict=True)):
            rows.append(
                {"device": device, "ts": T0 + pd.Timedelta(minutes=i), "is_anomaly": None if y == "." else int(y)}
            )
            flags.append(float(f))
    frame = pd.DataFrame(rows).astype({"is_anomaly": "Int8"})
    order = np.argsort(frame["ts"].to_numpy(), kind="stable")  # interleave devices, keep flags aligned
    return frame.iloc[order].reset_index(drop=True), np.asarray(flags)[order]


def test_performance_counts_anomaly_events_per_device_and_false_alarms_per_1000_rows():
    features, flags = labelled_gold(
        {
            # events: [1-3] caught (row 2), [6-7] missed, [9] caught; row 4 is a false alarm
            "a": "0111001101",
            # one event [2-5] across an unknown row (skipped, not a break): caught at row 5; row 8 a false alarm
            "b": "0011.11000",
        },
        {"a": "0010100001", "b": "0000001010"},
    )
    perf = window_performance(gold=gold_rows(features, flags), gold_flags_from="replayed with v3")
    assert perf["source"] == "gold labels" and perf["flags_from"] == "replayed with v3"
    assert perf["labelled_rows"] == 19 and perf["positives"] == 10
    assert (perf["true_positives"], perf["false_positives"]) == (3, 2)
    assert perf["precision"] == pytest.approx(3 / 5) and perf["recall"] == pytest.approx(3 / 10)
    assert perf["f1"] == pytest.approx(2 * 0.6 * 0.3 / 0.9)
    assert (perf["events"], perf["events_caught"]) == (4, 3) and perf["event_recall"] == pytest.approx(0.75)
    assert perf["false_alarms_per_1000"] == pytest.approx(1000 * 2 / 19)
    metrics = performance_metrics(perf)
    assert metrics["perf_f1"] == pytest.approx(perf["f1"]) and metrics["perf_event_recall"] == 0.75
    # a run of positives ends where the device changes, even when the next device's first row is positive
    features, flags = labelled_gold({"a": "0011", "b": "1100"}, {"a": "0001", "b": "0000"})
    perf = window_performance(gold=gold_rows(features, flags))
    assert (perf["events"], perf["events_caught"]) == (2, 1)


def test_a_window_without_labels_reports_no_labels_never_zeros():
    features, flags = labelled_gold({"a": "....."}, {"a": "01100"})
    for perf in (
        window_performance(),
        window_performance(gold=gold_rows(features, flags)),
        window_performance(gold=gold_rows(features.drop(columns="is_anomaly"), flags)),
    ):
        assert perf["source"] == "no labels" and perf["labelled_rows"] == 0
        assert all(perf[k] is None for k in ("precision", "recall", "f1", "event_recall", "false_alarms_per_1000"))
        assert performance_metrics(perf) == {"perf_labelled_rows": 0.0}
    html = render_html(model_report(), title="t", performance=window_performance())
    assert "Performance against labels" in html and "No labels" in html and "F1" not in html
    # labels but no positive and no flag: precision, recall, F1 and event recall are undefined, not 0
    features, flags = labelled_gold({"a": "00000"}, {"a": "00000"})
    perf = window_performance(gold=gold_rows(features, flags))
    assert perf["labelled_rows"] == 5 and perf["false_alarms_per_1000"] == 0.0
    assert perf["precision"] is None and perf["recall"] is None and perf["f1"] is None and perf["event_recall"] is None
    assert "perf_f1" not in performance_metrics(perf) and performance_metrics(perf)["perf_false_alarms_per_1000"] == 0


def model_report():
    from pipelines.monitoring.drift import DriftThresholds, drift_report, reference_profile

    ref = pd.DataFrame({"x": np.linspace(0, 1, 50)})
    return drift_report(reference_profile(ref, ["x"]), ref, columns=["x"], thresholds=DriftThresholds(min_rows=10))


def test_feedback_on_served_records_is_preferred_over_gold_labels():
    ts = T0 + pd.Timedelta(minutes=5)
    predictions = pd.DataFrame(
        [
            # r1: 3 records of device a served by v2, then its shadow copy by v3 (not served)
            *[
                {"request_id": "r1", "record_index": i, "ts": ts, "device": "a", "served": True,
                 "model_version": "2", "flagged": f}
                for i, f in enumerate([False, True, False])
            ],
            *[
                {"request_id": "r1", "record_index": i, "ts": ts, "device": "a", "served": False,
                 "model_version": "3", "flagged": True}
                for i in range(3)
            ],
            # r2: failed call (no flag), r3: never labelled
            {"request_id": "r2", "record_index": 0, "ts": ts, "device": "b", "served": True, "model_version": "2",
             "flagged": None},
            {"request_id": "r3", "record_index": 0, "ts": ts, "device": "b", "served": True, "model_version": "2",
             "flagged": True},
        ]
    )  # fmt: skip
    later = ts + pd.Timedelta(hours=2)
    feedback = pd.DataFrame(
        [
            {"request_id": "r1", "record_index": 0, "is_anomaly": 1, "ts": later},
            {"request_id": "r1", "record_index": 1, "is_anomaly": 1, "ts": later},
            {"request_id": "r1", "record_index": 2, "is_anomaly": 1, "ts": later},  # relabelled below
            {"request_id": "r1", "record_index": 2, "is_anomaly": 0, "ts": later + pd.Timedelta(minutes=1)},
            {"request_id": "r2", "record_index": 0, "is_anomaly": 1, "ts": later},
        ]
    )
    rows = feedback_rows(predictions, feedback, version="2")
    assert len(rows) == 3 and rows["device"].tolist() == ["a"] * 3  # the shadow, the failed call and r3 left out
    # gold says every row of the window is normal and flagged: feedback must win
    features, flags = labelled_gold({"a": "0000", "b": "0000"}, {"a": "1111", "b": "1111"})
    perf = window_performance(feedback=rows, gold=gold_rows(features, flags))
    assert perf["source"] == "feedback" and perf["flags_from"].startswith("prediction log")
    assert (perf["labelled_rows"], perf["positives"], perf["true_positives"], perf["false_positives"]) == (3, 2, 1, 0)
    assert perf["precision"] == 1.0 and perf["recall"] == 0.5
    assert (perf["events"], perf["events_caught"]) == (1, 1)  # records 0-1 of r1: one event, caught at 1
    assert "gold labels on 8 rows" in perf["note"]
    html = render_html(model_report(), title="t", performance=perf)
    assert "Labels from <b>feedback</b>" in html and "event recall" in html
    # feedback for other records only: the gold labels decide
    assert feedback_rows(predictions, feedback.iloc[:0], version="2").empty
    assert window_performance(feedback=feedback_rows(predictions, feedback, version="9"),
                              gold=gold_rows(features, flags))["source"] == "gold labels"  # fmt: skip


def test_platform_monitor_shows_each_windows_f1_against_its_labels():
    from pipelines.monitoring.loop import format_monitor
    from pipelines.monitoring.performance import FEEDBACK_SOURCE, NO_LABELS

    base = {"model_version": "3", "rows": 5760, "drifted_share": 0.0, "status": "ok", "reasons": []}
    text = format_monitor(
        [
            {
                **base,
                "window_end": "2026-03-06T00:00",
                "performance": {"source": FEEDBACK_SOURCE, "labelled_rows": 600, "f1": 0.857},
            },
            {
                **base,
                "window_end": "2026-03-07T00:00",
                "performance": {"source": NO_LABELS, "labelled_rows": 0, "f1": None},
            },
        ],
        [],
    ).splitlines()
    assert "F1 (labels)" in text[0]
    assert f"0.86 ({FEEDBACK_SOURCE.split()[0]}, 600)" in text[1]
    assert text[2].split()[5] == "-", "no labels: no F1, never 0"
