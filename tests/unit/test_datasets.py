"""The dataset catalogue: contracts are datasets, params are typed, windows are durations."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines import datasets

REPO = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, section: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = section
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _contract(folder: Path, name: str, cadence: str | None = None) -> None:
    raw = yaml.safe_load((REPO / "pipelines" / "contracts" / "nab_machine_temperature.yaml").read_text())
    raw["name"] = name
    if cadence:
        raw["cadence"] = cadence
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))


def test_an_unknown_key_is_an_error_naming_the_key_and_the_file(tmp_path):
    params = _params(tmp_path, {"iot_telemetry": {"gold": {"windw": "15min"}}})
    with pytest.raises(datasets.DatasetError) as err:
        datasets.catalogue(params_file=params)
    assert str(params) in str(err.value) and "datasets.iot_telemetry.gold.windw is not a known key" in str(err.value)


def test_a_section_without_a_contract_and_an_unknown_dataset_are_errors(tmp_path):
    with pytest.raises(datasets.DatasetError, match="datasets.office has no contract"):
        datasets.catalogue(params_file=_params(tmp_path, {"office": {}}))
    with pytest.raises(datasets.DatasetError, match="unknown dataset 'office'"):
        datasets.get_dataset("office", params_file=_params(tmp_path, {}))


def test_a_contract_in_the_user_folder_is_a_dataset_with_its_own_names(tmp_path):
    _contract(tmp_path, "office", cadence="1h")
    ds = datasets.get_dataset("office", contracts_dir=tmp_path, params_file=_params(tmp_path, {}))
    assert (ds.model_name, ds.lakehouse_dag_id, ds.training_dag_id, ds.grain) == (
        "office",
        "office_lakehouse",
        "office_training",
        "day",
    )
    assert ds.asset_uri("gold") == "s3://lake/gold/office"
    # hourly readings: windows of at least an hour and 6 readings, a day and 48 readings, as time
    assert ds.windows(3600.0) == ("21600s", "172800s")
    assert ds.windows(60.0) == ("3600s", "86400s")


def test_durations_parse_and_bad_ones_say_how_to_write_them():
    assert datasets.parse_duration("15min") == 900 and datasets.parse_duration("4h") == 14400
    assert datasets.parse_duration("1d") == 86400 and datasets.parse_duration(30) == 30
    for bad in ("15 minutes", "-1h", "0s", True):
        with pytest.raises(datasets.DatasetError, match="duration|longer than 0"):
            datasets.parse_duration(bad)


def test_effective_params_give_each_dataset_its_model_windows_and_overrides(tmp_path, monkeypatch):
    params = _params(
        tmp_path,
        {
            "iot_telemetry": {"model_name": "iot-model", "gold": {"window": "15min", "long_window": "4h"}},
            "nab_machine_temperature": {"grain": "month", "registry": {"margin": 0.5}},
        },
    )
    monkeypatch.setenv("PLATFORM_PARAMS_FILE", str(params))
    iot = datasets.effective_params("iot_telemetry")
    nab = datasets.effective_params("nab_machine_temperature")
    assert iot["registry"]["model_name"] == "iot-model" and iot["gold"]["window"] == "15min"
    assert nab["registry"]["model_name"] == "nab_machine_temperature" and nab["registry"]["margin"] == 0.5
    assert nab["dataset"]["grain"] == "month"


def test_month_partitions_bound_a_long_history_and_silver_checks_the_month():
    import pandas as pd

    from pipelines.layers.partitioning import next_partition, partition_bounds, partition_of, previous_partition
    from pipelines.layers.silver import silver_rules

    assert partition_of("2013-12-31", "month") == "2013-12-01" and partition_of("2013-12-31") == "2013-12-31"
    assert (
        next_partition("2013-12-01", "month") == "2014-01-01"
        and previous_partition("2014-01-01", "month") == "2013-12-01"
    )
    assert partition_bounds("2014-02-01", "month")[1] == pd.Timestamp("2014-03-01", tz="UTC")
    with pytest.raises(ValueError, match="grain='week'"):
        partition_of("2014-01-01", "week")
    from pipelines.contracts import load_contract

    rule = next(
        r
        for r in silver_rules(load_contract("nab_machine_temperature"), partition="2014-02-01", grain="month")
        if r.name == "outside_partition"
    )
    frame = pd.DataFrame(
        {
            "ts": pd.to_datetime(
                ["2014-02-01 00:00", "2014-02-28 23:59", "2014-03-01 00:00", "2014-01-31 23:59"], utc=True
            )
        }
    )
    assert rule.violations(frame).tolist() == [False, False, True, True]


def test_gold_windows_as_durations_equal_counts_at_a_regular_cadence_and_follow_time_otherwise():
    import numpy as np
    import pandas as pd

    from pipelines.contracts import load_contract
    from pipelines.layers.gold import to_gold

    contract = load_contract("nab_machine_temperature")
    ts = pd.date_range("2014-01-01", periods=300, freq="5min", tz="UTC")
    values = np.sin(np.arange(300) / 10.0) * 10 + 20
    silver = pd.DataFrame({"device": "m", "ts": ts, "temp": values, "label": pd.NA, "event_date": ts.date})
    by_count = to_gold(silver, contract, window=12, long_window=48)
    by_time = to_gold(silver, contract, window="1h", long_window="4h")
    np.testing.assert_allclose(by_count["temp_roll_mean"], by_time["temp_roll_mean"])
    np.testing.assert_allclose(by_count["temp_long_dev"], by_time["temp_long_dev"])
    # a 2-hour gap: a 1 h window after it holds only the readings since the gap, not 12 readings
    gappy = silver.drop(index=range(100, 124)).reset_index(drop=True)
    after_gap = to_gold(gappy, contract, window="1h", long_window="4h").iloc[100]
    assert after_gap["temp_roll_mean"] == pytest.approx(gappy["temp"].iloc[100])
