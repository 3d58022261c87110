"""`platform simulate --mqtt`: the simulated fleet published to the broker at a steady rate.

Readings come from `pipelines.simulator.stream_readings` (the simulator's own data, time-major,
each with its device's `seq`), one JSON message each on `sensors/<dataset>/<device>` at QoS 1. The
publisher keeps a persistent session and paho's own queue: a message published while the broker is
away is sent on reconnect, and `wait_for_publish` in `flush()` returns when the broker has every one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from pipelines.streaming.messages import sensor_topic


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
    ):
        import paho.mqtt.client as mqtt

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
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.acknowledged += 1

    def publish(self, dataset: str, reading: dict, qos: int = 1):
        info = self.client.publish(sensor_topic(dataset, reading["device"]), json.dumps(reading), qos=qos)
        self.published += 1
        return info

    def publish_raw(self, topic: str, payload: bytes | str, qos: int = 1):
        info = self.client.publish(topic, payload, qos=qos)
        self.published += 1
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
