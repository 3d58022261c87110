"""Contract loading: packaged contracts, user files, and errors that name the file and the field."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.contracts import ContractError, available_contracts, convert_units, load_contract

IOT_FIELDS = ["ts", "device", "co", "humidity", "light", "lpg", "motion", "smoke", "temp", "fault"]


def test_packaged_contracts_are_listed_and_load():
    assert {"iot_telemetry", "nab_machine_temperature"} <= set(available_contracts())
    for name in available_contracts():
        assert load_contract(name).name == name


def test_iot_contract_declares_the_delivered_schema():
    contract = load_contract("iot_telemetry")
    assert contract.source_columns == IOT_FIELDS
    assert contract.measurement_columns == ["co", "humidity", "light", "lpg", "motion", "smoke", "temp"]
    assert contract.bool_columns == ["light", "motion"]
    assert contract.range_for("temp") == (-40.0, 125.0)
    assert contract.range_for("light") is None
    assert "fault" not in contract.required_source_columns  # labels are optional in real deliveries
    assert contract.silver_columns[:2] == ["device", "ts"] and contract.silver_columns[-2:] == [
        "label",
        "event_date",
    ]


def test_nab_contract_maps_value_to_celsius_temp_with_constant_device():
    contract = load_contract("nab_machine_temperature")
    assert contract.source_columns == ["timestamp", "value"]
    assert contract.entity.constant == "machine_temperature"
    assert contract.column("temp").needs_conversion
    assert contract.label is None


def test_fahrenheit_converts_to_celsius():
    np.testing.assert_allclose(convert_units(np.array([32.0, 212.0, -40.0]), "fahrenheit", "celsius"), [0, 100, -40])


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _minimal() -> dict:
    return {
        "name": "mine",
        "event_time": {"source": "time", "source_format": "epoch_seconds"},
        "entity": {"constant": "m1"},
        "columns": [{"name": "temp", "source": "t", "type": "float64", "unit": "celsius", "range": [0, 10]}],
    }


def test_user_contract_loads_from_a_path(tmp_path):
    contract = load_contract(_write(tmp_path, _minimal()))
    assert contract.source_columns == ["time", "t"]
    assert contract.keys == ("device", "ts")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["columns"][0].update(type="float32"), "type"),
        (lambda r: r["columns"][0].update(range=[10, 0]), "range"),
        (lambda r: r.pop("event_time"), "event_time"),
        (lambda r: r["columns"][0].update(source_unit="furlong"), "source_unit"),
        (lambda r: r["entity"].update(source="dev"), "entity"),
        (lambda r: r.update(colums=[]), "colums"),
    ],
)
def test_invalid_contract_names_file_and_field(tmp_path, mutate, field):
    raw = _minimal()
    mutate(raw)
    with pytest.raises(ContractError) as err:
        load_contract(_write(tmp_path, raw))
    assert "mine.yaml" in str(err.value) and field in str(err.value)


def test_unknown_contract_name_lists_the_available_ones():
    with pytest.raises(ContractError, match="iot_telemetry"):
        load_contract("no_such_dataset")
