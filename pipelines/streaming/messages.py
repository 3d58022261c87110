"""An MQTT message becomes a reading (a bronze row as delivered) or a refusal (a quarantine row).

Topic: ``sensors/<dataset>/<device>``. Payload: one JSON object with the contract's delivered
columns and ``seq``, the device's own message counter (MQTT has none: QoS 1 redelivers, and the
(device, seq) pair is how a redelivery is recognised). The topic names the device: the broker's
ACL lets a device publish to its own topic only, so a payload naming another device is refused.

What breaks the contract's *values* (a range, a type) is not refused here: bronze keeps every
reading as delivered and silver quarantines it with its rule, as for a landed file. What is not a
reading at all (no JSON object, no seq, a wrong topic, an unknown device) cannot become a bronze
row, and is refused: kept in quarantine with the rule and the raw payload, never dropped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa

from pipelines.contracts import Contract
from pipelines.layers.bronze import PARSE_ERROR_COLUMN

SENSORS = "sensors"
SEQ_FIELD = "seq"
MAX_PAYLOAD_BYTES = 64 * 1024
_RAW_KEPT = 2000  # characters of a refused payload kept in quarantine


def sensor_topic(dataset: str, device: str) -> str:
    return f"{SENSORS}/{dataset}/{device}"


def subscription(dataset: str) -> str:
    return f"{SENSORS}/{dataset}/+"


@dataclass(slots=True)
class Reading:
    """One accepted message: its delivered values (as text, the bronze convention) and identity."""

    device: str
    seq: int
    values: dict[str, str | None]
    topic: str
    partition: str  # event-time partition; the receipt date when the time cannot be read
    received_ns: int = field(default_factory=time.time_ns)


@dataclass(slots=True)
class Refusal:
    """A message that is not a reading, with the rule it broke and why."""

    topic: str
    rule: str
    reason: str
    payload: str
    received_ns: int = field(default_factory=time.time_ns)

    @property
    def device(self) -> str:
        parts = self.topic.split("/")
        return parts[2] if len(parts) == 3 else ""


def _text(value) -> str | None:
    """A JSON value as bronze keeps it: strings as they are, other scalars rendered as JSON.

    A finite float or an int renders as its repr, which is what `json.dumps` writes for them, at a
    tenth of its cost (every field of every message passes here, twice: ingester and scorer)."""
    kind = type(value)
    if kind is str or value is None:
        return value
    if kind is float and math.isfinite(value) or kind is int:
        return repr(value)
    if kind is bool:
        return "true" if value else "false"
    return json.dumps(value)


class MessageReader:
    """Turns (topic, payload) into a Reading or a Refusal for one dataset and contract."""

    def __init__(self, dataset: str, contract: Contract, known_devices: frozenset[str] = frozenset()):
        self.dataset = dataset
        self.contract = contract
        self.known_devices = known_devices
        self.device_field = contract.entity.source
        self.time_field = contract.event_time.source
        self.epoch = contract.event_time.source_format == "epoch_seconds"
        # Delivered columns in the contract's order: every bronze batch of the stream has one schema.
        self.columns: list[str] = [c for c in (self.time_field, self.device_field) if c]
        for spec in contract.columns:
            if spec.source not in self.columns:
                self.columns.append(spec.source)
        if contract.label is not None and contract.label.source not in self.columns:
            self.columns.append(contract.label.source)

    def read(self, topic: str, payload: bytes) -> Reading | Refusal:
        return self.read_many([(topic, payload)])[0]

    def read_many(self, messages: list[tuple[str, bytes]]) -> list[Reading | Refusal]:
        """Each (topic, payload) as a Reading or a Refusal. The event dates of the readings are
        parsed together, by the lake's own parser: per message, a format like NAB's
        "%Y-%m-%d %H:%M:%S" cost 4.4 ms of Arrow and pandas setup (some 230 readings/s)."""
        items = [self._read(topic, payload) for topic, payload in messages]
        readings = [item for item in items if isinstance(item, Reading)]
        if readings:
            dates = self.partitions_of([r.values.get(self.time_field) for r in readings])
            for reading, date in zip(readings, dates, strict=True):
                reading.partition = date
        return items

    def _read(self, topic: str, payload: bytes) -> Reading | Refusal:
        raw = payload[:_RAW_KEPT].decode("utf-8", "replace")
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != SENSORS or parts[1] != self.dataset or not parts[2]:
            return Refusal(topic, "topic", f"expected {sensor_topic(self.dataset, '<device>')}, got {topic!r}", raw)
        device = parts[2]
        if self.known_devices and device not in self.known_devices:
            return Refusal(topic, "unknown_device", f"device {device!r} is not registered for {self.dataset}", raw)
        if len(payload) > MAX_PAYLOAD_BYTES:
            return Refusal(topic, "payload_size", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}", raw)
        try:
            record = json.loads(payload)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            return Refusal(topic, "parse_error", f"not JSON ({exc})", raw)
        if not isinstance(record, dict):
            return Refusal(topic, "parse_error", f"not a JSON object but {type(record).__name__}", raw)
        seq = record.pop(SEQ_FIELD, None)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            return Refusal(
                topic, "seq", f"{SEQ_FIELD}={seq!r}: each message needs the device's counter, an int >= 0", raw
            )
        named = record.get(self.device_field) if self.device_field else None
        if named is not None and named != device:
            return Refusal(
                topic,
                "device_mismatch",
                f"payload {self.device_field}={named!r} but the topic's device is {device!r}",
                raw,
            )
        if self.device_field:
            record[self.device_field] = device
        values = {k: _text(v) for k, v in record.items()}
        return Reading(device, seq, values, topic, "")  # the partition: read_many, with the others

    def partitions_of(self, stamps: list[str | None]) -> list[str]:
        """The event date of each time, parsed as silver parses it (epoch seconds: per value, in
        Python; anything else: all at once by `event_dates`). The receipt date when unreadable."""
        out: list[str | None] = [None] * len(stamps)
        rest = []
        for i, ts in enumerate(stamps):
            if self.epoch and ts is not None:
                try:
                    seconds = float(ts)
                    if seconds == seconds and abs(seconds) < 9.2e12:  # not NaN, in range
                        out[i] = time.strftime("%Y-%m-%d", time.gmtime(seconds // 86400 * 86400))
                        continue
                except (ValueError, OverflowError):
                    pass
            rest.append(i)
        if rest:
            from pipelines.layers.partitioning import event_dates

            table = pa.table({self.time_field: pa.array([stamps[i] for i in rest], pa.string())})
            today = time.strftime("%Y-%m-%d", time.gmtime())
            for i, date in zip(rest, event_dates(table, self.contract).tolist(), strict=True):
                out[i] = date if isinstance(date, str) else today
        return out  # type: ignore[return-value]


STREAM_SOURCE = "mqtt://"  # a streamed reading's `_source_key` prefix (a landed file's is its s3:// key)


def bronze_table(readings: list[Reading], columns: list[str], *, batch_key: str, run_id: str, ingested_at) -> pa.Table:
    """Readings in bronze's one layout: delivered columns as text, `_parse_error`, lineage.

    Lineage of a streamed reading: `_source_key` is the MQTT topic (mqtt://sensors/<ds>/<device>),
    `_source_line` the device's seq (the line number of a landed file plays the same role: where
    in its source the record came from), `_source_etag` the micro-batch key."""
    values = [r.values for r in readings]
    extra = sorted(set().union(*values) - set(columns))
    names = [*columns, *extra]
    # one conversion of the rows' dicts in Arrow (a missing key is a null), not a Python pass per column
    delivered = pa.Table.from_pylist(values, schema=pa.schema([(c, pa.string()) for c in names]))
    data: dict[str, pa.Array] = dict(zip(names, delivered.columns, strict=True))
    n = len(readings)
    data[PARSE_ERROR_COLUMN] = pa.nulls(n, pa.string())
    data["_source_key"] = pa.array([f"{STREAM_SOURCE}{r.topic}" for r in readings], pa.string())
    data["_source_etag"] = pa.repeat(pa.scalar(batch_key, pa.string()), n)
    data["_source_line"] = pa.array([r.seq for r in readings], pa.int64())
    data["_ingest_run_id"] = pa.repeat(pa.scalar(run_id, pa.string()), n)
    data["_ingested_at"] = pa.repeat(pa.scalar(ingested_at, pa.timestamp("us", tz="UTC")), n)
    return pa.table(data)


QUARANTINE_COLUMNS = ("topic", "device", "rule", "reason", "payload", "received_at")


def refusal_table(refusals: list[Refusal]) -> pa.Table:
    return pa.table(
        {
            "topic": pa.array([r.topic for r in refusals], pa.string()),
            "device": pa.array([r.device for r in refusals], pa.string()),
            "rule": pa.array([r.rule for r in refusals], pa.string()),
            "reason": pa.array([r.reason for r in refusals], pa.string()),
            "payload": pa.array([r.payload for r in refusals], pa.string()),
            "received_at": pa.array([r.received_ns // 1000 for r in refusals], pa.timestamp("us", tz="UTC")),
        }
    )
