"""Lake guarantees on the real object store: event-date partitioning, late data, idempotence, contracts."""

from __future__ import annotations

import datetime as dt
import io

import pandas as pd
import pytest

from pipelines import storage
from pipelines.jobs import lake

DATASET = "iot_telemetry.lake_tests"  # same contract as production, its own lake prefix


def _csv(rows: list[tuple]) -> bytes:
    frame = pd.DataFrame(rows, columns=["ts", "device", "co", "humidity", "light", "lpg", "motion", "smoke", "temp"])
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue().encode()


def _epoch(day: str, minute: int) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()) + 60 * minute


def _readings(day: str, minutes: range, device: str = "device-01", temp: float = 21.0) -> list[tuple]:
    return [(_epoch(day, m), device, 0.004, 50.0, "true", 0.007, "false", 0.02, temp + m / 100) for m in minutes]


def _run(delivery: str, store, run_id: str) -> lake.BronzeReport:
    report = lake.build_bronze(delivery, run_id, dataset=DATASET, store=store, progress=lambda s: None)
    for p in report.partitions:
        lake.build_silver(p, run_id, dataset=DATASET, store=store, progress=lambda s: None)
    for p in lake.gold_targets(list(report.partitions), dataset=DATASET, store=store):
        lake.build_gold(p, run_id, dataset=DATASET, store=store, progress=lambda s: None)
    return report


@pytest.fixture(scope="module")
def two_deliveries(store):
    # Delivery of 2025-03-01: that day's readings. Delivery of 2025-03-02: its own day plus
    # readings from 2025-03-01 that arrived late (a gateway was offline).
    lake.land_bytes(store, DATASET, "2025-03-01", "a.csv", _csv(_readings("2025-03-01", range(0, 60))))
    late = _readings("2025-03-01", range(60, 90), temp=22.0)
    lake.land_bytes(store, DATASET, "2025-03-02", "b.csv", _csv(_readings("2025-03-02", range(0, 40)) + late))
    first = _run("2025-03-01", store, "run-1")
    second = _run("2025-03-02", store, "run-2")
    return first, second


def test_records_are_filed_by_event_date_and_late_data_merges(two_deliveries, store):
    first, second = two_deliveries
    assert first.partitions == {"2025-03-01": 60}
    assert second.partitions == {"2025-03-01": 30, "2025-03-02": 40}
    silver = storage.read_partition(store, "silver", DATASET, "2025-03-01").to_pandas()
    assert len(silver) == 90 and silver["ts"].is_monotonic_increasing
    assert storage.read_partition(store, "silver", DATASET, "2025-03-02").num_rows == 40
    # Bronze keeps one batch per delivery in the event-date partition's manifest.
    manifest = storage.read_manifest(store, "bronze", DATASET, "2025-03-01")
    assert {f["batch"] for f in manifest.files} == {"delivery=2025-03-01", "delivery=2025-03-02"}
    # Gold for the late day was rebuilt with the late readings.
    assert storage.read_manifest(store, "gold", DATASET, "2025-03-01").rows == 90


def test_rerunning_a_delivery_replaces_exactly_its_records(two_deliveries, store):
    before = {
        p: storage.read_manifest(store, "silver", DATASET, p).content_sha256 for p in ("2025-03-01", "2025-03-02")
    }
    for attempt in range(2):
        _run("2025-03-02", store, f"rerun-{attempt}")
    after = {p: storage.read_manifest(store, "silver", DATASET, p) for p in ("2025-03-01", "2025-03-02")}
    assert {p: m.content_sha256 for p, m in after.items()} == before
    assert after["2025-03-01"].rows == 90 and after["2025-03-02"].rows == 40
    bronze = storage.read_manifest(store, "bronze", DATASET, "2025-03-01")
    assert bronze.rows == 90, "a re-delivered batch must replace, not duplicate"


def test_redelivered_correction_wins_over_the_original(two_deliveries, store):
    # The vendor re-sends 2025-03-01 minute 5 with a corrected value in a later delivery.
    fixed = [(_epoch("2025-03-01", 5), "device-01", 0.004, 50.0, "true", 0.007, "false", 0.02, 30.5)]
    lake.land_bytes(store, DATASET, "2025-03-03", "fix.csv", _csv(fixed + _readings("2025-03-03", range(0, 10))))
    _run("2025-03-03", store, "run-3")
    silver = storage.read_partition(store, "silver", DATASET, "2025-03-01").to_pandas()
    assert len(silver) == 90
    row = silver[silver["ts"] == pd.Timestamp(_epoch("2025-03-01", 5), unit="s", tz="UTC")]
    assert row["temp"].tolist() == [30.5]


def test_unreadable_timestamps_stay_with_their_delivery_and_are_quarantined(store):
    rows = _readings("2025-04-01", range(0, 10)) + [
        ("not-a-time", "device-01", 0.004, 50.0, "true", 0.007, "false", 0.02, 21.0)
    ]
    lake.land_bytes(store, DATASET, "2025-04-01", "c.csv", _csv(rows))
    report = _run("2025-04-01", store, "run-4")
    assert report.partitions == {"2025-04-01": 11}
    quarantine = storage.read_partition(store, "quarantine", DATASET, "2025-04-01").to_pandas()
    assert len(quarantine) == 1 and quarantine["rule"].iloc[0].endswith("ts")
    assert storage.read_partition(store, "silver", DATASET, "2025-04-01").num_rows == 10


def test_nab_file_ingests_through_its_contract_alone(store, nab_csv):
    """Real industrial data of another shape (`timestamp,value`, Fahrenheit): no code, only a contract."""
    dataset = "nab_machine_temperature"
    lake.land_bytes(store, dataset, "2014-02-19", nab_csv.name, nab_csv.read_bytes())
    report = lake.build_bronze("2014-02-19", "nab-run", dataset=dataset, store=store, progress=lambda s: None)
    assert sum(report.partitions.values()) == 22_695
    # a long history: monthly partitions (params.yaml datasets.nab_machine_temperature.grain)
    assert sorted(report.partitions) == ["2013-12-01", "2014-01-01", "2014-02-01"]
    silver_rows = quarantined = 0
    for p in report.partitions:
        r = lake.build_silver(p, "nab-run", dataset=dataset, store=store, progress=lambda s: None)
        silver_rows += r.rows_out
        quarantined += r.quarantined
    # The file repeats one hour on 2014-01-07 with different values: the later copy wins.
    assert (silver_rows, quarantined) == (22_683, 12)
    silver = storage.read_partition(store, "silver", dataset, "2014-01-01").to_pandas()
    assert silver["device"].unique().tolist() == ["machine_temperature"]
    assert 15 < silver["temp"].median() < 45  # Celsius after the contract's unit conversion


def test_csv_gzip_csv_and_json_lines_deliveries_give_the_same_silver(store):
    """Landing accepts CSV, gzip-compressed CSV and JSON lines (maybe gzipped); bronze keeps each as
    delivered, and silver is the same whatever the format."""
    import gzip
    import json

    rows = _readings("2025-05-01", range(0, 30))
    header = ["ts", "device", "co", "humidity", "light", "lpg", "motion", "smoke", "temp"]
    records = [dict(zip(header, r, strict=True)) for r in rows]
    for r in records:  # JSON producers send real booleans
        r["light"], r["motion"] = r["light"] == "true", r["motion"] == "true"
    jsonl = "\n".join(json.dumps(r) for r in records).encode() + b"\n"
    deliveries = {
        "csv": ("d.csv", _csv(rows)),
        "gzip-csv": ("d.csv.gz", gzip.compress(_csv(rows))),
        "jsonl": ("d.jsonl", jsonl),
        "gzip-jsonl": ("d.jsonl.gz", gzip.compress(jsonl)),
    }
    silvers = {}
    for variant, (name, data) in deliveries.items():
        dataset = f"iot_telemetry.formats_{variant.replace('-', '_')}"
        lake.land_bytes(store, dataset, "2025-05-01", name, data)
        report = lake.build_bronze("2025-05-01", "fmt", dataset=dataset, store=store, progress=lambda s: None)
        assert report.partitions == {"2025-05-01": 30}, variant
        lake.build_silver("2025-05-01", "fmt", dataset=dataset, store=store, progress=lambda s: None)
        silver = storage.read_partition(store, "silver", dataset, "2025-05-01").to_pandas()
        silvers[variant] = silver.drop(columns=["_source_key", "_source_line"])
        bronze = storage.read_partition(store, "bronze", dataset, "2025-05-01").to_pandas()
        assert bronze["_source_line"].tolist() == list(range(2, 32) if "csv" in variant else range(1, 31))
    for variant, frame in silvers.items():
        pd.testing.assert_frame_equal(frame, silvers["csv"], check_dtype=False, obj=variant)


def test_malformed_json_line_is_quarantined_with_its_line(store):
    dataset = "iot_telemetry.formats_bad_json"
    good = {
        "ts": _epoch("2025-05-02", 0),
        "device": "device-01",
        "co": 0.004,
        "humidity": 50.0,
        "light": True,
        "lpg": 0.007,
        "motion": False,
        "smoke": 0.02,
        "temp": 21.0,
    }
    import json

    data = (json.dumps(good) + "\n{not json\n").encode()
    lake.land_bytes(store, dataset, "2025-05-02", "bad.jsonl", data)
    lake.build_bronze("2025-05-02", "fmt", dataset=dataset, store=store, progress=lambda s: None)
    lake.build_silver("2025-05-02", "fmt", dataset=dataset, store=store, progress=lambda s: None)
    quarantine = storage.read_partition(store, "quarantine", dataset, "2025-05-02").to_pandas()
    assert quarantine["rule"].tolist() == ["parse_error"] and quarantine["_source_line"].astype(int).tolist() == [2]
    assert storage.read_partition(store, "silver", dataset, "2025-05-02").num_rows == 1


def test_device_buckets_give_the_same_silver_and_gold_as_one_pass(store):
    """Bounded memory: silver and gold work through a partition in buckets of whole devices.
    With a bucket of ~1 device the content must equal one pass over the partition, including
    a duplicate resolved across deliveries, quarantined rows and warm-up from the previous day."""
    dataset = "iot_telemetry.bucket_tests"
    rows = []
    for i, device in enumerate(["device-03", "device-01", "device-02"]):
        rows += _readings("2025-04-01", range(0, 50), device=device, temp=20.0 + i)
    rows.append((_epoch("2025-04-01", 5), "device-02", 0.004, 50.0, "true", 0.007, "false", 0.02, 999.0))
    lake.land_bytes(store, dataset, "2025-04-01", "a.csv", _csv(rows))
    late = [r for r in _readings("2025-04-01", range(10, 12), device="device-01", temp=30.0)]
    today = _readings("2025-04-02", range(0, 30), device="device-01") + _readings(
        "2025-04-02", range(0, 30), "device-02"
    )
    lake.land_bytes(store, dataset, "2025-04-02", "b.csv", _csv(today + late))

    def build(bucket_rows: int | None, run: str, workers: int = 1) -> dict[str, pd.DataFrame]:
        out = {}
        for delivery in ("2025-04-01", "2025-04-02"):
            report = lake.build_bronze(
                delivery, f"{run}-{delivery}", dataset=dataset, store=store, progress=lambda s: None
            )
            options = dict(
                dataset=dataset, store=store, progress=lambda s: None, bucket_rows=bucket_rows, workers=workers
            )
            for p in report.partitions:
                lake.build_silver(p, run, **options)
            for p in lake.gold_targets(list(report.partitions), dataset=dataset, store=store):
                lake.build_gold(p, run, **options)
        for layer in ("silver", "quarantine", "gold"):
            for p in ("2025-04-01", "2025-04-02"):
                out[f"{layer}/{p}"] = storage.read_partition(store, layer, dataset, p).to_pandas()
        out["files"] = len(storage.read_manifest(store, "gold", dataset, "2025-04-01").files)
        return out

    one_pass = build(None, "one-pass")
    bucketed = build(40, "bucketed")
    # the buckets side by side in 2 forked workers: the same files, in the same order
    forked = build(40, "forked", workers=2)
    assert one_pass["files"] == 1 and bucketed["files"] == 3 and forked["files"] == 3  # a bucket per device
    for name, frame in one_pass.items():
        if name == "files":
            continue
        for other in (bucketed[name], forked[name]):
            if name.startswith("quarantine"):
                # which ingestion run and when: the builds are separate runs, by design
                frame = frame.drop(columns=[c for c in frame.columns if c.startswith("_ingest")])
                other = other.drop(columns=[c for c in other.columns if c.startswith("_ingest")])
            pd.testing.assert_frame_equal(frame, other, check_exact=True, obj=name)
    assert len(one_pass["quarantine/2025-04-01"]) == 3  # the out-of-range reading, 2 superseded by late ones
    assert len(one_pass["silver/2025-04-01"]) == 150 and one_pass["gold/2025-04-02"]["device"].is_monotonic_increasing


def test_a_backfill_of_the_original_never_reverts_its_correction(store):
    """Which record wins is decided by delivery order, not by when a run executed: the original
    (delivered 2025-06-01) re-run after its correction (delivered 2025-06-02) stays superseded in
    silver and gold; of two files landed under one name the same day, the second (`.2`) wins."""
    dataset = "iot_telemetry.backfill_tests"
    day = "2025-06-01"
    at = pd.Timestamp(_epoch(day, 5), unit="s", tz="UTC")
    lake.land_bytes(store, dataset, day, "a.csv", _csv(_readings(day, range(0, 30), temp=21.0)))
    fixed = [(_epoch(day, 5), "device-01", 0.004, 50.0, "true", 0.007, "false", 0.02, 30.5)]
    lake.land_bytes(store, dataset, "2025-06-02", "fix.csv", _csv(fixed))

    def run(delivery: str, run_id: str) -> None:
        report = lake.build_bronze(delivery, run_id, dataset=dataset, store=store, progress=lambda s: None)
        for p in report.partitions:
            lake.build_silver(p, run_id, dataset=dataset, store=store, progress=lambda s: None)
            lake.build_gold(p, run_id, dataset=dataset, store=store, progress=lambda s: None)

    def temp_at(layer: str) -> list[float]:
        frame = storage.read_partition(store, layer, dataset, day).to_pandas()
        return frame.loc[frame["ts"] == at, "temp"].tolist()

    run(day, "original")
    run("2025-06-02", "correction")
    assert temp_at("silver") == [30.5] and temp_at("gold") == [30.5]
    run(day, "backfill-of-the-original")  # executes last, delivered first
    assert temp_at("silver") == [30.5] and temp_at("gold") == [30.5]
    (superseded,) = storage.read_partition(store, "quarantine", dataset, day).to_pylist()
    assert superseded["rule"] == "duplicate_key" and superseded["temp"] == "21.05"
    assert f"kept the later delivery s3://landing/{dataset}/2025-06-02/fix.csv" in superseded["reason"]
    # Same delivery date, same name, other bytes: kept beside the first as a.2.csv, and it wins over
    # a.csv (which sorts after it by name), but not over the later delivery date's correction.
    again = [(_epoch(day, m), "device-01", 0.004, 50.0, "true", 0.007, "false", 0.02, 19.0) for m in (5, 6)]
    assert lake.land_bytes(store, dataset, day, "a.csv", _csv(again)).endswith(f"{day}/a.2.csv")
    run(day, "second-copy")
    assert temp_at("silver") == [30.5]
    silver = storage.read_partition(store, "silver", dataset, day).to_pandas()
    assert silver.loc[silver["ts"] == at + pd.Timedelta(minutes=1), "temp"].tolist() == [19.0]


def test_training_reads_gold_within_the_configured_bound_and_says_what_it_left_out(two_deliveries, store):
    """read_gold keeps the newest partitions whole while they fit in train.sample.max_rows, else whole
    devices of the newest; the snapshot (logged with the training run) records the sample."""
    days = ["2025-03-01", "2025-03-02"]  # other tests of this module add later partitions
    everything, snap = lake.read_gold(days, dataset=DATASET, store=store, max_rows=0)
    assert len(everything) == 130 and snap["sample"]["partitions_left_out"] == []
    newest, snap = lake.read_gold(days, dataset=DATASET, store=store, max_rows=100)
    assert list(snap["partitions"]) == ["2025-03-02"] and len(newest) == 40
    assert snap["sample"] == {
        "rule": "latest_partitions",
        "max_rows": 100,
        "rows_available": 130,
        "rows_read": 40,
        "partitions_available": 2,
        "partitions_left_out": ["2025-03-01"],
    }
    # the newest alone is over the bound: whole devices of it (here its one device), never a cut device
    part, snap = lake.read_gold(days, dataset=DATASET, store=store, max_rows=10)
    assert len(part) == 40 and snap["partitions"]["2025-03-02"]["devices_read"] == 1
    # the gate re-reads the partitions training read: the same rows
    again, _ = lake.read_gold(list(snap["partitions"]), dataset=DATASET, store=store, max_rows=10)
    pd.testing.assert_frame_equal(part, again)
