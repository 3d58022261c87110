"""Bronze, silver and gold on tiny files, plus the real NAB file end to end through its contract alone."""

import datetime as dt
import gzip

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.contracts import load_contract
from pipelines.layers.bronze import LINEAGE_COLUMNS, BronzeError, bronze_row_count, parse_landing_csv
from pipelines.layers.gold import META_COLUMNS, feature_columns, to_gold
from pipelines.layers.partitioning import plan_device_buckets
from pipelines.layers.silver import silver_rules, to_silver, type_bronze
from pipelines.simulator import simulate_day_csv

IOT = load_contract("iot_telemetry")
NAB = load_contract("nab_machine_temperature")
INGESTED = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)
HEADER = b"ts,device,co,humidity,light,lpg,motion,smoke,temp,fault\n"


def bronze(data: bytes, contract=IOT, key: str = "landing/2026-01-05/a.csv", at=INGESTED) -> pa.Table:
    return parse_landing_csv(
        data, source_key=key, source_etag="etag-1", run_id="run-1", ingested_at=at, contract=contract
    )


def row(ts="1767571200", device="device-01", co="0.005", humidity="50", light="true", temp="21.5", fault=""):
    return f"{ts},{device},{co},{humidity},{light},0.007,0,0.02,{temp},{fault}\n".encode()


# ---------------------------------------------------------------- bronze


def test_bronze_keeps_every_column_as_string_with_lineage_and_line_numbers():
    table = bronze(HEADER + row() + b"\n" + row(ts="1767571260", fault="spike"))
    assert bronze_row_count(table) == 2
    assert all(table.schema.field(c).type == pa.string() for c in HEADER.decode().strip().split(","))
    assert set(LINEAGE_COLUMNS) <= set(table.column_names)
    assert table["_source_line"].to_pylist() == [2, 4]  # blank line 3 is skipped, not renumbered
    assert table["_source_key"].to_pylist() == ["landing/2026-01-05/a.csv"] * 2
    assert table["fault"].to_pylist() == ["", "spike"]  # empty stays empty, not null


def test_bronze_reads_gzip_transparently():
    data = HEADER + row()
    assert bronze(gzip.compress(data)).equals(bronze(data))


def test_bronze_keeps_malformed_lines_with_parse_error():
    table = bronze(HEADER + row() + b"1767571260,device-01,0.1\n" + row(ts="1767571320"))
    assert table["_source_line"].to_pylist() == [2, 3, 4]
    errors = table["_parse_error"].to_pylist()
    assert errors[0] is None and "expected 10 fields, found 3" in errors[1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (HEADER, "header only"),
        (b"ts,device,co\n1,d,0.1\n", "missing column"),
        (HEADER + row() + b"1767571260,device-\xff1\n", "line 3 is not valid UTF-8"),
    ],
)
def test_bronze_errors_name_the_file(data, message):
    with pytest.raises(BronzeError) as err:
        bronze(data, key="landing/bad.csv")
    assert "landing/bad.csv" in str(err.value) and message in str(err.value)


def test_missing_column_error_lists_what_was_found():
    with pytest.raises(BronzeError, match=r"\['humidity'.*found \['ts', 'device', 'co'\]"):
        bronze(b"ts,device,co\n1,d,0.1\n")


# ---------------------------------------------------------------- silver


def test_silver_types_columns_and_normalises_labels():
    silver, quarantine = to_silver(bronze(HEADER + row() + row(ts="1767571260.5", light="0", fault="Spike")), IOT)
    assert quarantine.empty
    assert list(silver.columns) == [*IOT.silver_columns, "_source_key", "_source_line"]
    assert str(silver["ts"].dtype) == "datetime64[us, UTC]"
    assert silver["temp"].dtype == "float64" and silver["light"].tolist() == [True, False]
    assert silver["label"].tolist() == ["normal", "spike"]
    assert silver["event_date"].tolist() == [dt.date(2026, 1, 5)] * 2
    assert silver["ts"].iloc[1] == pd.Timestamp("2026-01-05 00:01:00.5", tz="UTC")


def test_silver_label_is_null_when_the_delivery_has_no_labels():
    no_fault = HEADER.replace(b",fault", b"") + row().rsplit(b",", 1)[0] + b"\n"
    silver, _ = to_silver(bronze(no_fault), IOT)
    assert silver["label"].isna().all()


def test_silver_quarantines_rule_breakers_with_rule_and_reason():
    data = (
        HEADER
        + row()
        + row(ts="1767571260", temp="999")
        + row(ts="1767571320", humidity="wet")
        + row(ts="1767571380", co="inf")
        + row(ts="", temp="20")
        + row(ts="1767571440", device="")
        + row(ts="4102444800")  # 2100-01-01: a clock far in the future
        + b"1767571500,device-01\n"
    )
    silver, quarantine = to_silver(bronze(data), IOT, now=INGESTED)
    assert len(silver) == 1
    rules = dict(zip(quarantine["_source_line"], quarantine["rule"], strict=True))
    assert rules == {
        3: "range:temp",
        4: "type:humidity",
        5: "finite:co",
        6: "not_null:ts",
        7: "not_null:device",
        8: "future_timestamp",
        9: "parse_error",
    }
    reason = quarantine.set_index("_source_line").loc[3, "reason"]
    assert reason == "temp=999.0 outside physical range [-40, 125] celsius"
    assert quarantine.loc[0, "temp"] == "999"  # quarantine keeps the delivered strings
    assert {"rule", "reason", *LINEAGE_COLUMNS} <= set(quarantine.columns)


def test_silver_deduplicates_keeping_the_latest_delivery():
    first = bronze(HEADER + row(temp="20") + row(ts="1767571260"), key="a.csv", at=INGESTED)
    again = bronze(HEADER + row(temp="22") + row(ts="1767571260"), key="b.csv", at=INGESTED + dt.timedelta(hours=1))
    combined = pa.concat_tables([first, again])
    silver, quarantine = to_silver(combined, IOT, now=INGESTED + dt.timedelta(days=1))
    assert silver["temp"].tolist() == [22.0, 21.5]
    assert silver["_source_key"].tolist()[0] == "b.csv"
    assert quarantine["rule"].tolist() == ["duplicate_key"] and quarantine["_source_key"].tolist() == ["a.csv"]
    assert "b.csv line 2" in quarantine["reason"].iloc[0]
    assert silver.attrs["collapsed_duplicates"] == 1  # the identical second reading
    assert len(silver) + len(quarantine) + silver.attrs["collapsed_duplicates"] == combined.num_rows


def test_every_bronze_row_is_accounted_for_on_simulated_data_with_damage():
    day = simulate_day_csv(dt.date(2026, 1, 5), devices=3, freq_seconds=600, seed=3)
    lines = day.splitlines(keepends=True)
    damaged = b"".join(lines) + lines[5] + lines[6].replace(b",", b",9999,", 1) + row(temp="-300")
    table = bronze(damaged)
    silver, quarantine = to_silver(table, IOT, now=INGESTED)
    assert len(silver) + len(quarantine) + silver.attrs["collapsed_duplicates"] == table.num_rows
    assert not silver.duplicated(["device", "ts"]).any()
    assert silver.equals(silver.sort_values(["device", "ts"]).reset_index(drop=True))


def test_silver_rules_come_from_the_contract_and_pass_on_silver():
    rules = {r.name: r for r in silver_rules(IOT)}
    assert "range:temp" in rules and "range:light" not in rules
    assert "[-40, 125]" in rules["range:temp"].description
    silver, _ = to_silver(bronze(simulate_day_csv(dt.date(2026, 1, 5), 2, 600, 1)), IOT, now=INGESTED)
    for rule in rules.values():
        assert not rule.violations(silver).any(), rule.name


def test_nab_fahrenheit_is_converted_to_celsius():
    silver, _ = to_silver(bronze(b"timestamp,value\n2013-12-02 21:15:00,212\n2013-12-02 21:20:00,32\n", NAB), NAB)
    assert silver["temp"].tolist() == [100.0, 0.0]
    assert silver["device"].tolist() == ["machine_temperature"] * 2
    assert silver["ts"].iloc[0] == pd.Timestamp("2013-12-02 21:15", tz="UTC")


# ---------------------------------------------------------------- gold


def _silver_frame(temps, labels=None, device="d1"):
    ts = pd.date_range("2026-01-05", periods=len(temps), freq="min", tz="UTC").astype("datetime64[us, UTC]")
    return pd.DataFrame(
        {
            "device": device,
            "ts": ts,
            "temp": np.array(temps, dtype=float),
            "label": pd.Series(labels if labels is not None else [None] * len(temps), dtype="str"),
            "event_date": ts.date,
        }
    )


def _per_device_reference(silver: pd.DataFrame, col: str, window: int, long_window: int) -> pd.DataFrame:
    """The features of one column computed the obvious way: device by device, pandas rolling."""
    out = []
    for _, g in silver.sort_values(["device", "ts"]).groupby("device", sort=True):
        v = g[col].ffill().fillna(0.0)
        r = v.rolling(window, min_periods=1)
        out.append(
            pd.DataFrame(
                {
                    "device": g["device"],
                    "ts": g["ts"],
                    "mean": r.mean(),
                    "std": r.std().fillna(0.0),
                    "min": r.min(),
                    "max": r.max(),
                    "delta": v.diff().fillna(0.0),
                    "flat": (v.diff() == 0).astype(float).rolling(window, min_periods=1).sum(),
                    "long_dev": v - v.rolling(long_window, min_periods=1).median(),
                }
            )
        )
    return pd.concat(out).sort_values(["device", "ts"]).reset_index(drop=True)


def test_gold_rolling_features_equal_a_device_by_device_computation():
    rng = np.random.default_rng(3)
    frames = [
        _silver_frame(20 + rng.normal(0, 1, n).round(1), device=f"d{i}") for i, n in enumerate([1, 2, 7, 40, 120])
    ]
    silver = pd.concat(frames, ignore_index=True)
    silver.loc[rng.choice(len(silver), 25, replace=False), "temp"] = np.nan
    shuffled = silver.sample(frac=1.0, random_state=1).reset_index(drop=True)
    gold = to_gold(shuffled, NAB, window=5, long_window=30).sort_values(["device", "ts"]).reset_index(drop=True)
    expected = _per_device_reference(silver, "temp", window=5, long_window=30)
    assert gold["device"].tolist() == expected["device"].tolist()
    for ours, theirs in [
        ("temp_roll_mean", "mean"),
        ("temp_roll_min", "min"),
        ("temp_roll_max", "max"),
        ("temp_delta", "delta"),
        ("temp_flat_count", "flat"),
        ("temp_long_dev", "long_dev"),
    ]:
        np.testing.assert_allclose(gold[ours], expected[theirs], rtol=1e-12, atol=1e-12, err_msg=ours)
    std = expected["std"].where(expected["std"] > 1e-9 * (1 + expected["mean"].abs()), 0.0)
    np.testing.assert_allclose(gold["temp_roll_std"], std, rtol=1e-12, atol=1e-12)


def test_gold_features_are_finite_float_and_named():
    silver, _ = to_silver(bronze(simulate_day_csv(dt.date(2026, 1, 5), 3, 300, 2)), IOT, now=INGESTED)
    gold = to_gold(silver, IOT, window=5)
    features = feature_columns(gold)
    assert list(gold.columns[: len(META_COLUMNS)]) == list(META_COLUMNS)
    for name in (
        "temp",
        "temp_roll_mean",
        "temp_roll_std",
        "temp_roll_min",
        "temp_roll_max",
        "temp_delta",
        "temp_zscore",
        "light",
        "motion",
        "hour_sin",
        "hour_cos",
    ):
        assert name in features
    assert (gold[features].dtypes == "float64").all()
    assert np.isfinite(gold[features].to_numpy()).all()
    assert len(gold) == len(silver)


def test_gold_handles_missing_and_constant_readings_without_nan():
    gold = to_gold(_silver_frame([np.nan, 5, 5, 5, np.nan, 5]), NAB, window=3)
    features = gold[feature_columns(gold)].to_numpy()
    assert np.isfinite(features).all()
    assert gold["temp_roll_std"].iloc[-1] == 0 and gold["temp_zscore"].iloc[-1] == 0


def test_gold_does_not_look_ahead():
    temps = [20.0, 21, 19, 22, 20, 21, 20, 19]
    changed = temps[:5] + [80.0, 20, 19]
    before = to_gold(_silver_frame(temps), NAB, window=3)
    after = to_gold(_silver_frame(changed), NAB, window=3)
    cols = feature_columns(before)
    pd.testing.assert_frame_equal(before[cols].iloc[:5], after[cols].iloc[:5])
    assert not before[cols].iloc[5].equals(after[cols].iloc[5])


def test_gold_flat_count_sees_a_stuck_sensor_and_long_dev_a_drift():
    temps = [20.0, 20.4, 19.8, 20.1, 20.1, 20.1, 20.1, 20.1, 23.0, 26.0]
    gold = to_gold(_silver_frame(temps), NAB, window=4, long_window=6)
    assert gold["temp_flat_count"].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 3, 2]
    # value minus the median of the last 6 readings, the current one included
    assert gold["temp_long_dev"].iloc[-1] == pytest.approx(26.0 - 20.1)
    assert gold["temp_long_dev"].iloc[0] == 0.0


def test_gold_warmup_rows_feed_windows_and_are_dropped():
    full = _silver_frame([20.0, 21, 19, 22, 20, 21])
    whole = to_gold(full, NAB, window=3)
    tail = to_gold(full.iloc[3:].reset_index(drop=True), NAB, window=3, warmup=full.iloc[:3])
    assert len(tail) == 3
    pd.testing.assert_frame_equal(tail, whole.iloc[3:].reset_index(drop=True))


def test_is_anomaly_maps_labels():
    gold = to_gold(_silver_frame([1.0, 2, 3], labels=["normal", "spike", None]), NAB)
    assert str(gold["is_anomaly"].dtype) == "Int8"
    assert gold["is_anomaly"].tolist()[:2] == [0, 1] and gold["is_anomaly"].isna().tolist() == [
        False,
        False,
        True,
    ]


# ---------------------------------------------------------------- real data


def test_nab_file_goes_bytes_to_gold_through_its_contract_alone(nab_csv):
    # nab_csv (conftest) fails, never skips, when ../shared/datasets/nab is missing.
    table = bronze(nab_csv.read_bytes(), NAB, key="landing/nab/machine_temperature_system_failure.csv")
    assert table.num_rows == 22_695
    silver, quarantine = to_silver(table, NAB, now=INGESTED)
    # The file repeats 2014-01-07 02:00-02:55 with different values: 12 conflicting readings.
    assert len(silver) == 22_683
    assert quarantine["rule"].tolist() == ["duplicate_key"] * 12
    assert len(silver) + len(quarantine) + silver.attrs["collapsed_duplicates"] == 22_695
    assert silver["temp"].between(-40, 125).all() and 25 < silver["temp"].median() < 40  # celsius, not F
    gold = to_gold(silver, NAB)
    assert feature_columns(gold) == [
        "temp",
        "temp_roll_mean",
        "temp_roll_std",
        "temp_roll_min",
        "temp_roll_max",
        "temp_delta",
        "temp_zscore",
        "temp_flat_count",
        "temp_long_dev",
        "hour_sin",
        "hour_cos",
    ]
    assert np.isfinite(gold[feature_columns(gold)].to_numpy()).all()
    assert gold["is_anomaly"].isna().all()


def test_device_buckets_keep_devices_whole_sorted_and_bounded():
    rows = {"d3": 30, "d1": 50, "d2": 60, None: 5, "d4": 200}
    buckets = plan_device_buckets(rows, max_rows=100)
    assert buckets == [[None, "d1"], ["d2", "d3"], ["d4"]]  # d4 alone is over the bound: its own bucket
    assert sorted((d for b in buckets for d in b), key=str) == sorted(rows, key=str)
    assert plan_device_buckets({"a": 1}, max_rows=10) == [["a"]]
    with pytest.raises(ValueError):
        plan_device_buckets(rows, max_rows=0)


def test_silver_gives_the_same_rows_from_a_bronze_table_and_from_its_frame():
    """type_bronze takes bronze as Arrow (the stream's micro-batch, the lake's files) or as a frame
    (hand-built, tests): messy values of every kind must type, quarantine and collapse alike."""
    messy = HEADER + b"".join(
        [
            row(),
            row(ts="1767571260", co=" 0.025 ", light=" YES ", fault=" Spike "),
            row(ts="1767571320", co="-nan", humidity="n/a", light="maybe"),
            row(ts="1767571380", co="abc", temp="1e400", light=""),
            row(ts="1767571440000", device="dev\x01ice"),
            row(ts="", device="NA", co="inf"),
            row(ts="1767571500", device="device-02", humidity="150"),
            row(ts="1767571500", device="device-02", humidity="55"),
            row(),
            b"1767571560,device-03,not,enough\n",
        ]
    )
    table = bronze(messy, key="s3://landing/iot/2026-01-05/a.2.csv")
    typed_arrow, errors_arrow = type_bronze(table, IOT)
    typed_frame, errors_frame = type_bronze(table.to_pandas(), IOT)
    pd.testing.assert_frame_equal(typed_arrow, typed_frame)
    assert sorted(errors_arrow) == sorted(errors_frame) == ["co", "light"]  # 1e400 is inf: the finite rule
    for column, mask in errors_arrow.items():
        assert mask.tolist() == errors_frame[column].tolist(), column
    silver_arrow, quarantine_arrow = to_silver(table, IOT, now=INGESTED)
    silver_frame, quarantine_frame = to_silver(table.to_pandas(), IOT, now=INGESTED)
    pd.testing.assert_frame_equal(silver_arrow, silver_frame)
    pd.testing.assert_frame_equal(quarantine_arrow, quarantine_frame)
    assert len(silver_arrow) + len(quarantine_arrow) + silver_arrow.attrs["collapsed_duplicates"] == table.num_rows
    assert silver_arrow["label"].tolist() == ["normal", "spike", "normal"]
    assert silver_arrow["co"].tolist() == [0.005, 0.025, 0.005] and silver_arrow["light"].all()
    assert set(quarantine_arrow["rule"]) == {
        "type:co",
        "plausible_time:ts",
        "not_null:device",
        "range:humidity",
        "parse_error",
    }
