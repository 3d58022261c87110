"""The ingester's MQTT client (`buffered_client_class`) against a real Mosquitto: its PUBLISH fast path
hands over exactly what paho's own parser would (every message, in order, topic, payload, QoS and
packet id), and `ack_many` acknowledges exactly the messages it names (a reconnecting persistent
session gets the rest again, and only those)."""

from __future__ import annotations

import os
import random
import threading
import time

from tests.integration.test_stream import USERS, wait_for


def _client(broker, client_id: str, *, buffered: bool, clean: bool = False):
    import paho.mqtt.client as mqtt

    from pipelines.streaming.ingester import buffered_client_class

    cls = buffered_client_class() if buffered else mqtt.Client
    client = cls(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        protocol=mqtt.MQTTv311,
        manual_ack=buffered,
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    return client


class Receiver:
    """The ingester's way of receiving: fast-path batches and paho's callback into one ordered list."""

    def __init__(self, broker, client_id: str, topic: str):
        self.got: list[tuple[str, bytes, int, int]] = []
        self.fast = self.slow = 0
        self.lock = threading.Lock()
        self.client = _client(broker, client_id, buffered=True)
        self.client.username_pw_set("ingester", USERS["ingester"])
        self.client.on_message = self._on_message
        self.client.on_publishes = self._on_publishes
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        wait_for(self.client.is_connected, 10, "the receiver to connect")
        time.sleep(0.2)  # subscribed

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.got.append((msg.topic, msg.payload, msg.mid, msg.qos))
            self.slow += 1

    def _on_publishes(self, messages) -> None:
        with self.lock:
            self.got.extend(messages)
            self.fast += len(messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(broker, messages: list[tuple[str, bytes, int]]) -> None:
    pub = _client(broker, f"gateway-{os.urandom(3).hex()}", buffered=False, clean=True)
    pub.username_pw_set("gateway", USERS["gateway"])
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        infos = [pub.publish(topic, payload, qos=qos) for topic, payload, qos in messages]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        pub.disconnect()
        pub.loop_stop()


def test_the_fast_path_hands_over_every_publish_as_paho_would(broker):
    rng = random.Random(7)
    dataset = f"mqttc{os.urandom(3).hex()}"
    messages = []
    for i in range(3000):
        device = rng.choice(["d1", "device-ü2", "d" * 40])  # topic lengths and a non-ASCII topic
        # mostly readings' sizes, some around and above the 128-byte and 16 KB length-byte boundaries,
        # a few large enough that a packet spans reads of the 256 KB buffer
        roll = rng.random()
        if roll < 0.02:
            size = rng.randint(60_000, 90_000)
        elif roll < 0.1:
            size = rng.choice([125, 126, 127, 128, 16380, 16381, 16382, 16383, 16384])
        else:
            size = rng.randint(0, 200)
        payload = bytes(rng.getrandbits(8) for _ in range(min(size, 300))) * (size // 300 + 1)
        messages.append((f"sensors/{dataset}/{device}", payload[:size] + str(i).encode(), rng.choice([0, 1, 1, 1])))
    receiver = Receiver(broker, f"fast-{dataset}", f"sensors/{dataset}/+")
    try:
        _publish(broker, messages)
        wait_for(lambda: len(receiver.got) >= len(messages), 60, "every message")
        time.sleep(0.3)
        got = list(receiver.got)
        # each once, byte for byte, in order within its QoS level (MQTT orders per level only)
        for qos in (0, 1):
            assert [(t, p) for t, p, _, q in got if q == qos] == [(t, p) for t, p, q in messages if q == qos]
        assert len(got) == len(messages)
        assert all((mid > 0) == (q == 1) for _, _, mid, q in got)
        assert receiver.fast > len(messages) // 2, (receiver.fast, receiver.slow)  # the fast path took most
        receiver.client.ack_many([mid for _, _, mid, q in got if q == 1])
        time.sleep(0.5)
    finally:
        receiver.close()
    # every QoS 1 message was acknowledged: the persistent session has nothing to redeliver
    again = Receiver(broker, f"fast-{dataset}", f"sensors/{dataset}/+")
    try:
        time.sleep(1.0)
        assert again.got == []
    finally:
        again.close()


def test_ack_many_acknowledges_exactly_the_messages_it_names(broker):
    dataset = f"mqttc{os.urandom(3).hex()}"
    messages = [(f"sensors/{dataset}/d{i % 5}", f'{{"seq": {i}}}'.encode(), 1) for i in range(2000)]
    receiver = Receiver(broker, f"acks-{dataset}", f"sensors/{dataset}/+")
    try:
        _publish(broker, messages)
        wait_for(lambda: len(receiver.got) >= len(messages), 30, "every message")
        first = receiver.got[:1200]
        receiver.client.ack_many([mid for _, _, mid, _ in first])  # in arrival order, one write
        time.sleep(0.5)
    finally:
        receiver.close()
    again = Receiver(broker, f"acks-{dataset}", f"sensors/{dataset}/+")
    try:
        wait_for(lambda: len(again.got) >= 800, 30, "the unacknowledged messages again")
        time.sleep(0.5)
        assert [p for _, p, _, _ in again.got] == [p for _, p, _ in messages[1200:]]
        again.client.ack_many([mid for _, _, mid, _ in again.got])
    finally:
        again.close()
