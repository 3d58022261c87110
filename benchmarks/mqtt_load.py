"""A lean MQTT load generator for `stream_latency.py`: the simulated fleet published at QoS 1 from a
process of its own, over a plain socket.

Why not paho (`platform simulate --mqtt` uses it, for its reconnects and persistent session): paho
costs ~150 us of Python per QoS 1 message (packet queue, PUBACK handling, callbacks), so at 5,000
readings/s the load generator alone took 0.75 of a core on this 2-core machine, shared its
interpreter with the collector, and fell seconds behind its own schedule: the benchmark measured its
own backlog as the platform's latency. Here a PUBLISH is a few bytes joined per 1 ms tick and sent in
one write; PUBACKs are read in bulk and counted. The payload and the topic are exactly
`FleetPublisher.publish`'s (one JSON reading on `sensors/<dataset>/<device>`), so the ingester sees
what a fleet sends.

`publish_fleet` runs in a child process (multiprocessing, spawn) and returns the publish time of
every (device, seq), taken just before the write that carried it, on the machine's wall clock (the
collector's clock: one machine).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import struct
import threading
import time


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def connect(host: str, port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0) + _string(client_id)  # clean, no keepalive
    sock.sendall(b"\x10" + _length(len(body)) + body)
    ack = sock.recv(4)
    if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"the broker refused the load generator: CONNACK {ack!r}")
    sock.settimeout(None)
    return sock


class _Acks(threading.Thread):
    """Counts the broker's PUBACKs (4 bytes each: nothing else comes back to a publisher)."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock, self.count, self.error = sock, 0, ""

    def run(self) -> None:
        pending = b""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                self.error = str(exc)
                return
            if not data:
                return
            pending += data
            whole = len(pending) // 4
            if any(pending[i * 4] != 0x40 for i in range(whole)):
                self.error = f"unexpected packet from the broker: {pending[:8]!r}"
                return
            self.count += whole
            pending = pending[whole * 4 :]


FLEET_SEED = 11  # the simulated fleet the load publishes; stream_latency.py fits its champion on its history


def stream_start(rate: float, seconds: float, devices: int) -> dt.date:
    """The first simulated day a run at `rate` for `seconds` publishes (it ends before today)."""
    total = int(rate * seconds)
    return dt.date.today() - dt.timedelta(days=max(2, total // (devices * 1440) + 2))


def publish_fleet(
    host: str, port: int, dataset: str, start: dt.date, days: int, devices: int, rate: float, limit: int
) -> dict:
    """Publish the simulated fleet (`stream_readings`, seed FLEET_SEED) at `rate`/s; returns {"sent":
    {(device, seq): ns}, "seconds": publishing time, "started_ns": its first write, "acked": PUBACKs}."""
    from pipelines.simulator import stream_readings
    from pipelines.streaming.messages import sensor_topic

    sock = connect(host, port, f"bench-load-{time.time_ns() % 10**9}")
    acks = _Acks(sock)
    acks.start()
    # Every message is built before the clock starts: the simulator computes a day of the fleet at a
    # time, and a second spent on the next day mid-run would become a burst the platform is timed on.
    topics: dict[str, bytes] = {}
    messages: list[tuple[tuple[str, int], bytes, bytes]] = []
    for reading in stream_readings(start, days, devices=devices, freq_seconds=60, seed=FLEET_SEED):
        if len(messages) >= limit:
            break
        device = reading["device"]
        topic = topics.get(device)
        if topic is None:
            topic = topics[device] = _string(sensor_topic(dataset, device))
        messages.append(((device, reading["seq"]), topic, json.dumps(reading).encode()))
    sent: dict[tuple[str, int], int] = {}
    keys: list[tuple[str, int]] = []
    chunk: list[bytes] = []
    mid = 0
    count = 0
    started, started_ns = time.perf_counter(), time.time_ns()
    for key, topic, payload in messages:
        due = started + count / rate
        if due - time.perf_counter() > 0.001:  # a tick's messages go in one write
            if chunk:
                _flush(sock, chunk, keys, sent)
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        mid = mid % 65535 + 1
        chunk.append(b"\x32" + _length(len(topic) + 2 + len(payload)) + topic + struct.pack(">H", mid) + payload)
        keys.append(key)
        count += 1
        while count - acks.count > 60_000 and not acks.error:  # packet ids must not wrap onto unacked ones
            time.sleep(0.001)
    if chunk:
        _flush(sock, chunk, keys, sent)
    seconds = time.perf_counter() - started
    deadline = time.monotonic() + 60
    while acks.count < count and time.monotonic() < deadline and not acks.error:
        time.sleep(0.01)
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    return {"sent": sent, "seconds": seconds, "started_ns": started_ns, "acked": acks.count, "error": acks.error}


def _flush(sock: socket.socket, chunk: list[bytes], keys: list[tuple[str, int]], sent: dict) -> None:
    now = time.time_ns()
    sock.sendall(b"".join(chunk))
    for key in keys:
        sent[key] = now
    chunk.clear()
    keys.clear()
