"""Quality gates on tiny frames with real Great Expectations (one GX context for the whole module)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines.contracts import load_contract
from pipelines.quality import (
    GateResult,
    QualityGateError,
    add_local_site,
    build_data_docs,
    build_suite,
    enforce,
    quality_context,
    validate_partition,
)

PARTITION = "event_date=2026-01-05"


@pytest.fixture(scope="module")
def contract():
    return load_contract("iot_telemetry")


def silver_frame(n: int = 8) -> pd.DataFrame:
    ts = pd.date_range("2026-01-05", periods=n, freq="min", tz="UTC")
    df = pd.DataFrame(
        {
            "device": [f"device-{i % 2}" for i in range(n)],
            "ts": ts,
            "co": np.linspace(0.004, 0.006, n),
            "humidity": np.linspace(40.0, 60.0, n),
            "light": [i % 2 == 0 for i in range(n)],
            "lpg": np.linspace(0.006, 0.008, n),
            "motion": [False] * n,
            "smoke": np.linspace(0.01, 0.02, n),
            "temp": np.linspace(20.0, 25.0, n),
            "label": pd.Series(["normal"] * (n - 1) + [None], dtype="str"),
        }
    )
    df["event_date"] = ts.date
    df["_source_key"] = "landing/iot/2026-01-05.csv"
    df["_source_line"] = np.arange(2, n + 2)
    return df


def bronze_frame(contract, n: int = 5) -> pd.DataFrame:
    df = pd.DataFrame({name: ["1"] * n for name in contract.source_columns}, dtype="str")
    df["_source_key"] = "landing/iot/2026-01-05.csv"
    df["_source_etag"] = "etag"
    df["_source_line"] = [str(i + 2) for i in range(n)]
    df["_ingest_run_id"] = "run-1"
    df["_ingested_at"] = "2026-01-05T00:00:00Z"
    return df


def gold_frame(n: int = 10) -> pd.DataFrame:
    s = silver_frame(n)
    hours = s["ts"].dt.hour.to_numpy()
    return pd.DataFrame(
        {
            "device": s["device"],
            "ts": s["ts"],
            "event_date": s["event_date"],
            "label": s["label"],
            "is_anomaly": [i == 0 for i in range(n)],
            "temp": s["temp"],
            "temp_roll_mean": s["temp"],
            "temp_zscore": np.linspace(-1.0, 1.0, n),
            "hour_sin": np.sin(2 * np.pi * hours / 24),
        }
    )


def failed(result: GateResult, expectation: str, column: str | None = None):
    return [
        o
        for o in result.outcomes
        if not o.success and o.expectation == expectation and (column is None or o.column == column)
    ]


def test_importing_the_package_does_not_import_gx():
    code = "import sys, pipelines.quality; print('great_expectations' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_suites_take_ranges_from_the_contract(contract):
    suite = build_suite("silver", contract)
    ranges = {
        e.column: (e.min_value, e.max_value)
        for e in suite.expectations
        if type(e).__name__ == "ExpectColumnValuesToBeBetween" and e.column != "ts"
    }
    assert ranges == {c.name: c.range for c in contract.columns if c.range is not None}
    assert all(e.meta["severity"] in ("critical", "warning") for e in suite.expectations)


def test_clean_silver_partition_passes(contract):
    result = enforce(validate_partition(silver_frame(), "silver", contract, PARTITION))
    assert result.success, result.summary()
    assert all(o.success for o in result.outcomes)
    metrics = result.metrics()
    assert metrics["gx_silver_success_percent"] == 100.0
    assert metrics["gx_silver_failed"] == 0
    assert metrics["gx_silver_evaluated"] == len(result.outcomes) > 10


def test_out_of_range_temperature_fails_critically_with_a_useful_message(contract):
    df = silver_frame()
    df.loc[3, "temp"] = 300.0
    result = validate_partition(df, "silver", contract, PARTITION)
    assert not result.success
    (bad,) = failed(result, "expect_column_values_to_be_between", "temp")
    assert (bad.severity, bad.unexpected_count, bad.examples) == ("critical", 1, [300.0])
    with pytest.raises(QualityGateError) as err:
        enforce(result)
    message = str(err.value)
    for needle in (
        "expect_column_values_to_be_between",
        "'temp'",
        "1 unexpected",
        "300.0",
        "silver",
        "iot_telemetry",
        PARTITION,
    ):
        assert needle in message, message
    assert err.value.result is result


def test_duplicate_device_ts_fails(contract):
    df = silver_frame()
    df = pd.concat([df, df.iloc[[2]]], ignore_index=True)
    result = validate_partition(df, "silver", contract, PARTITION)
    (bad,) = failed(result, "expect_compound_columns_to_be_unique")
    assert bad.column == "device,ts" and bad.unexpected_count == 2
    with pytest.raises(QualityGateError, match="expect_compound_columns_to_be_unique"):
        enforce(result)


def test_future_timestamp_fails(contract):
    df = silver_frame()
    df.loc[5, "ts"] = pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=2)
    result = validate_partition(df, "silver", contract, PARTITION)
    (bad,) = failed(result, "expect_column_values_to_be_between", "ts")
    assert bad.unexpected_count == 1 and bad.severity == "critical"
    assert not result.success


def test_unknown_device_and_naive_ts_fail(contract):
    df = silver_frame()
    df["ts"] = df["ts"].dt.tz_localize(None)
    df.loc[0, "device"] = "rogue"
    config = {"known_devices": ["device-0", "device-1"]}
    result = validate_partition(df, "silver", contract, PARTITION, config=config)
    assert failed(result, "expect_column_values_to_be_in_set", "device")[0].examples == ["rogue"]
    assert failed(result, "expect_column_values_to_be_of_type", "ts")


def test_warning_only_failure_passes_enforce_but_is_recorded(contract):
    df = silver_frame()
    df.loc[1, "humidity"] = 120.0
    config = {"severity": {"expect_column_values_to_be_between:humidity": "warning"}}
    result = enforce(validate_partition(df, "silver", contract, PARTITION, config=config))
    assert result.success
    (warned,) = result.warnings
    assert (warned.column, warned.severity, warned.examples) == ("humidity", "warning", [120.0])
    assert "WARNING" in result.summary() and "120.0" in result.summary()
    assert result.metrics()["gx_silver_warnings"] == 1


def test_mostly_threshold_from_config(contract):
    df = silver_frame()
    df.loc[1, "humidity"] = 120.0  # 1 of 8 rows
    config = {"mostly": {"expect_column_values_to_be_between:humidity": 0.8}}
    assert validate_partition(df, "silver", contract, PARTITION, config=config).success


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_gold_nan_or_inf_feature_fails(contract, bad_value):
    df = gold_frame()
    df.loc[4, "temp_zscore"] = bad_value
    result = validate_partition(df, "gold", contract, PARTITION)
    assert not result.success
    # one check over the whole feature matrix; its examples name the row, the feature and the value
    (bad,) = result.critical_failures
    assert (bad.expectation, bad.column, bad.unexpected_count) == (
        "expect_column_values_to_be_null",
        "_nonfinite_features",
        1,
    )
    assert bad.examples == [f"device-0 2026-01-05 00:04:00+00:00: temp_zscore={bad_value}"]
    with pytest.raises(QualityGateError, match=f"temp_zscore={bad_value}"):
        enforce(result)
    json.dumps(result.to_dict(), allow_nan=False)


def test_gold_finiteness_honours_mostly_and_severity_config(contract):
    df = gold_frame()
    df.loc[4, "temp_zscore"] = np.nan  # 1 row of 10
    lenient = {"mostly": {"expect_column_values_to_not_be_null": 0.8}}
    assert validate_partition(df, "gold", contract, PARTITION, config=lenient).success
    strict = {"mostly": {"expect_column_values_to_not_be_null": 1.0}}
    assert not validate_partition(df, "gold", contract, PARTITION, config=strict).success
    warn = {"severity": {"expect_column_values_to_be_null": "warning"}}
    result = validate_partition(df, "gold", contract, PARTITION, config=warn)
    assert result.success and result.warnings[0].unexpected_count == 1


def test_bronze_gate_per_batch_reuses_its_suite_and_still_sees_each_batch(contract):
    clean = bronze_frame(contract)
    assert validate_partition(clean, "bronze", contract, PARTITION).success
    bad = bronze_frame(contract)
    bad.loc[1, "_source_line"] = None
    result = validate_partition(bad, "bronze", contract, PARTITION)
    (failure,) = failed(result, "expect_column_values_to_not_be_null", "_source_line")
    assert failure.unexpected_count == 1
    assert validate_partition(clean.drop(columns=["temp"]), "bronze", contract, PARTITION).success is False
    assert validate_partition(clean, "bronze", contract, PARTITION).success


def test_gold_drift_and_anomaly_rate_warn(contract):
    reference = gold_frame(50)
    df = gold_frame()
    df["temp"] = df["temp"] + 1000.0  # far outside the reference band
    df["is_anomaly"] = True
    result = enforce(validate_partition(df, "gold", contract, PARTITION, reference=reference))
    warned = {(o.expectation, o.column): o for o in result.warnings}
    drift = warned[("expect_column_values_to_be_null", "_drifted_features")]
    # one unexpected "row" per drifting feature, naming it, its mean and the band it left
    assert drift.unexpected_count == 1 and drift.examples[0].startswith("temp: mean 10"), drift.examples
    assert "outside [" in drift.examples[0] and "reference mean" in drift.examples[0]
    assert ("expect_column_mean_to_be_between", "is_anomaly") in warned
    assert result.success
    clean = validate_partition(gold_frame(), "gold", contract, PARTITION, reference=reference)
    assert all(o.success for o in clean.outcomes), clean.summary()
    # a feature of the reference that is gone is critical, and named
    missing = validate_partition(gold_frame().drop(columns=["temp"]), "gold", contract, PARTITION, reference=reference)
    assert not missing.success
    (gone,) = [o for o in missing.critical_failures if o.expectation == "expect_table_columns_to_match_set"]
    assert "temp" in gone.describe(), gone.describe()


def test_drifted_features_names_each_drifting_feature_once():
    import pandas as pd

    from pipelines.quality.suites import drifted_features

    ref = {"features": {"a": {"mean": 0.0, "std": 1.0, "rows": 10}, "b": {"mean": 5.0, "std": 0.0, "rows": 10}}}
    frame = pd.DataFrame({"a": [10.0, 10.0, float("nan")], "b": [5.0, 5.0, 5.0]})
    out = drifted_features(frame, ref, k=6)
    assert out.notna().sum() == 1 and out.iloc[0].startswith("a: mean 10 outside [-6, 6]")
    frame["b"] = 5.1  # a constant reference admits rounding noise only
    assert drifted_features(frame, ref, k=6).notna().sum() == 2
    # fewer rows than drifting features: nothing is dropped, the last row carries the rest
    one_row = drifted_features(frame.iloc[:1], ref, k=6)
    assert "a: mean" in one_row.iloc[0] and "b: mean" in one_row.iloc[0]
    assert drifted_features(frame, None, k=6).isna().all()


def test_bronze_missing_column_fails(contract):
    df = bronze_frame(contract).drop(columns=["temp"])
    result = validate_partition(df, "bronze", contract, PARTITION)
    (bad,) = failed(result, "expect_column_to_exist")
    assert bad.column == "temp"
    with pytest.raises(QualityGateError, match="temp"):
        enforce(result)


def test_bronze_row_count_must_match_source_lines(contract):
    df = bronze_frame(contract, n=5)
    assert validate_partition(df, "bronze", contract, PARTITION, expected_row_count=5).success
    result = validate_partition(df, "bronze", contract, PARTITION, expected_row_count=7)
    (bad,) = failed(result, "expect_table_row_count_to_equal")
    assert bad.observed_value == 5 and bad.kwargs["value"] == 7
    with pytest.raises(QualityGateError, match="observed 5"):
        enforce(result)


def test_bronze_null_lineage_fails(contract):
    df = bronze_frame(contract)
    df.loc[0, "_source_etag"] = None
    result = validate_partition(df, "bronze", contract, PARTITION)
    assert failed(result, "expect_column_values_to_not_be_null", "_source_etag")


def test_summary_and_to_dict_are_jsonable_and_carry_counts(contract):
    df = silver_frame()
    df.loc[[2, 6], "temp"] = [-80.0, 400.0]
    result = validate_partition(df, "silver", contract, PARTITION)
    summary = result.summary()
    assert "2 unexpected" in summary and "-80.0" in summary and "totals:" in summary
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    (bad,) = [o for o in data["outcomes"] if o["column"] == "temp" and not o["success"]]
    assert bad["unexpected_count"] == 2 and sorted(bad["examples"]) == [-80.0, 400.0]
    assert data["raw"]["statistics"]["unsuccessful_expectations"] == 1
    assert GateResult.from_dict(data).critical_failures[0].unexpected_count == 2
    json.dumps(result.metrics())


def test_data_docs_site_is_built(contract, tmp_path):
    result = validate_partition(silver_frame(), "silver", contract, PARTITION)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "silver.json").write_text(json.dumps(result.to_dict()))

    index = build_data_docs(reports, tmp_path / "site_from_reports")
    assert index.name == "index.html" and index.is_file()
    pages = list((tmp_path / "site_from_reports" / "validations").rglob("*.html"))
    assert pages and "iot_telemetry.silver" in index.read_text()

    index = build_data_docs(quality_context(), tmp_path / "site_from_context")
    assert index.is_file()
    assert list((tmp_path / "site_from_context" / "validations").rglob("*.html"))


def test_future_check_uses_build_time_clock(contract):
    suite = build_suite("silver", contract, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    (ts_check,) = [e for e in suite.expectations if getattr(e, "column", None) == "ts" and hasattr(e, "max_value")]
    assert pd.Timestamp(ts_check.max_value) == pd.Timestamp("2026-01-01T00:05:00Z")  # default tolerance 300 s


def test_context_with_a_site_refreshes_docs_through_a_checkpoint(contract, tmp_path):
    context = quality_context()
    add_local_site(context, tmp_path / "live")
    try:
        df = silver_frame()
        df.loc[0, "temp"] = 999.0
        result = validate_partition(df, "silver", contract, "event_date=2026-01-06", context=context)
    finally:
        context.delete_data_docs_site("local_site")
    assert not result.success
    assert (tmp_path / "live" / "index.html").is_file()
    assert list((tmp_path / "live" / "validations").rglob("*.html"))


def test_data_docs_render_the_latest_partitions_of_each_layer_only():
    """A long history does not grow the Data Docs site without bound: the latest N partitions of each
    (layer, dataset) are rendered; older results stay in the lake as JSON."""
    from pipelines.quality.docs import latest_validation_keys

    keys = [
        f"quality/{layer}/ds/event_date=2026-01-{d:02d}/validation.json"
        for layer in ("silver", "gold")
        for d in range(1, 31)
    ]
    keys += ["quality/gold/other/event_date=2025-01-01/validation.json", "quality/gold/ds/notes.txt"]
    chosen = latest_validation_keys(keys, per_layer=3)
    assert chosen == sorted(
        [
            f"quality/{layer}/ds/event_date=2026-01-{d}/validation.json"
            for layer in ("silver", "gold")
            for d in (28, 29, 30)
        ]
        + ["quality/gold/other/event_date=2025-01-01/validation.json"]
    )
