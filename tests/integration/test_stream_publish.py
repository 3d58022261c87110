"""`platform publish`: a user's own file streamed to a real Mosquitto (users and ACL as in
compose/mosquitto, started by test_stream's helpers), run as the CLI a user runs.

Every check reads the file with an independent reader (the csv module) and compares what a
subscriber received: each row exactly once per device, seq 0..n-1 in file order, values equal to
the file's text, and `MessageReader` turning every message back into that row.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.integration.test_stream import (
    REPO,
    START,
    USERS,
    Broker,
    _bronze_count,
    _start_ingester_process,
    _terminate,
    wait_for,
)


class Subscriber:
    """Receives every message of sensors/<dataset>/+ (as the ingester's user) and keeps (topic, payload)."""

    def __init__(self, broker: Broker, dataset: str):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{os.urandom(3).hex()}")
        self.client.username_pw_set("ingester", USERS["ingester"])
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"sensors/{dataset}/+", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "the subscription was not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def count(self) -> int:
        with self._lock:
            return len(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish(broker: Broker, dataset: str, path: Path, *extra: str, user: str = "gateway"):
    """`platform publish` as a user runs it; credentials from the environment, as for `platform simulate`."""
    env = os.environ | {"PLATFORM_STREAM_MQTT_USERNAME": user, "PLATFORM_STREAM_MQTT_PASSWORD": USERS[user]}
    cmd = [sys.executable, "-m", "pipelines.cli", "publish", "--dataset", dataset, "--file", str(path)]
    cmd += ["--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def file_rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def reader_for(dataset: str):
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset
    from pipelines.streaming.messages import MessageReader

    return MessageReader(dataset, load_contract(get_dataset(dataset).contract_path))


def assert_rows_arrived(messages, rows, dataset: str, device_of, start_seq: int = 0, read_every: int = 1) -> None:
    """Each device's rows arrived exactly once, seq start_seq.. in file order, each payload equal to its
    row; `MessageReader` reads every `read_every`-th message back into that row."""
    from pipelines.streaming.messages import Reading

    reader = reader_for(dataset)
    expected: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        expected.setdefault(device_of(row), []).append(row)
    received: dict[str, dict[int, dict]] = {}
    for i, (topic, payload) in enumerate(messages):
        device = topic.rsplit("/", 1)[1]
        record = json.loads(payload)
        seq = record.pop("seq")
        assert seq not in received.setdefault(device, {}), f"{device} seq {seq} arrived twice"
        received[device][seq] = record
        want = expected[device][seq - start_seq]
        assert record == want, (device, seq, record, want)  # the payload: the file's columns, its text
        if i % read_every == 0:
            reading = reader.read(topic, payload)
            assert isinstance(reading, Reading), f"MessageReader refused {topic} {payload!r}: {reading}"
            assert reading.values == want and reading.seq == seq, (device, seq, reading.values, want)
    assert sorted(received) == sorted(expected)
    for device, want in expected.items():
        assert sorted(received[device]) == list(range(start_seq, start_seq + len(want))), device


def test_a_nab_series_arrives_once_per_row_in_order_with_its_text(broker, nab_csv):
    """One machine, no device column (the contract's constant entity), 22,695 rows of 2013-14."""
    dataset = "nab_machine_temperature.publish_nab"
    rows = file_rows(nab_csv)
    sub = Subscriber(broker, dataset)
    try:
        done = publish(broker, dataset, nab_csv, "--progress-seconds", "1")
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: sub.count() >= len(rows), 30, "every row to reach the subscriber")
        time.sleep(0.3)  # a duplicate would arrive now
    finally:
        sub.close()
    assert sub.count() == len(rows) == 22695
    assert {t for t, _ in sub.messages} == {f"sensors/{dataset}/machine_temperature"}
    # MessageReader costs ~4.5 ms a message for a strptime-format contract (its event-date parse):
    # every 10th of the 22,695 here, each the same code path
    assert_rows_arrived(sub.messages, rows, dataset, lambda _row: "machine_temperature", read_every=10)
    first = json.loads(sub.messages[0][1])
    assert first == {"timestamp": "2013-12-02 21:15:00", "value": "73.96732207", "seq": 0}  # times not shifted
    assert "[publish] done: 22695 rows" in done.stdout and "every one acknowledged by the broker" in done.stdout
    assert "--start-seq 22695" in done.stdout


def test_a_fleet_file_gzipped_at_a_rate_with_a_start_seq(broker, tmp_path):
    """The simulator's CSV (three devices interleaved, booleans as text, an empty label column),
    gzipped, published at a set rate with --start-seq and --limit."""
    from pipelines.simulator import simulate_day_csv

    dataset = "iot_telemetry.publish_fleet"
    path = tmp_path / "fleet.csv.gz"
    path.write_bytes(gzip.compress(simulate_day_csv(START, 3, 300, 7)))
    rows = file_rows(path)[:600]
    sub = Subscriber(broker, dataset)
    try:
        done = publish(
            broker, dataset, path, "--rate", "1500", "--start-seq", "40", "--limit", "600", "--progress-seconds", "0.1"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: sub.count() >= 600, 30, "every row to reach the subscriber")
        time.sleep(0.3)
    finally:
        sub.close()
    assert sub.count() == 600
    assert rows[0]["fault"] == "" and rows[0]["light"] in ("true", "false")
    assert_rows_arrived(sub.messages, rows, dataset, lambda row: row["device"], start_seq=40)
    assert "published" in done.stdout.split("\n")[1] and "acknowledged" in done.stdout  # a progress line
    assert "device-01 (seq 40..239)" in done.stdout


def test_rows_that_cannot_be_messages_are_named_and_nothing_is_sent_unless_asked(broker, tmp_path):
    """A row without a device and a malformed row: reported with file and line, nothing published,
    exit 1; with --skip-bad-rows the others are published, each device's seq without a hole."""
    dataset = "iot_telemetry.publish_bad"
    header = "ts,device,co,humidity,light,lpg,motion,smoke,temp"
    good = "{t},{d},0.004,61.0,false,0.007,false,0.018,19.2"
    lines = [header, good.format(t=1767225600, d="device-01"), good.format(t=1767225600, d="device-02")]
    lines += [good.format(t=1767225660, d=""), "1767225660,device-01,0.004,61.0"]  # lines 4 and 5
    lines += [good.format(t=1767225720, d="device-01"), good.format(t=1767225720, d="device-02")]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    sub = Subscriber(broker, dataset)
    try:
        refused = publish(broker, dataset, path)
        time.sleep(0.5)  # anything sent would have arrived
        assert sub.count() == 0
        done = publish(broker, dataset, path, "--skip-bad-rows")
        wait_for(lambda: sub.count() >= 4, 10, "the good rows")
        time.sleep(0.3)
    finally:
        sub.close()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"{path} line 4: no device: column 'device' is empty" in refused.stderr
    assert f"{path} line 5: malformed row [rule parse_error]: expected 9 fields, found 4" in refused.stderr
    assert "nothing was published" in refused.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{path} line 4" in done.stderr and "2 row(s) skipped" in done.stdout
    good_rows = [r for r in file_rows(path) if r["device"] and r["temp"]]
    assert_rows_arrived(sub.messages, good_rows, dataset, lambda row: row["device"])


def test_messages_the_broker_refuses_fail_the_command_naming_the_topic(broker, tmp_path):
    """A device's own credentials may publish to its own topic only: MQTT 3.1.1 would acknowledge the
    others as if delivered; the command (MQTT 5) sees the refusal and says which topic and why."""
    dataset = "iot_telemetry.publish_acl"
    path = tmp_path / "two.csv"
    path.write_text(
        "ts,device,co,humidity,light,lpg,motion,smoke,temp\n"
        "1767225600,device-01,0.004,61.0,false,0.007,false,0.018,19.2\n"
        "1767225600,device-02,0.004,61.0,false,0.007,false,0.018,19.2\n"
    )
    done = publish(broker, dataset, path, user="device-01")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the broker refused 1 of 2 messages" in done.stderr
    assert f"sensors/{dataset}/device-02: Not authorized" in done.stderr


def test_platform_stream_puts_every_published_nab_row_in_bronze(broker, store, nab_csv, tmp_path):
    """`platform stream` (a process, as deployed) ingests the published series: bronze holds every row
    once, under the constant device's topic, seq as the line, values as the file's text.

    The first 3,000 rows (10 days of readings): the ingester reads a NAB message in ~4.5 ms (its
    event-date parse for a strptime format), so the whole series would take ~100 s here."""
    from pipelines import storage

    dataset = "nab_machine_temperature.publish_stream"
    rows = file_rows(nab_csv)[:3000]
    log_path = tmp_path / "stream.log"
    proc = _start_ingester_process(broker, dataset, log_path)
    try:
        wait_for(lambda: log_path.exists() and "[stream]" in log_path.read_text(), 60, "the ingester to start")
        time.sleep(1.0)  # its session and subscription are in place
        started = time.monotonic()
        done = publish(broker, dataset, nab_csv, "--limit", str(len(rows)))
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: _bronze_count(store, dataset) >= len(rows), 60, "bronze to hold every row", interval=0.5)
        print(f"{len(rows)} NAB rows published and in bronze in {time.monotonic() - started:.1f}s")
    finally:
        _terminate(proc)
    frames = [
        storage.read_partition(store, "bronze", dataset, p).to_pandas()
        for p in storage.list_partitions(store, "bronze", dataset)
    ]
    import pandas as pd

    bronze = pd.concat(frames, ignore_index=True).sort_values("_source_line")
    assert len(bronze) == len(rows) and bronze["_source_line"].tolist() == list(range(len(rows)))
    assert set(bronze["_source_key"]) == {f"mqtt://sensors/{dataset}/machine_temperature"}
    assert bronze["timestamp"].tolist() == [r["timestamp"] for r in rows]
    assert bronze["value"].tolist() == [r["value"] for r in rows]
    assert "Traceback" not in log_path.read_text()
