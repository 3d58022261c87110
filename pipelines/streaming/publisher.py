"""Readings published to the broker: `platform simulate --mqtt` (the simulated fleet at a steady
rate) and `platform publish` (a user's own file, row by row).

Simulated readings come from `pipelines.simulator.stream_readings` (the simulator's own data,
time-major, each with its device's `seq`), one JSON message each on `sensors/<dataset>/<device>` at
QoS 1. The publisher keeps a session and paho's own queue: a message published while the broker is
away is sent on reconnect, and `flush()` returns when the broker has acknowledged every one.

A file is read by bronze's own reader (`iter_landing_records`: CSV or JSON lines, gzipped or not,
the same header checks and line numbers as `platform land --file`) and each row becomes the message
`MessageReader` turns back into that row: the delivered columns as delivered text plus `seq`.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.streaming.messages import MAX_PAYLOAD_BYTES, SEQ_FIELD, sensor_topic


class FleetPublisher:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        max_inflight: int = 1000,
        mqtt_v5: bool = False,
    ):
        """`mqtt_v5`: the broker's PUBACK then says whether it took a message (MQTT 3.1.1 acknowledges
        a publish its ACL denies as if it were delivered); refusals are counted with their topic."""
        import paho.mqtt.client as mqtt

        if mqtt_v5:  # a fresh session, resumed on reconnect, kept 5 min after we go
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
            )
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)  # unbounded: nothing published is dropped locally
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        # Counted from PUBACKs, not from each MessageInfo: a message published while the broker was
        # away reports "not connected" forever, though paho keeps it and sends it on reconnect.
        self.published = 0
        self.acknowledged = 0
        self._acked = threading.Condition()
        self._wake_below = 0  # notify a waiter once fewer than this many messages are unacknowledged
        # v5 only: the topic of each message in flight (mid -> topic), to name what the broker refused;
        # an acknowledgement can come back before `publish` returned its mid (`_early`).
        self._topics: dict[int, str] | None = {} if mqtt_v5 else None
        self._early: dict[int, str | None] = {}
        self.refused = 0
        self.refusals: dict[str, str] = {}  # topic -> the broker's reason (the first 100 topics)
        self.connect_refusal: str | None = None
        self.client.on_publish = self._on_publish
        self.client.on_connect = self._on_connect
        self.host, self.port = host, port
        if mqtt_v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
            self.client.connect_async(host, port, keepalive=30, properties=props)
        else:
            self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connect_refusal = str(reason_code) if reason_code.is_failure else None

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acked:
            self.acknowledged += 1
            if self._topics is not None:
                failed = str(reason_code) if reason_code.is_failure else None
                topic = self._topics.pop(mid, None)
                if topic is None:
                    self._early[mid] = failed
                elif failed:
                    self._refuse(topic, failed)
            if self.published - self.acknowledged < self._wake_below:
                self._acked.notify_all()

    def _refuse(self, topic: str, reason: str) -> None:
        self.refused += 1
        if len(self.refusals) < 100:
            self.refusals.setdefault(topic, reason)

    def _track(self, mid: int, topic: str) -> None:
        if self._topics is None:
            return
        with self._acked:
            if mid in self._early:
                failed = self._early.pop(mid)
                if failed:
                    self._refuse(topic, failed)
            else:
                self._topics[mid] = topic

    def wait_connected(self, timeout: float) -> None:
        """Return once connected; raise ConnectionError naming the broker and its answer if not."""
        deadline = time.monotonic() + timeout
        while not self.client.is_connected():
            if self.connect_refusal or time.monotonic() > deadline:  # a refusal is final: wrong credentials
                answer = f"it answered: {self.connect_refusal}" if self.connect_refusal else "no answer"
                raise ConnectionError(
                    f"no MQTT connection to {self.host}:{self.port} ({answer}); check "
                    "PLATFORM_STREAM_MQTT_HOST/_PORT/_USERNAME/_PASSWORD(_FILE) or --mqtt-host/--mqtt-port"
                )
            time.sleep(0.02)

    def wait_inflight_below(self, window: int, timeout: float) -> bool:
        """Block until fewer than `window` messages await the broker's acknowledgement (False: timeout)."""
        with self._acked:
            self._wake_below = window  # woken once, not by every acknowledgement on the way down
            try:
                return self._acked.wait_for(lambda: self.published - self.acknowledged < window, timeout)
            finally:
                self._wake_below = 0

    def publish(self, dataset: str, reading: dict, qos: int = 1):
        topic = sensor_topic(dataset, reading["device"])
        info = self.client.publish(topic, json.dumps(reading), qos=qos)
        self.published += 1
        self._track(info.mid, topic)
        return info

    def publish_raw(self, topic: str, payload: bytes | str, qos: int = 1):
        info = self.client.publish(topic, payload, qos=qos)
        self.published += 1
        self._track(info.mid, topic)
        return info

    def flush(self, timeout: float = 60.0) -> int:
        """Wait until the broker acknowledged every message published so far; returns how many are."""
        deadline = time.monotonic() + timeout
        while self.acknowledged < self.published:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.published - self.acknowledged} messages not acknowledged by the broker")
            time.sleep(0.005)
        return self.acknowledged

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_at_rate(
    publisher: FleetPublisher,
    dataset: str,
    readings: Iterable[dict],
    rate: float,
    on_sent: Callable[[dict, int], None] | None = None,
    limit: int | None = None,
) -> int:
    """Publish `readings` at `rate` messages a second (paced per 1 ms tick, not per message)."""
    started = time.perf_counter()
    sent = 0
    for reading in readings:
        if limit is not None and sent >= limit:
            break
        due = started + sent / rate
        delay = due - time.perf_counter()
        if delay > 0.001:
            time.sleep(delay)
        publisher.publish(dataset, reading)
        if on_sent is not None:
            on_sent(reading, time.time_ns())
        sent += 1
    return sent


# -- a file of the user's own, row by row ------------------------------------------------------
_TOPIC_UNSAFE = ("/", "+", "#", "\x00")  # a topic separator, MQTT's wildcards, NUL


class PublishError(ValueError):
    """A file cannot be published at all (its header, not a row); the message says what to fix."""


@dataclass(frozen=True, slots=True)
class FileMessage:
    """One row of the file as the message the live path expects."""

    line: int | None  # physical line in the (decompressed) file, header = 1
    device: str
    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """A row that cannot become a message, with where it is and why."""

    source: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.source} line {self.line}" if self.line is not None else f"{self.source} (line unknown)"
        return f"{where}: {self.reason}"


def file_messages(
    path: Path | str, dataset: str, contract, *, start_seq: int = 0, block_size: int = 1 << 20
) -> Iterator[FileMessage | SkippedRow]:
    """Each data row of `path` as a FileMessage, or a SkippedRow saying why it cannot be one.

    The payload holds the file's delivered columns under their own names, values as delivered text
    (bronze's convention, so `MessageReader.read` gives back the row's text), plus `seq`: the
    device's row counter, from `start_seq`. The device is the row's entity column, or the contract's
    constant entity when it has none. A skipped row whose device is known (a malformed row of a
    one-device file, a message too large) still takes its seq: the file fixed and published again
    with the same `start_seq` fills exactly the gap, and the rest are duplicates the ingester drops.
    Raises BronzeError (file, line, rule) or PublishError when the file as a whole cannot be read.
    """
    from pipelines.layers.bronze import LINEAGE_COLUMNS, PARSE_ERROR_COLUMN, iter_landing_records

    source = str(path)
    entity = contract.entity.source
    constant = contract.entity.constant
    if entity is None and constant is None:
        raise PublishError(f"contract {contract.name!r} names no entity source column and no constant entity")
    next_seq: dict[str, int] = {}
    skip_columns = {*LINEAGE_COLUMNS, PARSE_ERROR_COLUMN}
    with open(path, "rb") as f:
        batches = iter_landing_records(
            f,
            source_key=source,
            source_etag="",
            run_id="publish",
            ingested_at=dt.datetime.now(dt.UTC),
            contract=contract,
            block_size=block_size,
        )
        for batch in batches:
            columns = [c for c in batch.schema.names if c not in skip_columns]
            if SEQ_FIELD in columns:
                raise PublishError(
                    f"{source}: has a column {SEQ_FIELD!r}, the name the live path reserves for the device's "
                    "message counter; rename that column (or land the file with `platform land --file`)"
                )
            device_at = columns.index(entity) if entity is not None and entity in columns else None
            values = [batch.column(c).to_pylist() for c in columns]
            errors = batch.column(PARSE_ERROR_COLUMN).to_pylist()
            lines = batch.column("_source_line").to_pylist()
            for i, row in enumerate(zip(*values, strict=True)):
                line = lines[i]
                device = row[device_at] if device_at is not None else constant
                if errors[i] is not None:
                    # malformed: its fields are unknown, so is its device unless the contract fixes it
                    if device_at is None:
                        next_seq[constant] = next_seq.get(constant, start_seq) + 1
                    yield SkippedRow(source, line, f"malformed row [rule parse_error]: {errors[i]}")
                    continue
                if device is None or not device.strip():
                    yield SkippedRow(source, line, f"no device: column {entity!r} is empty [rule entity]")
                    continue
                unsafe = [c for c in _TOPIC_UNSAFE if c in device]
                if unsafe:
                    yield SkippedRow(
                        source,
                        line,
                        f"device {device!r} cannot name an MQTT topic level (has {unsafe[0]!r}) [rule entity]",
                    )
                    continue
                seq = next_seq.get(device, start_seq)
                next_seq[device] = seq + 1
                record = dict(zip(columns, row, strict=True))
                record[SEQ_FIELD] = seq
                payload = json.dumps(record, ensure_ascii=False).encode()
                if len(payload) > MAX_PAYLOAD_BYTES:
                    yield SkippedRow(
                        source,
                        line,
                        f"the message would be {len(payload)} bytes, over the live path's {MAX_PAYLOAD_BYTES} "
                        "[rule payload_size]",
                    )
                    continue
                yield FileMessage(line, device, seq, sensor_topic(dataset, device), payload)


@dataclass
class FileCheck:
    """What a file would publish: messages per device and the rows that cannot be messages."""

    source: str
    messages: int = 0
    devices: dict[str, int] = field(default_factory=dict)  # device -> messages
    last_seq: dict[str, int] = field(default_factory=dict)  # device -> its last seq
    skipped: int = 0
    first_skipped: list[SkippedRow] = field(default_factory=list)


def check_file(
    messages: Iterable[FileMessage | SkippedRow], source: str, *, limit: int | None = None, keep: int = 10
) -> FileCheck:
    """Read every row once without publishing: counts, devices, and the first `keep` skipped rows."""
    check = FileCheck(source)
    for item in messages:
        if isinstance(item, SkippedRow):
            check.skipped += 1
            if len(check.first_skipped) < keep:
                check.first_skipped.append(item)
            continue
        check.messages += 1
        check.devices[item.device] = check.devices.get(item.device, 0) + 1
        check.last_seq[item.device] = item.seq
        if limit is not None and check.messages >= limit:
            break  # rows after the last one published are not read, so not checked either
    return check


@dataclass
class PublishReport:
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    seconds: float = 0.0
    last_seq: dict[str, int] = field(default_factory=dict)  # device -> the last seq published

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def publish_file(
    publisher: FleetPublisher,
    messages: Iterable[FileMessage | SkippedRow],
    *,
    rate: float | None = None,
    window: int = 1000,
    limit: int | None = None,
    progress: Callable[[PublishReport], None] | None = None,
    progress_seconds: float = 5.0,
    stall_seconds: float = 60.0,
) -> PublishReport:
    """Publish the messages at QoS 1 and return when the broker acknowledged every one.

    At most `window` messages await acknowledgement at once (memory stays bounded whatever the
    file's size); `rate` (messages a second) paces them, or, None, the broker's acknowledgements
    do. Skipped rows are passed over (the caller checked and reported them). Raises TimeoutError
    when the broker acknowledges nothing for `stall_seconds`."""
    report = PublishReport()
    started = time.perf_counter()
    next_progress = started + progress_seconds

    def sync() -> None:
        report.acknowledged = publisher.acknowledged
        report.refused = publisher.refused
        report.seconds = time.perf_counter() - started

    def wait_below(n: int) -> None:
        """Wait until fewer than `n` messages are unacknowledged, reporting progress meanwhile."""
        nonlocal next_progress
        last_acked, last_change = publisher.acknowledged, time.monotonic()
        while not publisher.wait_inflight_below(n, min(1.0, progress_seconds)):
            now = time.monotonic()
            if publisher.acknowledged != last_acked:
                last_acked, last_change = publisher.acknowledged, now
            elif now - last_change > stall_seconds:
                sync()
                raise TimeoutError(
                    f"the broker acknowledged nothing for {stall_seconds:g}s "
                    f"({report.published - report.acknowledged} of {report.published} messages unacknowledged"
                    f"{'' if publisher.client.is_connected() else '; not connected'})"
                )
            if progress is not None and time.perf_counter() >= next_progress:
                sync()
                progress(report)
                next_progress = time.perf_counter() + progress_seconds

    for item in messages:
        if isinstance(item, SkippedRow):
            continue
        if rate:
            delay = started + report.published / rate - time.perf_counter()
            if delay > 0.001:
                time.sleep(delay)
        if publisher.published - publisher.acknowledged >= window:
            # the window full: wait until half of it is acknowledged, then send a burst (waking on
            # every acknowledgement would hand the interpreter between two threads once a message)
            wait_below(max(1, window // 2))
        publisher.publish_raw(item.topic, item.payload)
        report.published += 1
        report.last_seq[item.device] = item.seq
        if progress is not None and time.perf_counter() >= next_progress:
            sync()
            progress(report)
            next_progress = time.perf_counter() + progress_seconds
        if limit is not None and report.published >= limit:
            break
    wait_below(1)  # every message acknowledged (QoS 1): nothing left only in paho's queue
    sync()
    return report
