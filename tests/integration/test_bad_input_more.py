"""More bad input from a hostile but fair user, through the real object store and lake jobs.

Each case asserts its exact outcome (quarantined rows with rule and reason, a file quarantined as
a file, a delivery kept beside another) and that every good row reached silver. Each test owns its
partition dates (past dates) under its own dataset variant, so tests never see each other's files.
"""

from __future__ import annotations

import gzip
import json

import pytest

from pipelines import storage
from pipelines.jobs import lake
from tests.integration.test_bad_input import HEADER, by_rule, epoch, good_rows, row

DATASET = "iot_telemetry.bad_input_more"
QUIET = lambda _msg: None  # noqa: E731


def land(store, partition: str, text: str | bytes, filename: str = "delivery.csv") -> str:
    data = text.encode() if isinstance(text, str) else text
    return lake.land_bytes(store, DATASET, partition, filename, data)


def build(store, partition: str, *, gold: bool = False, messages: list[str] | None = None):
    """Bronze for the delivery, then silver (and gold) for every partition it touched."""
    say = messages.append if messages is not None else QUIET
    run = f"more-{partition}"
    bronze = lake.build_bronze(partition, run, dataset=DATASET, store=store, progress=say)
    silver = {d: lake.build_silver(d, run, dataset=DATASET, store=store, progress=say) for d in bronze.partitions}
    golds = {d: lake.build_gold(d, run, dataset=DATASET, store=store, progress=say) for d in silver} if gold else {}
    return bronze, silver, golds


def silver_rows(store, partition: str) -> int:
    return storage.read_partition(store, "silver", DATASET, partition).num_rows


def quarantine(store, partition: str) -> list[dict]:
    return storage.read_partition(store, "quarantine", DATASET, partition).to_pylist()


def test_epoch_milliseconds_and_clock_resets_are_quarantined_not_filed_under_absurd_dates(store):
    p = "2021-02-01"
    ms = [row(p, 10 + i, ts=epoch(p, 10 + i) * 1000) for i in range(3)]
    text = HEADER + good_rows(p, 5) + "".join(ms) + row(p, 20, ts=0) + row(p, 21, ts=3600)
    land(store, p, text)
    bronze, silver, _ = build(store, p)
    assert bronze.partitions == {p: 10}  # no 58181-12-20, no 1970-01-01
    assert silver_rows(store, p) == 5
    rules = by_rule(quarantine(store, p))
    assert sorted(rules) == ["plausible_time:ts"]
    reasons = [q["reason"] for q in rules["plausible_time:ts"]]
    assert sum("looks like epoch milliseconds" in r and "declares epoch_seconds" in r for r in reasons) == 3
    assert sum("before the contract's earliest plausible time 2000-01-01" in r for r in reasons) == 2
    assert [q["_source_line"] for q in rules["plausible_time:ts"]] == ["7", "8", "9", "10", "11"]


def test_a_whole_delivery_in_milliseconds_is_quarantined_and_gold_skips_the_empty_partition(store):
    p = "2021-02-02"
    land(store, p, HEADER + "".join(row(p, i, ts=epoch(p, i) * 1000) for i in range(4)))
    messages: list[str] = []
    bronze, silver, gold = build(store, p, gold=True, messages=messages)
    assert bronze.partitions == {p: 4} and silver[p].rows_out == 0 and silver[p].quarantined == 4
    assert gold[p].rows_out == 0 and storage.read_manifest(store, "gold", DATASET, p) is None
    assert any("no silver rows" in m and p in m for m in messages), messages


def test_one_future_reading_does_not_fail_the_run(store):
    """The future reading's partition holds only quarantined rows: silver publishes it empty, gold
    skips it with a message, and the good day's gold is built."""
    import datetime as dt

    p = "2021-02-03"
    future = int((dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).timestamp())
    land(store, p, HEADER + good_rows(p, 30) + row(p, 0, ts=future))
    messages: list[str] = []
    bronze, silver, gold = build(store, p, gold=True, messages=messages)
    future_day = dt.datetime.fromtimestamp(future, dt.UTC).date().isoformat()
    assert bronze.partitions == {p: 30, future_day: 1}
    assert silver_rows(store, p) == 30 and silver_rows(store, future_day) == 0
    assert [q["rule"] for q in quarantine(store, future_day)] == ["future_timestamp"]
    assert gold[p].rows_out == 30 and gold[future_day].rows_out == 0
    assert any("gold" in m and future_day in m and "skipped" in m for m in messages), messages


def test_a_truncated_gzip_is_quarantined_as_a_file_and_the_rest_of_the_delivery_proceeds(store):
    p = "2021-02-04"
    body = (HEADER + good_rows(p, 1440)).encode()
    broken = gzip.compress(body)[:-2000]  # cut: "Compressed file ended before the end-of-stream marker"
    bad_key = land(store, p, broken, filename="a-truncated.csv.gz")
    land(store, p, HEADER + "".join(row(p, i, device="device-02") for i in range(20)), filename="b-good.csv")
    bronze, silver, _ = build(store, p)
    assert silver_rows(store, p) == 20 and bronze.rows == 20 and bronze.partitions == {p: 20}
    (bad,) = bronze.quarantined_files
    assert bad["file"].endswith(bad_key) and bad["rule"] == "gzip" and "corrupt" in bad["reason"]
    stored = store.get_bytes(
        store.settings.lake_bucket, f"quarantine/{DATASET}/_files/delivery={p}/a-truncated.csv.gz.json"
    )
    assert json.loads(stored) == bad
    assert storage.read_manifest(store, "bronze", DATASET, p).extra["sources"] == [bronze.files[0]]
    # a dataset that says a bad file stops the run
    with pytest.raises(ValueError, match=r"a-truncated\.csv\.gz.*\[rule gzip\]"):
        lake.build_bronze(p, "stop", dataset=DATASET, store=store, progress=QUIET, on_bad_file="stop")


def test_cr_only_line_endings_are_read_as_lines(store):
    p = "2021-02-05"
    land(store, p, (HEADER + good_rows(p, 6)).replace("\n", "\r"))
    bronze, _, _ = build(store, p)
    assert bronze.rows == 6 and silver_rows(store, p) == 6 and not quarantine(store, p)
    lines = storage.read_partition(store, "bronze", DATASET, p)["_source_line"].to_pylist()
    assert sorted(lines) == [2, 3, 4, 5, 6, 7]


def test_quoted_comma_and_newline_and_whitespace_only_lines_go_through(store):
    p = "2021-02-06"
    quoted = row(p, 5).rstrip("\n") + '"stuck, then\nreset"\n'
    text = HEADER + good_rows(p, 5) + quoted + "   \n" + good_rows(p, 5, start=6) + " \t\n"
    land(store, p, text)
    bronze, _, _ = build(store, p)
    silver = storage.read_partition(store, "silver", DATASET, p)
    assert bronze.rows == 11 and silver.num_rows == 11 and not quarantine(store, p)
    labels = dict(zip(silver["_source_line"].to_pylist(), silver["label"].to_pylist(), strict=True))
    assert labels[7] == "stuck, then\nreset" and labels[10] == "normal"  # line 9 is the blank one


def test_a_bad_device_id_is_quarantined_and_the_partition_passes_its_gate(store):
    p = "2021-02-07"
    nul, huge = "device-01\x00", "device-" + "9" * 10_000
    land(store, p, HEADER + good_rows(p, 117) + row(p, 200, device=nul) + row(p, 201, device=huge))
    build(store, p)
    assert silver_rows(store, p) == 117
    rules = by_rule(quarantine(store, p))
    assert sorted(rules) == ["max_length:device", "printable:device"]
    assert "'device-01\\x00' holds control or other unprintable characters" in rules["printable:device"][0]["reason"]
    assert "(10007 characters) is longer than 200 characters" in rules["max_length:device"][0]["reason"]


def test_landing_a_name_twice_keeps_both_deliveries(store):
    p = "2021-02-08"
    first, second = HEADER + good_rows(p, 3), HEADER + good_rows(p, 3, start=3)
    keys = [land(store, p, first), land(store, p, second), land(store, p, first), land(store, p, second)]
    prefix = storage.landing_prefix(DATASET, p)
    assert keys == [prefix + "delivery.csv", prefix + "delivery.2.csv", keys[0], keys[1]]
    assert store.get_bytes(store.settings.landing_bucket, keys[0]) == first.encode()
    assert store.get_bytes(store.settings.landing_bucket, keys[1]) == second.encode()
    bronze, _, _ = build(store, p)
    assert bronze.rows == 6 and silver_rows(store, p) == 6
