"""Bad input as a user meets it: `platform land --file` each file, then ONE `platform run` of the delivery.

The row-level classes share one file (`rows.csv`: each class its own device and lines); every
other class is a file of its own in the same delivery. Per class the test asserts the exact outcome
— rows quarantined with the rule, the line and the reason; the file quarantined as a file with its
rule and line; or `platform land` refusing it with a message naming the file and the rule — and that
every good row reached silver. Classes here, then those of the other bad-input suites:

| #  | class                                          | outcome here                                   |
|----|------------------------------------------------|------------------------------------------------|
| 1  | line with too few fields                       | row quarantined `parse_error`                  |
| 2  | line with too many fields                      | row quarantined `parse_error`                  |
| 3  | text where a number is declared                | `type:temp`                                    |
| 4  | unparseable timestamp                          | `type:ts`                                      |
| 5  | ISO 8601 time where epoch seconds are declared | `type:ts`, reason names ISO 8601               |
| 6  | epoch milliseconds                             | `plausible_time:ts`, reason names the unit     |
| 7  | clock reset to 1970                            | `plausible_time:ts`, before earliest           |
| 8  | NaN reading of a required column               | `not_null:temp`                                |
| 9  | infinite reading                               | `finite:co`                                    |
| 10 | reading above its physical range               | `range:temp`, the contract's range             |
| 11 | reading below its physical range               | `range:co`                                     |
| 12 | empty required field                           | `not_null:humidity`                            |
| 13 | "NULL"/"NA" spelled missing values             | `not_null:lpg`                                 |
| 14 | not a boolean                                  | `type:light`                                   |
| 15 | number with a unit ("50%")                     | `type:humidity`                                |
| 16 | same reading delivered twice, other values     | `duplicate_key`, later line wins               |
| 17 | same reading delivered twice, same values      | collapsed, one silver row                      |
| 18 | late reading of an earlier day                 | routed to its own event date, in silver        |
| 19 | NUL byte in a device id                        | `printable:device`                             |
| 20 | 10 KB device id                                | `max_length:device`                            |
| 21 | non-ASCII digit in a device id ('٢')           | `pattern:device`                               |
| 22 | space in a device id                           | `pattern:device`                               |
| 23 | missing device id                              | `not_null:device`                              |
| 24 | unknown extra column                           | kept in bronze, every row in silver            |
| 25 | columns in another order                       | every row in silver                            |
| 26 | quoted field holding a comma and a newline     | every row in silver                            |
| 27 | whitespace-only lines                          | every row in silver                            |
| 28 | CR-only line endings                           | every row in silver                            |
| 29 | CRLF line endings                              | every row in silver                            |
| 30 | UTF-8 byte-order mark                          | every row in silver                            |
| 31 | gzip-compressed CSV                            | every row in silver                            |
| 32 | JSON lines                                     | every row in silver                            |
| 33 | JSON lines with a broken line                  | row quarantined `parse_error`                  |
| 34 | wrong delimiter                                | file quarantined `delimiter`, line 1           |
| 35 | missing required column                        | file quarantined `required_columns`            |
| 36 | duplicated header column                       | file quarantined `csv_header`                  |
| 37 | header using a lineage column name             | file quarantined `csv_header`                  |
| 38 | header only                                    | file quarantined `has_rows`                    |
| 39 | bytes that are not UTF-8                       | file quarantined `utf8`, its line              |
| 40 | JSON lines without a required field            | file quarantined `required_columns`            |
| 41 | gzip of a file in the wrong delimiter          | file quarantined `delimiter`                   |
| 42 | empty file                                     | `land` refuses it, `not_empty`                 |
| 43 | truncated gzip                                 | `land` refuses it, `gzip`, nothing lands       |
| 44 | corrupt gzip                                   | `land` refuses it, `gzip`                      |
| 45 | the same file landed twice                     | one landed object, no duplicate rows           |
| 46 | other bytes under a name already delivered     | kept beside it (`.2`), its rows in silver      |
| 47 | `land --date not-a-date`, `--date 2026-13-45`  | exit 2, "not a date", nothing lands            |
| 48 | `land`/`run` of an unknown dataset             | exit 2, "unknown dataset"                      |
| 49 | `land --file` of a missing path                | exit 2, "does not exist"                       |
| 50 | `run` of a delivery date that is not a date    | exit 2, "not a date"                           |

Elsewhere: a reading from the future, routed to its date and quarantined (test_bad_input.py,
test_bad_input_more.py: it does not fail the run), a 1 GB file streamed (test_bad_input.py), a whole
delivery in milliseconds and a partition emptied by quarantine, `lake.on_bad_file: stop`
(test_bad_input_more.py), a backfill of an original after its correction (test_lake_guarantees.py),
the same date run twice at once and two runs writing one partition (test_concurrent_runs.py):
50 classes here, 57 in all.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import storage

REPO = Path(__file__).resolve().parents[2]
DATASET = "bad_input_cli"
DELIVERY = "2019-09-02"
EARLIER = "2019-09-01"
COLUMNS = ["ts", "device", "co", "humidity", "light", "lpg", "motion", "smoke", "temp", "fault"]
HEADER = ",".join(COLUMNS) + "\n"
GOOD = 4  # good rows in every file that has rows


def epoch(day: str, minute: int) -> int:
    return int((dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC) + dt.timedelta(minutes=minute)).timestamp())


def line(device: str, minute: int, day: str = DELIVERY, **values) -> str:
    fields = {"ts": epoch(day, minute), "device": device, "co": "0.005", "humidity": "50", "light": "true"}
    fields |= {"lpg": "0.007", "motion": "0", "smoke": "0.02", "temp": "21.5", "fault": ""}
    fields |= values
    return ",".join(str(fields[c]) for c in COLUMNS) + "\n"


def good(device: str, n: int = GOOD, start: int = 0) -> str:
    return "".join(line(device, start + i) for i in range(n))


def jsonl(device: str, n: int = GOOD, **values) -> str:
    out = []
    for i in range(n):
        record = {"ts": epoch(DELIVERY, i), "device": device, "co": 0.005, "humidity": 50.0, "light": True}
        out.append(json.dumps(record | {"lpg": 0.007, "motion": False, "smoke": 0.02, "temp": 21.5} | values))
    return "\n".join(out) + "\n"


Expect = tuple[str, str] | str | None  # (rule, text in the reason); None: a good row; "none": neither


def _with_good(device: str, *bad: tuple[str, Expect]) -> list[tuple[str, Expect]]:
    return [(line(device, i), None) for i in range(GOOD)] + list(bad)


# Row-level classes, all in ONE file (rows.csv): each class its own device, its records in order.
ROW_CLASSES: dict[str, list[tuple[str, Expect]]] = {
    "few fields": _with_good("few", ("1567382400,few,0.1\n", ("parse_error", "found 3"))),
    "many fields": _with_good("many", (line("many", 9).rstrip("\n") + ",extra\n", ("parse_error", "found 11"))),
    "text number": _with_good("txt", (line("txt", 9, temp="warm"), ("type:temp", "'warm' is not a valid float64"))),
    "bad time": _with_good("bt", (line("bt", 9, ts="yesterday"), ("type:ts", "'yesterday' is not a valid timestamp"))),
    "ISO time": _with_good(
        "iso", (line("iso", 9, ts="2019-09-02T10:00:00Z"), ("type:ts", "looks like an ISO 8601 date-time"))
    ),
    "milliseconds": _with_good(
        "ms", (line("ms", 9, ts=epoch(DELIVERY, 9) * 1000), ("plausible_time:ts", "looks like epoch milliseconds"))
    ),
    "clock reset": _with_good(
        "reset", (line("reset", 9, ts=60), ("plausible_time:ts", "before the contract's earliest plausible time"))
    ),
    "NaN": _with_good("nanv", (line("nanv", 9, temp="NaN"), ("not_null:temp", "is required"))),
    "infinity": _with_good("infv", (line("infv", 9, co="inf"), ("finite:co", "is infinite"))),
    "too hot": _with_good(
        "hot", (line("hot", 9, temp="300"), ("range:temp", "temp=300.0 outside physical range [-40, 125] celsius"))
    ),
    "negative": _with_good("neg", (line("neg", 9, co="-0.5"), ("range:co", "outside physical range [0, 1]"))),
    "empty field": _with_good("ef", (line("ef", 9, humidity=""), ("not_null:humidity", "is required by contract"))),
    "null words": _with_good(
        "nw",
        (line("nw", 9, lpg="NULL"), ("not_null:lpg", "is required")),
        (line("nw", 10, lpg="NA"), ("not_null:lpg", "is required")),
    ),
    "not a bool": _with_good("nb", (line("nb", 9, light="maybe"), ("type:light", "'maybe' is not a valid bool"))),
    "unit in a number": _with_good(
        "pct", (line("pct", 9, humidity="50%"), ("type:humidity", "'50%' is not a valid float64"))
    ),
    "conflicting duplicate": [
        (line("dup", 0), None),
        (line("dup", 1), ("duplicate_key", "delivered again with different values; kept the later delivery")),
        (line("dup", 2), None),
        (line("dup", 3), None),
        (line("dup", 1, temp="22.0"), None),  # the later line wins
    ],
    "identical duplicate": [
        (line("same", 0), None),
        (line("same", 1), "none"),  # collapsed into its later twin: neither quarantined nor duplicated
        (line("same", 2), None),
        (line("same", 3), None),
        (line("same", 1), None),
    ],
    "NUL in a device id": _with_good(
        "nul", (line("nul\x00x", 9), ("printable:device", "holds control or other unprintable characters"))
    ),
    "10 KB device id": _with_good(
        "long", (line("d" * 10_000, 9), ("max_length:device", "(10000 characters) is longer than 200 characters"))
    ),
    "non-ASCII digit": _with_good(
        "ar", (line("device-\u0662", 9), ("pattern:device", "does not match the contract's device pattern"))
    ),
    "space in a device id": _with_good(
        "sp", (line("rogue 7", 9), ("pattern:device", "does not match the contract's device pattern"))
    ),
    "no device id": _with_good("nd", (line("", 9), ("not_null:device", "is required"))),
    "late reading": _with_good("late", *[(line("late", i, day=EARLIER), None) for i in range(6)]),
    "quoted comma and newline": _with_good(
        "qn", (line("qn", 9).rstrip("\n").rstrip(",") + ',"stuck, then\nreset"\n', None)
    ),
    "whitespace-only lines": _with_good("bl", ("   \n", "none"), (" \t\n", "none")),
}


def _combined() -> tuple[str, dict[str, dict[int, Expect]]]:
    """rows.csv and, per class, {physical line of each record: what it must become}."""
    text, lines, number = HEADER, {}, 2
    for name, records in ROW_CLASSES.items():
        lines[name] = {}
        for record, expect in records:
            lines[name][number] = expect
            text += record
            number += record.count("\n")
    return text, lines


ROWS_CSV, ROW_LINES = _combined()

# File-level formats that read fine: name -> (content, device, good rows in silver)
FORMATS: dict[str, tuple[str | bytes, str, int]] = {
    "extra-column.csv": (
        HEADER.rstrip("\n") + ",firmware\n" + "".join(r.rstrip("\n") + ",v1.2\n" for r in good("xc").splitlines(True)),
        "xc",
        GOOD,
    ),
    "reordered.csv": (
        ",".join(reversed(COLUMNS))
        + "\n"
        + "".join(",".join(reversed(r.rstrip("\n").split(","))) + "\n" for r in good("ro").splitlines(True)),
        "ro",
        GOOD,
    ),
    "cr-only.csv": ((HEADER + good("cr")).replace("\n", "\r"), "cr", GOOD),
    "crlf.csv": ((HEADER + good("crlf")).replace("\n", "\r\n"), "crlf", GOOD),
    "bom.csv": ("\ufeff" + HEADER + good("bom"), "bom", GOOD),
    "compressed.csv.gz": (gzip.compress((HEADER + good("gz")).encode()), "gz", GOOD),
    "readings.jsonl": (jsonl("js"), "js", GOOD),
    "broken.jsonl": (jsonl("jb") + "{not json\n", "jb", GOOD),  # line 5: parse_error
}

FIRST_COPY = HEADER + good("re")  # landed twice as redelivered.csv, then:
SECOND_COPY = HEADER + good("re") + line("re", 4, temp="23.0")  # other bytes under the same name

# name -> (content, rule, line, text in the reason): the file is quarantined as a file
FILES: dict[str, tuple[str | bytes, str, int | None, str]] = {
    "semicolons.csv": ((HEADER + good("semi")).replace(",", ";"), "delimiter", 1, "uses ';'"),
    "no-temp.csv": (
        HEADER.replace(",temp", "") + "".join(r.replace(",21.5,", ",") for r in good("nt").splitlines(True)),
        "required_columns",
        1,
        "missing column(s) ['temp']",
    ),
    "twice-co.csv": (HEADER.replace("lpg", "co"), "csv_header", 1, "duplicated or empty column names ['co']"),
    "lineage-name.csv": (HEADER.replace("fault", "_source_key"), "csv_header", 1, "reserved lineage names"),
    "header-only.csv": (HEADER, "has_rows", 1, "header only"),
    "latin1.csv": (
        (HEADER + good("lat")).encode() + line("lat\xe9", 9).encode("latin-1"),
        "utf8",
        6,
        "not valid UTF-8",
    ),
    "no-field.jsonl": (jsonl("nf").replace('"temp": 21.5', '"t": 21.5'), "required_columns", 1, "records have no"),
    "semicolons.csv.gz": (gzip.compress((HEADER + good("sgz")).replace(",", ";").encode()), "delimiter", 1, "uses ';'"),
}

# name -> (content, text of the refusal): `platform land` refuses the file, nothing lands
REFUSED = {
    "empty.csv": (b"", "empty.csv: the file is empty [rule not_empty]"),
    "cut.csv.gz": (
        gzip.compress((HEADER + good("cut", 2000)).encode())[:-64],
        "the gzip stream ends before its end-of-stream marker",
    ),
    "noise.csv.gz": (b"\x1f\x8b\x08\x00" + b"\x00\xff" * 64, "the gzip stream is corrupt"),
}


def cli(*argv: str) -> int:
    from pipelines.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def delivery(stack, store, tmp_path_factory):
    """The user's dataset (a contract in PLATFORM_CONTRACTS_DIR, tuned in their params file), every file
    landed with `platform land`, then one `platform run` of the delivery."""
    folder = tmp_path_factory.mktemp("bad-input-cli")
    contract = yaml.safe_load((REPO / "pipelines" / "contracts" / "iot_telemetry.yaml").read_text())
    (folder / f"{DATASET}.yaml").write_text(yaml.safe_dump(contract | {"name": DATASET}, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["quality"][DATASET] = params["quality"]["iot_telemetry"]  # extra columns: a warning
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    files = folder / "files"
    files.mkdir()
    outcome: dict = {"land": {}, "refused": {}}
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLATFORM_CONTRACTS_DIR", str(folder))
        mp.setenv("PLATFORM_PARAMS_FILE", str(folder / "params.yaml"))
        contents = {"rows.csv": ROWS_CSV} | {n: v[0] for n, v in {**FORMATS, **FILES, **REFUSED}.items()}
        for name, content in contents.items():
            path = files / name
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
            outcome["land"][name] = cli("land", "--file", str(path), "--dataset", DATASET, "--date", DELIVERY)
        # the same file twice, then other bytes under its name
        for copy, content in enumerate((FIRST_COPY, FIRST_COPY, SECOND_COPY)):
            path = files / f"copy-{copy}" / "redelivered.csv"
            path.parent.mkdir()
            path.write_text(content)
            outcome["land"][f"redelivered {copy}"] = cli(
                "land", "--file", str(path), "--dataset", DATASET, "--date", DELIVERY
            )
        landed = time.monotonic()
        # The user starts the run, and (another terminal) starts the same delivery again while it runs.
        command = [sys.executable, "-m", "pipelines.cli", "run", DELIVERY, "--dataset", DATASET, "--skip-training"]
        first = subprocess.Popen(
            command, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        lease = f"{storage.LOCK_PREFIX}runs/{DATASET}_lakehouse/{DELIVERY}.json"
        while not store.exists(store.settings.lake_bucket, lease) and first.poll() is None:
            time.sleep(0.1)
        with contextlib.redirect_stderr(io.StringIO()) as second_err:
            outcome["second"] = (cli("run", DELIVERY, "--dataset", DATASET, "--skip-training"), "")
        outcome["second"] = (outcome["second"][0], second_err.getvalue())
        out, err = first.communicate(timeout=900)
        outcome["run"], outcome["run_output"] = first.returncode, out + err
        outcome["seconds"] = {"land": landed - started, "run": time.monotonic() - landed}
        outcome["lease_left"] = store.exists(store.settings.lake_bucket, lease)
    return outcome


def _silver(store, partition: str) -> list[dict]:
    return storage.read_partition(store, "silver", DATASET, partition).to_pylist()


def _quarantine(store, partition: str) -> list[dict]:
    return storage.read_partition(store, "quarantine", DATASET, partition).to_pylist()


def _key(name: str) -> str:
    return f"s3://landing/{DATASET}/{DELIVERY}/{name}"


def test_the_delivery_lands_and_runs_as_one(delivery):
    assert delivery["run"] == 0, delivery["run_output"][-3000:]
    assert "IntegrityError" not in delivery["run_output"] and not delivery["lease_left"]


def test_the_same_delivery_started_twice_at_once_is_refused_while_the_first_runs(delivery):
    code, err = delivery["second"]
    (refusal,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and f"DAG {DATASET}_lakehouse for delivery {DELIVERY} is refused" in refusal, err
    assert "held by platform run (pid" in refusal and "Wait for that run to finish" in refusal, refusal
    assert "Traceback" not in err and "IntegrityError" not in err
    assert all(code == 0 for name, code in delivery["land"].items() if name not in REFUSED), delivery["land"]


@pytest.mark.parametrize("name", list(ROW_CLASSES))
def test_every_good_row_reaches_silver_and_every_bad_row_is_quarantined_with_its_reason(delivery, store, name):
    expected = ROW_LINES[name]
    silver = {
        r["_source_line"]
        for p in (DELIVERY, EARLIER)
        for r in _silver(store, p)
        if r["_source_key"] == _key("rows.csv")
    }
    quarantined = {
        int(q["_source_line"]): (q["rule"], q["reason"])
        for q in _quarantine(store, DELIVERY)
        if q["_source_key"] == _key("rows.csv") and int(q["_source_line"]) in expected
    }
    assert {n for n, e in expected.items() if e is None} == silver & set(expected), name  # every good row
    want = {n: e for n, e in expected.items() if isinstance(e, tuple)}
    assert {n: rule for n, (rule, _) in quarantined.items()} == {n: rule for n, (rule, _) in want.items()}, name
    for n, (_, text) in want.items():
        assert text in quarantined[n][1], (name, quarantined[n][1])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_reads_as_delivered_and_its_good_rows_reach_silver(delivery, store, name):
    _, device, good_rows = FORMATS[name]
    silver = [r for r in _silver(store, DELIVERY) if r["_source_key"] == _key(name)]
    assert len(silver) == good_rows and {r["device"] for r in silver} == {device}, name
    quarantined = [
        (q["rule"], q["_source_line"]) for q in _quarantine(store, DELIVERY) if q["_source_key"] == _key(name)
    ]
    assert quarantined == ([("parse_error", "5")] if name == "broken.jsonl" else []), quarantined


def test_routed_readings_reach_their_own_event_dates(delivery, store):
    late = [r for r in _silver(store, EARLIER) if r["device"] == "late"]
    assert len(late) == 6 and {r["ts"].date().isoformat() for r in late} == {EARLIER}
    quoted = [r for r in _silver(store, DELIVERY) if r["device"] == "qn"]
    assert "stuck, then\nreset" in {r["label"] for r in quoted}
    bronze = storage.read_partition(store, "bronze", DATASET, DELIVERY)
    assert "firmware" in bronze.column_names
    same = [r for r in _silver(store, DELIVERY) if r["device"] == "same"]
    assert len(same) == GOOD  # the identical twin collapsed, not quarantined, not duplicated


@pytest.mark.parametrize("name", sorted(FILES))
def test_an_unreadable_file_is_quarantined_as_a_file_with_its_rule_and_line(delivery, store, name):
    _, rule, line_no, text = FILES[name]
    record = json.loads(
        store.get_bytes(store.settings.lake_bucket, f"quarantine/{DATASET}/_files/delivery={DELIVERY}/{name}.json")
    )
    assert record["file"] == _key(name) and record["rule"] == rule and record["line"] == line_no, record
    assert text in record["reason"] and f"[rule {rule}]" in record["reason"], record
    for p in (DELIVERY, EARLIER):
        assert not [r for r in _silver(store, p) if r["_source_key"] == _key(name)]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_land_refuses_a_broken_file_naming_it_and_the_rule(delivery, store, name, capsys):
    assert delivery["land"][name] == 1
    assert not store.exists(store.settings.landing_bucket, f"{DATASET}/{DELIVERY}/{name}")


def test_land_refusal_message_is_one_clear_line(delivery, tmp_path, capsys, store):
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(REFUSED["cut.csv.gz"][0])
    assert cli("land", "--file", str(path), "--dataset", "iot_telemetry", "--date", "2019-09-03") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cut.csv.gz: " + REFUSED["cut.csv.gz"][1] in err and "[rule gzip]" in err, err
    for name, (content, text) in REFUSED.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert cli("land", "--file", str(path), "--dataset", "iot_telemetry", "--date", "2019-09-03") == 1
        assert text in capsys.readouterr().err
    assert not store.list_keys(store.settings.landing_bucket, "iot_telemetry/2019-09-03/")


def test_a_file_landed_twice_lands_once_and_other_bytes_under_its_name_are_kept_beside_it(delivery, store):
    keys = store.list_keys(store.settings.landing_bucket, f"{DATASET}/{DELIVERY}/redelivered")
    assert keys == [f"{DATASET}/{DELIVERY}/redelivered.2.csv", f"{DATASET}/{DELIVERY}/redelivered.csv"]
    rows = [r for r in _silver(store, DELIVERY) if r["device"] == "re"]
    assert len(rows) == GOOD + 1  # no duplicate of the first copy's rows; the second copy's extra reading
    assert sorted({r["_source_key"].rsplit("/", 1)[1] for r in rows}) == ["redelivered.2.csv"]  # the later copy


def test_arguments_are_checked_before_anything_lands_or_runs(delivery, store, tmp_path, capsys):
    path = tmp_path / "ok.csv"
    path.write_text(HEADER + good("arg"))
    for date in ("not-a-date", "2026-13-45"):
        assert cli("land", "--file", str(path), "--dataset", "iot_telemetry", "--date", date) == 2
        assert f"--date {date!r} is not a date: write YYYY-MM-DD" in capsys.readouterr().err
    assert cli("land", "--file", str(path), "--dataset", "no_such_dataset") == 2
    assert "unknown dataset 'no_such_dataset'" in capsys.readouterr().err
    assert cli("run", "2019-09-02", "--dataset", "no_such_dataset") == 2
    assert "unknown dataset 'no_such_dataset'" in capsys.readouterr().err
    assert cli("land", "--file", str(tmp_path / "missing.csv"), "--dataset", "iot_telemetry") == 2
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert cli("run", "2019-02-30", "--dataset", "iot_telemetry") == 2
    assert "delivery date '2019-02-30' is not a date" in capsys.readouterr().err
    assert not store.list_keys(store.settings.landing_bucket, "no_such_dataset/")
    assert not [k for k in store.list_keys(store.settings.landing_bucket, "iot_telemetry/") if k.endswith("/ok.csv")]
