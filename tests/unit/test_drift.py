"""Drift monitoring: effect sizes decide (not p-values), persistence, profile JSON, HTML escaping, false alarms."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipelines.monitoring.drift import (
    DriftError,
    DriftThresholds,
    ReferenceProfile,
    drift_report,
    persistent_alarm,
    persistent_features,
    reference_profile,
)
from pipelines.monitoring.report import effect_size_figure, figure_png, render_html

FEATURES = [f"f{i}" for i in range(10)]


def normal_frame(rng: np.random.Generator, n: int, columns=FEATURES) -> pd.DataFrame:
    return pd.DataFrame(rng.normal(size=(n, len(columns))), columns=list(columns))


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return reference_profile(normal_frame(np.random.default_rng(1), 100_000), FEATURES)


def test_shifted_feature_drifts_and_a_tiny_shift_on_a_million_rows_does_not():
    rng = np.random.default_rng(2)
    reference = normal_frame(rng, 200_000, ["shifted", "tiny", "same"])
    profile = reference_profile(reference, ["shifted", "tiny", "same"])
    current = normal_frame(rng, 1_000_000, ["shifted", "tiny", "same"])
    current["shifted"] += 0.5
    current["tiny"] += 0.02

    report = drift_report(profile, current)

    assert report.feature("shifted").drifted
    assert report.feature("shifted").wasserstein == pytest.approx(0.5, abs=0.02)
    assert not report.feature("tiny").drifted
    assert report.feature("tiny").wasserstein < 0.05
    assert not report.feature("same").drifted
    # The p-value of a two-sample KS test would call the tiny shift significant: that is the false alarm avoided.
    assert stats.ks_2samp(reference["tiny"], current["tiny"].to_numpy()[:200_000]).pvalue < 1e-6
    assert report.drifted_features == ["shifted"]
    assert not report.dataset_drift  # 1 of 3 features < half


def test_dataset_drifts_when_half_of_the_features_drift(profile):
    current = normal_frame(np.random.default_rng(3), 20_000)
    for name in FEATURES[:5]:
        current[name] = current[name] * 1.8  # a scale change: same mean, wider
    report = drift_report(profile, current)
    assert set(report.drifted_features) == set(FEATURES[:5])
    assert report.drifted_share == pytest.approx(0.5)
    assert report.dataset_drift


def test_a_window_with_too_few_rows_is_reported_but_never_drifts(profile):
    current = normal_frame(np.random.default_rng(4), 500) + 3.0
    report = drift_report(profile, current, thresholds=DriftThresholds(min_rows=1000))
    assert not report.enough_rows and not report.dataset_drift
    assert {f.status for f in report.features} == {"too few rows"}
    assert report.feature("f0").wasserstein == pytest.approx(3.0, abs=0.2)  # measured, just not judged


def test_alert_rate_and_missing_share_drift():
    rng = np.random.default_rng(5)
    reference = pd.DataFrame({"flagged": rng.random(50_000) < 0.05, "temp": rng.normal(20, 2, 50_000)})
    profile = reference_profile(reference, ["flagged", "temp"])
    assert len(profile.features["flagged"].bin_counts) == 3  # < 0, [0, 1), >= 1

    temp = rng.normal(20, 2, 10_000)
    temp[:2_000] = np.nan  # a fifth of the readings drop out
    current = pd.DataFrame({"flagged": rng.random(10_000) < 0.15, "temp": temp})
    report = drift_report(profile, current)
    assert report.feature("flagged").drifted  # alert rate 5% -> 15%
    assert report.feature("temp").drifted
    assert any(r.startswith("missing share") for r in report.feature("temp").reasons)
    assert report.feature("temp").n_current == 8_000


def test_absent_column_drifts_and_non_numeric_or_unknown_features_are_errors(profile):
    current = normal_frame(np.random.default_rng(6), 2_000).drop(columns=["f3"])
    assert drift_report(profile, current).feature("f3").status == "absent"
    assert drift_report(profile, current).feature("f3").drifted
    with pytest.raises(DriftError, match="'device' is not numeric"):
        reference_profile(pd.DataFrame({"device": ["a", "b"]}), ["device"])
    with pytest.raises(DriftError, match="not in the reference profile"):
        drift_report(profile, current, columns=["nope"])
    with pytest.raises(DriftError, match="methods"):
        DriftThresholds(methods=("ks",))


@pytest.mark.parametrize(
    ("history", "alarm"),
    [
        ([], False),
        ([True, True], False),
        ([True, True, True], True),
        ([True, False, True, True], True),
        ([True, True, False, False], False),
        ([True, True, True, False, False], False),  # the old drifts left the last 4 windows
        ([False, False, False, True, True, False, True], True),
        ([{"dataset_drift": True}] * 3, True),
    ],
)
def test_persistent_alarm_needs_k_of_the_last_n_windows(history, alarm):
    assert persistent_alarm(history, k=3, n=4) is alarm


def test_persistent_alarm_parameters_and_features(profile):
    with pytest.raises(DriftError, match="1 <= k <= n"):
        persistent_alarm([True], k=5, n=4)
    assert persistent_alarm([True], k=1, n=1)
    reports = [{"drifted_features": ["a", "b"]}, {"drifted_features": ["a"]}, {"drifted_features": ["a", "c"]}]
    assert persistent_features(reports, k=3, n=4) == ["a"]


def test_profile_round_trips_through_json():
    rng = np.random.default_rng(7)
    frame = normal_frame(rng, 5_000, ["x", "constant", "empty"])
    frame["constant"] = 4.0
    frame["empty"] = np.nan
    frame.loc[:99, "x"] = np.inf  # counted as missing
    profile = reference_profile(frame, ["x", "constant", "empty"], metadata={"model_version": "7"})

    text = profile.to_json()
    json.loads(text)  # strict JSON: no NaN literals
    back = ReferenceProfile.from_json(text)

    assert back.features["x"] == profile.features["x"]
    assert back.features["x"].n_missing == 100
    assert back.features["constant"].bin_counts == profile.features["constant"].bin_counts
    assert back.features["empty"].n == 0 and np.isnan(back.features["empty"].mean)
    assert back.metadata == {"model_version": "7"} and back.n_rows == 5_000
    assert len(text) < 20_000  # 3 features: compact enough to store beside the model
    report = drift_report(back, frame)
    assert report.feature("empty").status == "no reference"
    assert not report.dataset_drift
    with pytest.raises(DriftError, match="schema"):
        ReferenceProfile.from_dict({**profile.to_dict(), "schema": 99})


def test_html_report_escapes_feature_names_and_embeds_the_figure():
    rng = np.random.default_rng(8)
    evil = "<script>alert('x')</script>"
    columns = [evil, "cost $"]
    profile = reference_profile(normal_frame(rng, 5_000, columns), columns)
    current = normal_frame(rng, 2_000, columns)
    current[evil] += 1.0
    report = drift_report(profile, current)

    png = figure_png(effect_size_figure(report, title="iot <b>"))
    page = render_html(
        report,
        title="drift <iot>",
        context={"model version": "<img src=x onerror=alert(1)>"},
        history=[("<w1>", True)],
        alarm=False,
        figure=png,
    )

    assert png.startswith(b"\x89PNG")
    assert "<script>" not in page and "<img src=x" not in page and "<w1>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "data:image/png;base64," in page


def test_no_drift_replay_of_200_windows_gives_at_most_one_percent_false_alarms(profile):
    rng = np.random.default_rng(9)
    history, alarms = [], 0
    for _ in range(200):
        history.append(drift_report(profile, normal_frame(rng, 5_000)).dataset_drift)
        alarms += persistent_alarm(history, k=3, n=4)
    assert alarms / 200 <= 0.01


def test_training_profile_and_window_reports_in_the_lake_feed_the_persistence_rule(tmp_path):
    from datetime import UTC, datetime, timedelta

    from pipelines.monitoring.job import recent_reports, save_window_report, training_reference_profile
    from pipelines.storage import LocalStore

    rng = np.random.default_rng(10)
    gold = normal_frame(rng, 5_000, ["temp", "temp_roll_std"])
    scores = rng.random(5_000)
    profile = training_reference_profile(gold, ["temp", "temp_roll_std"], scores, scores > 0.95)
    assert list(profile.features) == ["temp", "temp_roll_std", "score", "flagged"]
    with pytest.raises(DriftError, match="scores"):
        training_reference_profile(gold, ["temp"], scores[:10], scores > 0.95)

    store = LocalStore(tmp_path)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for hour, shift in enumerate([0.0, 1.0, 1.0, 0.0, 1.0]):
        window = normal_frame(rng, 2_000, ["temp", "temp_roll_std"]) + shift
        window = window.assign(score=rng.random(2_000) + shift, flagged=rng.random(2_000) > 0.95)
        report = drift_report(profile, window)
        save_window_report(
            store, "iot", start + timedelta(hours=hour), report, html="<p>r</p>", figure=b"png", context={"v": "1"}
        )
    recent = recent_reports(store, "iot", n=4)
    assert [r["window_start"][11:13] for r in recent] == ["01", "02", "03", "04"]
    assert persistent_alarm(recent, k=3, n=4)
    assert not persistent_alarm(recent_reports(store, "iot", n=4, before=start + timedelta(hours=3)), k=3, n=4)
