"""Bad input, one test per class, through the real object store and the real lake jobs.

Every class ends either in a clear error (BronzeError: a ValueError
whose message names the file, the line and the rule) or in quarantined rows with rule and reason;
every good row reaches silver. Each test owns one partition date (past dates: later ones would be
"from the future") so tests never see each other's files.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pipelines import storage
from pipelines.jobs import lake
from pipelines.layers.bronze import BronzeError, iter_landing_batches

DATASET = "iot_telemetry.bad_input"  # the production contract, its own lake prefix
HEADER = "ts,device,co,humidity,light,lpg,motion,smoke,temp,fault\n"


def epoch(partition: str, minute: int = 0) -> int:
    day = dt.datetime.fromisoformat(partition).replace(tzinfo=dt.UTC)
    return int((day + dt.timedelta(minutes=minute)).timestamp())


def row(partition: str, minute: int, *, device="device-01", co="0.005", temp="21.5", ts=None) -> str:
    ts = epoch(partition, minute) if ts is None else ts
    return f"{ts},{device},{co},50,true,0.007,0,0.02,{temp},\n"


def good_rows(partition: str, n: int, start: int = 0) -> str:
    return "".join(row(partition, start + i) for i in range(n))


def land(store, partition: str, text: str | bytes, filename: str = "delivery.csv") -> str:
    data = text.encode() if isinstance(text, str) else text
    return lake.land_bytes(store, DATASET, partition, filename, data)


def build(store, partition: str):
    """Bronze for the delivery, then silver for every event-date partition it touched."""
    quiet = lambda _msg: None  # noqa: E731
    run = f"test-{partition}"
    bronze = lake.build_bronze(partition, run, dataset=DATASET, store=store, progress=quiet)
    silver = {
        day: lake.build_silver(day, run, dataset=DATASET, store=store, progress=quiet) for day in bronze.partitions
    }
    return bronze, silver


def lake_tables(store, partition: str) -> tuple[pa.Table, list[dict]]:
    silver = storage.read_partition(store, "silver", DATASET, partition)
    quarantine = storage.read_partition(store, "quarantine", DATASET, partition).to_pylist()
    return silver, quarantine


def assert_clear_bronze_error(err: BronzeError, key: str, line: int | None, rule: str) -> str:
    message = str(err)
    assert isinstance(err, ValueError)
    assert key in message, message
    assert f"[rule {rule}]" in message and err.rule == rule, message
    if line is not None:
        assert f"line {line}" in message and err.line == line, message
    return message


def by_rule(quarantine: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for q in quarantine:
        out.setdefault(q["rule"], []).append(q)
    return out


# ------------------------------------------------------------------------------------------ classes


def test_malformed_lines_are_quarantined_and_good_rows_kept(store):
    p = "2020-03-01"
    text = HEADER + good_rows(p, 2) + "1583020920,device-01,0.1\n" + good_rows(p, 2, start=3)
    land(store, p, text)
    bronze, _ = build(store, p)
    silver, quarantine = lake_tables(store, p)
    assert bronze.rows == 5 and silver.num_rows == 4
    (bad,) = quarantine
    assert bad["rule"] == "parse_error" and bad["_source_line"] == "4"
    assert "expected 10 fields, found 3" in bad["reason"]


def test_wrong_delimiter_names_the_delimiter_file_and_line(store):
    p = "2020-03-02"
    key = land(store, p, (HEADER + good_rows(p, 3)).replace(",", ";"))
    with pytest.raises(BronzeError) as err:
        build(store, p)
    message = assert_clear_bronze_error(err.value, key, 1, "delimiter")
    assert "uses ';' but contract 'iot_telemetry' expects ','" in message
    assert "missing column" not in message
    assert storage.read_manifest(store, "bronze", DATASET, p) is None


def test_missing_required_column_is_a_clear_error(store):
    p = "2020-03-03"
    text = "ts,device,co,humidity,light,lpg,motion,smoke\n" + f"{epoch(p)},device-01,0.005,50,true,0.007,0,0.02\n"
    key = land(store, p, text)
    with pytest.raises(BronzeError) as err:
        build(store, p)
    assert "['temp']" in assert_clear_bronze_error(err.value, key, 1, "required_columns")


def test_unknown_extra_column_is_kept_in_bronze_ignored_by_silver_and_warned(store):
    p = "2020-03-04"
    text = (
        HEADER.rstrip("\n")
        + ",firmware\n"
        + "".join(r.rstrip("\n") + ",v1.2\n" for r in good_rows(p, 3).splitlines(True))
    )
    land(store, p, text)
    bronze_report, _ = build(store, p)
    bronze = storage.read_partition(store, "bronze", DATASET, p)
    assert bronze["firmware"].to_pylist() == ["v1.2"] * 3
    silver, quarantine = lake_tables(store, p)
    assert silver.num_rows == 3 and "firmware" not in silver.column_names and not quarantine
    report = lake.read_quality("bronze", [p], dataset=DATASET, store=store)[p]
    (warning,) = [o for o in report["outcomes"] if not o["success"]]
    assert warning["severity"] == "warning" and warning["examples"][0]["unexpected"] == ["firmware"]
    assert bronze_report.quality["success"] is True


def test_wrong_types_are_quarantined_with_value_and_line(store):
    p = "2020-03-05"
    land(store, p, HEADER + good_rows(p, 2) + row(p, 2, temp="warm") + row(p, 3, ts="yesterday"))
    build(store, p)
    silver, quarantine = lake_tables(store, p)
    rules = by_rule(quarantine)
    assert silver.num_rows == 2
    assert (
        rules["type:temp"][0]["_source_line"] == "4"
        and "'warm' is not a valid float64" in rules["type:temp"][0]["reason"]
    )
    assert "'yesterday'" in rules["type:ts"][0]["reason"]


def test_empty_file_is_a_clear_error(store):
    p = "2020-03-06"
    key = land(store, p, b"")
    with pytest.raises(BronzeError) as err:
        build(store, p)
    assert "empty" in assert_clear_bronze_error(err.value, key, None, "not_empty")


def test_header_only_is_a_clear_error(store):
    p = "2020-03-07"
    key = land(store, p, HEADER)
    with pytest.raises(BronzeError) as err:
        build(store, p)
    assert "header only" in assert_clear_bronze_error(err.value, key, 1, "has_rows")


def test_nan_and_infinity_are_quarantined(store):
    p = "2020-03-08"
    land(
        store,
        p,
        HEADER + good_rows(p, 2) + row(p, 2, temp="NaN") + row(p, 3, co="inf") + row(p, 4, co="-Infinity"),
    )
    build(store, p)
    silver, quarantine = lake_tables(store, p)
    rules = by_rule(quarantine)
    assert silver.num_rows == 2
    assert [q["_source_line"] for q in rules["not_null:temp"]] == ["4"]
    assert [q["_source_line"] for q in rules["finite:co"]] == ["5", "6"]
    assert "infinite" in rules["finite:co"][0]["reason"]


def test_out_of_range_values_are_quarantined_with_the_contract_range(store):
    p = "2020-03-09"
    land(store, p, HEADER + good_rows(p, 3) + row(p, 3, temp="300") + row(p, 4, co="-0.5"))
    build(store, p)
    silver, quarantine = lake_tables(store, p)
    rules = by_rule(quarantine)
    assert silver.num_rows == 3
    assert "temp=300.0 outside physical range [-40, 125] celsius" in rules["range:temp"][0]["reason"]
    assert rules["range:co"][0]["_source_line"] == "6"


def test_duplicated_rows_collapse_or_quarantine_and_no_row_is_lost(store):
    p = "2020-03-10"
    exact = row(p, 1)
    conflicting = row(p, 2, temp="22.0")
    land(store, p, HEADER + good_rows(p, 3) + exact + conflicting)
    bronze, _ = build(store, p)
    silver, quarantine = lake_tables(store, p)
    (dup,) = quarantine
    assert dup["rule"] == "duplicate_key" and "kept the later delivery" in dup["reason"]
    # 5 delivered rows: 3 readings in silver, 1 conflicting copy quarantined, 1 identical copy collapsed
    assert (bronze.rows, silver.num_rows, len(quarantine)) == (5, 3, 1)
    temps = dict(zip(silver["ts"].to_pylist(), silver["temp"].to_pylist(), strict=True))
    assert temps[dt.datetime.fromtimestamp(epoch(p, 2), dt.UTC)] == 22.0  # later delivery wins


def test_future_and_other_day_timestamps_are_routed_or_quarantined(store):
    """A reading of another day goes to that day's event-date partition (nothing lost); one from the
    future goes to its (future) partition too and is quarantined there as `future_timestamp`."""
    p = "2020-05-01"
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=3)
    next_day = epoch(p, 24 * 60 + 5)
    land(store, p, HEADER + good_rows(p, 2) + row(p, 0, ts=int(future.timestamp())) + row(p, 0, ts=next_day))
    bronze, _ = build(store, p)
    future_day = future.date().isoformat()
    assert bronze.partitions == {p: 2, "2020-05-02": 1, future_day: 1}
    assert lake_tables(store, p)[0].num_rows == 2
    moved, quarantine = lake_tables(store, "2020-05-02")
    assert moved.num_rows == 1 and moved["_source_line"].to_pylist() == [5] and not quarantine
    silver, quarantine = lake_tables(store, future_day)
    (late,) = quarantine
    assert silver.num_rows == 0 and late["rule"] == "future_timestamp" and late["_source_line"] == "4"
    assert "check the device clock" in late["reason"]


def test_bytes_that_are_not_utf8_are_a_clear_error_naming_the_line(store):
    p = "2020-03-12"
    data = (HEADER + good_rows(p, 2)).encode() + row(p, 2, device="device-\xe9").encode("latin-1")
    key = land(store, p, data)
    with pytest.raises(BronzeError) as err:
        build(store, p)
    assert "not valid UTF-8" in assert_clear_bronze_error(err.value, key, 4, "utf8")


def test_gzip_compressed_input_is_read_transparently(store):
    p = "2020-03-13"
    land(store, p, gzip.compress((HEADER + good_rows(p, 4)).encode()), filename="delivery.csv.gz")
    bronze, _ = build(store, p)
    silver, quarantine = lake_tables(store, p)
    assert bronze.rows == 4 and silver.num_rows == 4 and not quarantine
    assert storage.read_partition(store, "bronze", DATASET, p)["_source_line"].to_pylist() == [2, 3, 4, 5]


def test_a_device_id_off_the_contracts_pattern_is_quarantined_and_good_rows_reach_silver(store):
    """The contract's device rule is matched in ASCII mode: 'device-٢' (an Arabic-Indic digit, which
    `\\d` accepts) and 'rogue 7' are quarantined with the rule; the partition passes its gate."""
    p = "2020-03-14"
    land(store, p, HEADER + good_rows(p, 3) + row(p, 3, device="device-\u0662") + row(p, 4, device="rogue 7"))
    lake.build_bronze(p, "gate", dataset=DATASET, store=store, progress=lambda _m: None)
    report = lake.build_silver(p, "gate", dataset=DATASET, store=store, progress=lambda _m: None)
    silver, quarantine = lake_tables(store, p)
    assert silver.num_rows == 3 and set(silver["device"].to_pylist()) == {"device-01"} and report.quality["success"]
    assert [(q["device"], q["rule"], q["_source_line"]) for q in quarantine] == [
        ("device-\u0662", "pattern:device", "5"),
        ("rogue 7", "pattern:device", "6"),
    ]
    assert "'device-\u0662' does not match the contract's device pattern" in quarantine[0]["reason"]
    assert lake.build_gold(p, "gate", dataset=DATASET, store=store, progress=lambda _m: None).rows_out == 3


def test_a_bad_device_id_in_a_bucket_worker_is_quarantined_and_the_other_buckets_publish(store):
    """Buckets checked in forked workers: the bad device's rows are quarantined in its bucket, and
    every good row of every bucket reaches silver."""
    p = "2020-03-16"
    rows = good_rows(p, 3) + "".join(row(p, i, device=f"device-{n:02d}") for n in (2, 3) for i in range(3))
    land(store, p, HEADER + rows + row(p, 3, device="device-\u0662"))
    lake.build_bronze(p, "gate", dataset=DATASET, store=store, progress=lambda _m: None)
    report = lake.build_silver(
        p, "gate", dataset=DATASET, store=store, progress=lambda _m: None, bucket_rows=3, workers=2
    )
    silver, quarantine = lake_tables(store, p)
    assert report.rows_in == 10 and silver.num_rows == 9 and report.quarantined == 1
    assert sorted(set(silver["device"].to_pylist())) == ["device-01", "device-02", "device-03"]
    assert [(q["device"], q["rule"]) for q in quarantine] == [("device-\u0662", "pattern:device")]
    # a file per good device's bucket; the bad device's bucket had no silver row to write
    assert len(storage.read_manifest(store, "silver", DATASET, p).files) == 3


def test_cli_prints_one_clear_line_for_a_users_mistake(store, settings):
    p = "2020-03-15"
    land(store, p, (HEADER + good_rows(p, 2)).replace(",", ";"))
    env = os.environ | settings.client_env()
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "layer", "bronze", p, "--dataset", DATASET],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if "uses ';'" in line]
    assert len(errors) == 1 and "[rule delimiter]" in errors[0], out.stderr


def test_one_gigabyte_file_streams_in_bounded_memory(tmp_path):
    """~1 GB of valid CSV, generated on disk, parsed batch by batch: never held in memory at once."""
    from pipelines.contracts import load_contract

    p = "2020-03-16"
    block = (HEADER + good_rows(p, 100_000)).encode()
    body = block[len(HEADER) :]
    path = tmp_path / "big.csv"
    target = 1_000_000_000
    with open(path, "wb") as f:
        f.write(HEADER.encode())
        written = 0
        while written < target:
            f.write(body)
            written += len(body)
    expected_rows = (written // len(body)) * 100_000
    baseline = pa.total_allocated_bytes()
    peak, rows, last_line = 0, 0, 0
    with open(path, "rb") as f:
        for batch in iter_landing_batches(
            f,
            source_key=str(path),
            source_etag="local",
            run_id="big",
            ingested_at=dt.datetime.now(dt.UTC),
            contract=load_contract("iot_telemetry"),
        ):
            rows += batch.num_rows
            last_line = batch["_source_line"][-1].as_py()
            peak = max(peak, pa.total_allocated_bytes() - baseline)
            del batch
    assert rows == expected_rows and last_line == expected_rows + 1
    assert peak < 400 * 2**20, f"peak Arrow memory {peak / 2**20:.0f} MiB for a {written / 1e9:.1f} GB file"
    print(json.dumps({"rows": rows, "bytes": written, "peak_arrow_mib": round(peak / 2**20)}))
