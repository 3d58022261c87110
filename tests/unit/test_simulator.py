"""Simulator: deterministic, contract-shaped, with every fault type present on every day."""

import datetime as dt
import io
import time

import pandas as pd

from pipelines.simulator import COLUMNS, FAULT_TYPES, simulate_day_csv, simulate_telemetry

START = dt.date(2026, 1, 5)


def test_same_arguments_give_identical_frames_and_seed_changes_them():
    a = simulate_telemetry(START, days=2, devices=3, seed=7)
    pd.testing.assert_frame_equal(a, simulate_telemetry(START, days=2, devices=3, seed=7))
    assert not a["temp"].equals(simulate_telemetry(START, days=2, devices=3, seed=8)["temp"])


def test_schema_and_grid():
    frame = simulate_telemetry(START, days=1, devices=4, freq_seconds=60)
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) == 4 * 1440
    assert frame["ts"].dtype == "int64" and frame["light"].dtype == bool
    assert sorted(frame["device"].unique()) == ["device-01", "device-02", "device-03", "device-04"]
    assert set(frame["fault"].unique()) <= {"", *FAULT_TYPES}
    assert frame.groupby("device")["temp"].mean().round(1).nunique() == 4  # devices have their own baselines
    midnight = int(dt.datetime(2026, 1, 5, tzinfo=dt.UTC).timestamp())
    assert frame["ts"].min() == midnight and frame["ts"].max() < midnight + 86_400


def test_faults_are_two_to_five_percent_and_every_type_every_day():
    frame = simulate_telemetry(START, days=6, devices=4, freq_seconds=60)
    day = frame["ts"] // 86_400
    rate = frame["fault"].ne("").groupby(day).mean()
    assert 0.02 <= frame["fault"].ne("").mean() <= 0.05
    assert (rate > 0).all()
    for _, faults in frame.groupby(day)["fault"]:
        assert set(FAULT_TYPES) <= set(faults.unique())


def test_faults_change_the_readings():
    frame = simulate_telemetry(START, days=2, devices=4)
    normal = frame[frame["fault"] == ""]
    assert (frame.loc[frame["fault"] == "dropout", "temp"] == 0).all()
    assert frame.loc[frame["fault"] == "spike", "temp"].sub(normal["temp"].mean()).abs().min() > 3
    stuck = frame[frame["fault"] == "stuck"].groupby("device")["temp"].nunique()
    assert (stuck <= 3).all()  # frozen sensor: one value per stuck run


def test_day_csv_matches_the_multi_day_frame():
    frame = simulate_telemetry(START, days=2, devices=3, freq_seconds=300, seed=5)
    day2 = pd.read_csv(
        io.BytesIO(simulate_day_csv(START + dt.timedelta(days=1), 3, 300, 5)),
        keep_default_na=False,
        dtype={"device": "str", "fault": "str"},
    )
    expected = frame[frame["ts"] >= frame["ts"].min() + 86_400].reset_index(drop=True)
    pd.testing.assert_frame_equal(day2, expected, check_dtype=False)


def test_day_csv_writes_booleans_like_the_source_dataset():
    header, first = simulate_day_csv(START, 2, 600, 1).decode().splitlines()[:2]
    assert header == ",".join(COLUMNS)
    assert first.split(",")[4] in ("true", "false")


def test_million_rows_generate_fast():
    started = time.perf_counter()
    frame = simulate_telemetry(START, days=174, devices=4, freq_seconds=60)
    assert len(frame) > 1_000_000
    assert time.perf_counter() - started < 5
