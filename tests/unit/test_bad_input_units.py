"""Bad input on tiny files, without servers: streaming bronze, delimiter sniffing, one rule definition."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io

import pandas as pd
import pytest

from pipelines.contracts import load_contract
from pipelines.layers.bronze import BronzeError, iter_landing_batches, parse_landing_csv
from pipelines.layers.silver import silver_rules, to_silver
from pipelines.quality import build_suite

IOT = load_contract("iot_telemetry")
AT = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)
HEADER = b"ts,device,co,humidity,light,lpg,motion,smoke,temp,fault\n"


def row(ts=1767571200, temp="21.5") -> bytes:
    return f"{ts},device-01,0.005,50,true,0.007,0,0.02,{temp},\n".encode()


def parse(data: bytes, block_size: int = 1 << 20, key: str = "s3://landing/iot_telemetry/2026-01-05/a.csv"):
    return parse_landing_csv(
        data, source_key=key, source_etag="e", run_id="r", ingested_at=AT, contract=IOT, block_size=block_size
    )


def test_streaming_batches_keep_physical_line_numbers_across_blocks():
    rows = [row(1767571200 + 60 * i) for i in range(2000)]
    rows[500] = b"1767571200,device-01,0.1\n"  # malformed, line 502
    data = b"\n" + HEADER + b"".join(rows[:1000]) + b"\n\n" + b"".join(rows[1000:])
    batches = list(
        iter_landing_batches(
            io.BytesIO(data),
            source_key="k",
            source_etag="e",
            run_id="r",
            ingested_at=AT,
            contract=IOT,
            block_size=4096,
        )
    )
    assert len(batches) > 10
    lines = [line for b in batches for line in b["_source_line"].to_pylist()]
    expected = list(range(3, 1003)) + list(range(1005, 2005))  # header on line 2, blank lines 1003-1004
    assert lines == expected
    errors = {
        line: e
        for b in batches
        for line, e in zip(b["_source_line"].to_pylist(), b["_parse_error"].to_pylist(), strict=True)
        if e
    }
    assert list(errors) == [503] and "found 3" in errors[503]


def test_streaming_and_whole_file_parsing_agree():
    data = HEADER + b"".join(row(1767571200 + 60 * i) for i in range(300)) + b"1,2\n"
    small, large = parse(data, block_size=2048), parse(data)
    assert small.drop(["_ingested_at"]).equals(large.drop(["_ingested_at"]))


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_wrong_delimiter_is_named(delimiter):
    data = (HEADER + row()).replace(b",", delimiter.encode())
    with pytest.raises(BronzeError) as err:
        parse(data, key="landing/x.csv")
    message = str(err.value)
    assert f"file landing/x.csv uses {delimiter!r} but contract 'iot_telemetry' expects ','" in message
    assert err.value.rule == "delimiter" and err.value.line == 1


def test_utf8_error_names_the_line_even_in_a_later_block():
    data = HEADER + b"".join(row(1767571200 + 60 * i) for i in range(5000)) + b"17675,dev\xff\n"
    with pytest.raises(BronzeError, match=r"line 5002 is not valid UTF-8 \(byte 0xff\)"):
        parse(data)


def test_corrupt_gzip_is_a_clear_error():
    with pytest.raises(BronzeError, match=r"gzip-compressed but is corrupt.*\[rule gzip\]"):
        parse(b"\x1f\x8b\x08\x00garbage")


def test_outside_partition_rule_quarantines_rows_of_another_day():
    data = HEADER + row(1767571200) + row(1767571200 + 86_400)  # 2026-01-05 and 2026-01-06
    silver, quarantine = to_silver(parse(data), IOT, now=AT + dt.timedelta(days=2), partition="2026-01-05")
    assert len(silver) == 1
    assert quarantine["rule"].tolist() == ["outside_partition"]
    silver, quarantine = to_silver(parse(data), IOT, now=AT + dt.timedelta(days=2), partition="2026-01-06")
    assert silver["ts"].tolist() == [pd.Timestamp("2026-01-06", tz="UTC")]
    silver, quarantine = to_silver(parse(data), IOT, now=AT + dt.timedelta(days=2))  # no partition: no check
    assert len(silver) == 2 and quarantine.empty


def test_changing_a_contract_range_changes_quarantine_and_gate_alike():
    narrowed = dataclasses.replace(
        IOT,
        columns=tuple(dataclasses.replace(c, range=(0.0, 30.0)) if c.name == "temp" else c for c in IOT.columns),
    )
    for contract, expected in ((IOT, (-40.0, 125.0)), (narrowed, (0.0, 30.0))):
        (rule,) = [r for r in silver_rules(contract) if r.name == "range:temp"]
        assert (rule.min_value, rule.max_value) == expected
        (check,) = [
            e
            for e in build_suite("silver", contract).expectations
            if type(e).__name__ == "ExpectColumnValuesToBeBetween" and e.column == "temp"
        ]
        assert (check.min_value, check.max_value) == expected
        _, quarantine = to_silver(parse(HEADER + row(temp="50")), contract, now=AT)
        assert quarantine["rule"].tolist() == ([] if contract is IOT else ["range:temp"])


def test_timestamps_in_another_unit_or_before_earliest_are_named_and_stay_with_the_delivery():
    from pipelines.layers.partitioning import split_by_event_date

    day = 1767571200  # 2026-01-05
    data = HEADER + row(day) + row(day * 1000) + row(day * 10**6) + row(day * 10**9) + row(0) + row(99_999_999_999)
    bronze = parse(data)
    assert list(split_by_event_date(bronze, IOT, "2026-01-05")) == ["2026-01-05"]
    silver, quarantine = to_silver(bronze, IOT, now=AT, partition="2026-01-05")
    assert len(silver) == 1 and set(quarantine["rule"]) == {"plausible_time:ts"}
    reasons = quarantine["reason"].tolist()
    for unit, reason in zip(("milliseconds", "microseconds", "nanoseconds"), reasons[:3], strict=True):
        assert f"looks like epoch {unit} (2026-01-05 00:00:00 UTC); the contract declares epoch_seconds" in reason
    assert "before the contract's earliest plausible time 2000-01-01" in reasons[3]
    assert "not a plausible reading time" in reasons[4]


def test_an_iso_timestamp_where_epoch_seconds_are_declared_is_named():
    _, quarantine = to_silver(parse(HEADER + row("2026-01-05T00:00:00Z")), IOT, now=AT)
    assert quarantine["rule"].tolist() == ["type:ts"]
    assert "looks like an ISO 8601 date-time; the contract declares 'epoch_seconds'" in quarantine["reason"][0]


def test_cr_only_line_endings_and_whitespace_only_lines_keep_physical_line_numbers():
    from pipelines.jobs.lake import SourceLineCounter

    data = (
        HEADER
        + row()
        + b'1767571260,device-01,0.005,50,true,0.007,0,0.02,21.5,"a, b\nc"\n'
        + b"  \t\n"
        + row(1767571320)
    )
    for text in (data, data.replace(b"\n", b"\r")):
        table = parse(text)
        assert table["_source_line"].to_pylist() == [2, 3, 6] and table["_parse_error"].null_count == 3
        counter = SourceLineCounter(io.BytesIO(text))
        while counter.read(7):  # tiny reads: records split across reads still count once
            pass
        assert counter.records == 3


def test_device_ids_that_are_unprintable_too_long_or_off_pattern_are_quarantined():
    rows = [
        row(1767571200 + 60 * i).replace(b"device-01", d.encode())
        for i, d in enumerate(["device-01", "device-\x0002", "d" * 201, "rogue-7", "device-\u0662", "device 9"])
    ]
    silver, quarantine = to_silver(parse(HEADER + b"".join(rows)), IOT, now=AT)  # the contract's pattern
    assert silver["device"].tolist() == ["device-01", "rogue-7"]
    assert quarantine["rule"].tolist() == ["printable:device", "max_length:device", "pattern:device", "pattern:device"]
    # a stricter pattern given by the caller; `\d` is matched in ASCII mode, so 'device-٢' is no device number
    silver, quarantine = to_silver(parse(HEADER + b"".join(rows)), IOT, now=AT, device_pattern=r"^device-\d+$")
    assert silver["device"].tolist() == ["device-01"] and quarantine["rule"].tolist()[-3:] == ["pattern:device"] * 3


def test_land_file_streams_keeps_deliveries_immutable_and_refuses_broken_files(tmp_path):
    """`platform land --file` streams: the same bytes land nothing, other bytes under one name are kept
    beside the first, and an empty or truncated gzip file is refused before anything is visible."""
    import gzip

    from pipelines.jobs.lake import LandingError, land_file
    from pipelines.storage import LocalStore

    store = LocalStore(tmp_path / "lake")
    first, second = tmp_path / "a" / "t.csv", tmp_path / "b" / "t.csv"
    for path, body in ((first, HEADER + row()), (second, HEADER + row(temp="22.0"))):
        path.parent.mkdir()
        path.write_bytes(body)
    keys = [land_file(store, "iot_telemetry", "2026-01-05", p) for p in (first, second, first)]
    assert keys == ["iot_telemetry/2026-01-05/t.csv", "iot_telemetry/2026-01-05/t.2.csv", keys[0]]
    assert store.get_bytes("landing", keys[1]) == second.read_bytes()
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(LandingError, match=r"empty\.csv: the file is empty \[rule not_empty\]"):
        land_file(store, "iot_telemetry", "2026-01-06", tmp_path / "empty.csv")
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzip.compress(HEADER + row() * 5000)[:-40])
    with pytest.raises(LandingError, match=r"cut\.csv\.gz: the gzip stream ends before its end-of-stream marker"):
        land_file(store, "iot_telemetry", "2026-01-06", cut)
    garbage = tmp_path / "noise.csv.gz"
    garbage.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 100)
    with pytest.raises(LandingError, match=r"noise\.csv\.gz: the gzip stream is corrupt near byte 0 .*\[rule gzip\]"):
        land_file(store, "iot_telemetry", "2026-01-06", garbage)
    assert store.list_keys("landing", "iot_telemetry/2026-01-06/") == []  # nothing landed, no temp file listed
