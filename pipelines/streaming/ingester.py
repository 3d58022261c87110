"""`platform stream`: MQTT readings into bronze exactly once, scored online, anomalies alerted.

Threads, one job each:
  network   paho's loop: receives messages (QoS 1, persistent session) and queues them; it never
            acknowledges (manual_ack), so an unacknowledged message stays the broker's to redeliver;
  intake    reads each message (a reading or a refusal), drops what bronze already holds or the open
            batch already has, hands new readings to the scorer and closes the micro-batch at
            `batch_max_readings` messages or `batch_max_seconds` after its first;
  scorer    (in-process mode only; `platform stream` scores in a process of its own, see `live`)
            scores everything that queued during its previous pass: alerts and device state;
  committer commits a closed batch to bronze (and refusals to quarantine), and only then
            acknowledges its messages, in the order they came, then announces the commit.
A crash anywhere before a batch's manifests are written leaves its messages unacknowledged: the
broker redelivers them to the next session. A crash after the commit and before the
acknowledgements redelivers readings bronze already holds: the ledger leaves them out. Either way
each reading is in bronze exactly once.

A worker thread that raises (intake, committer, paho's network thread) is never silent: its
exception is logged once with the thread's name and traceback, recorded (`failure()`: /health
answers 503 naming it, /status shows it) and `on_failure` is called: `platform stream` then stops
as on SIGTERM and exits non-zero, for its supervisor to restart it. What the dead thread held
unacknowledged is redelivered by the broker to the next session.

An acknowledgement names a packet id of one connection: after a reconnect the same id may belong to
another, uncommitted message. Messages remember the connection they came on and are acknowledged
only on it; those of a lost connection are redelivered and recognised as duplicates.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.settings import StreamSettings
from pipelines.streaming.commit import BronzeCommitter, CommitResult
from pipelines.streaming.messages import MessageReader, Reading, Refusal, subscription

log = logging.getLogger("pipelines.streaming")


@dataclass(slots=True)
class Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    connection: int
    received_ns: int


@dataclass
class MicroBatch:
    opened: float = field(default_factory=time.monotonic)
    readings: list[Reading] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    acks: list[tuple[int, int, int]] = field(default_factory=list)  # (connection, mid, qos) in arrival order
    duplicates: int = 0
    first_received_ns: int = 0

    @property
    def messages(self) -> int:
        return len(self.acks)


@dataclass
class IngestStats:
    received: int = 0
    readings: int = 0
    refused: int = 0
    duplicates: int = 0
    committed_rows: int = 0
    commits: int = 0
    commit_failures: int = 0
    acked: int = 0
    ack_skipped_reconnected: int = 0
    connected: bool = False
    connections: int = 0
    commit_seconds: float = 0.0
    commit_phase_seconds: dict[str, float] = field(default_factory=dict)
    last_commit: dict[str, Any] = field(default_factory=dict)
    refused_rules: dict[str, int] = field(default_factory=dict)


class Ingester:
    def __init__(
        self,
        dataset: str,
        cfg: StreamSettings,
        *,
        store,
        scorer=None,
        state=None,
        notifier=None,
        grain: str = "day",
        scoring=None,
    ):
        """`scorer`/`state`: score in this process (threads); or `scoring`: where accepted readings
        go instead (`live.ScoringPipe`, to the scorer child of `platform stream`)."""
        from pipelines.contracts import load_contract
        from pipelines.datasets import get_dataset

        self.dataset, self.cfg, self.store = dataset, cfg, store
        self.contract = load_contract(get_dataset(dataset).contract_path)
        self.reader = MessageReader(dataset, self.contract, cfg.device_allow_list())
        self.run_id = f"stream-{cfg.session_id(dataset)}"
        self.committer = BronzeCommitter(store, dataset, self.contract, self.reader.columns, grain, self.run_id)
        self.scorer, self.state, self.notifier = scorer, state, notifier
        self.stats = IngestStats()
        from pipelines.metrics import IngestMetrics

        self.metrics = IngestMetrics(dataset)  # Prometheus counters (GET /metrics)
        self._inbox: collections.deque[Inbound] = collections.deque()
        self._arrived = threading.Event()
        self.scoring = scoring
        if scoring is None and (scorer is not None or state is not None):
            from pipelines.streaming.live import ScoringWorker

            self.scoring = ScoringWorker(
                dataset,
                scorer,
                state,
                self._publish,
                columns=self.reader.columns,
                alerts_topic=cfg.alerts_topic,
                run_id=self.run_id,
                interval=cfg.score_interval_seconds,
            )
        self._closed: queue.Queue[MicroBatch | None] = queue.Queue(maxsize=2)  # backpressure on intake
        self._batch = MicroBatch()
        self._in_flight: set[tuple[str, int]] = set()  # (device, seq) in open or committing batches
        self._in_flight_lock = threading.Lock()
        self._connection = 0
        self._ack_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.failures: list[str] = []  # "stream-intake died: ValueError: ...", one per dead thread
        self._dead: set[str] = set()  # the names of the threads that died
        self._failure_lock = threading.Lock()
        self.on_failure: Callable[[], Any] | None = None  # called once a thread died (`platform stream`: exit)
        self.client = self._mqtt_client()

    # -- MQTT ---------------------------------------------------------------------------------
    def _mqtt_client(self):
        import paho.mqtt.client as mqtt

        client = buffered_client_class()(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.cfg.session_id(self.dataset),
            clean_session=False,  # the broker keeps our subscription and queues QoS 1 while we are away
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if self.cfg.mqtt_username:
            client.username_pw_set(self.cfg.mqtt_username, self.cfg.secret("mqtt_password"))
        client.max_inflight_messages_set(1000)  # our alerts and commit events
        client.max_queued_messages_set(100_000)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message  # what the fast path leaves to paho
        client.on_publishes = self._on_publishes
        client.on_thread_failure = self._thread_died  # the network thread raised: nothing more arrives
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        with self._ack_lock:
            self._connection += 1
            self.stats.connected = True
            self.stats.connections += 1
        client.subscribe(subscription(self.dataset), qos=1)
        log.info("connected (session present: %s), subscribed to %s", flags.session_present, subscription(self.dataset))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._ack_lock:
            self._connection += 1  # ids of the lost connection must not be acknowledged on the next
            self.stats.connected = False
        log.warning("disconnected from the broker: %s", reason_code)

    def _on_message(self, client, userdata, msg) -> None:  # a PUBLISH the fast path left to paho
        self._on_publishes([(msg.topic, msg.payload, msg.mid, msg.qos)])

    def _on_publishes(self, messages: list[tuple[str, bytes, int, int]]) -> None:
        connection, now = self._connection, time.time_ns()
        self._inbox.extend(Inbound(topic, payload, mid, qos, connection, now) for topic, payload, mid, qos in messages)
        self._arrived.set()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Ingester:
        if self.scoring is not None:
            self.scoring.start()
        for target, name in ((self._intake_loop, "stream-intake"), (self._commit_loop, "stream-committer")):
            thread = threading.Thread(target=self._guarded, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.client.connect_async(self.cfg.mqtt_host, self.cfg.mqtt_port, keepalive=self.cfg.keepalive_seconds)
        self.client.loop_start()
        return self

    def _guarded(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - a worker that dies must say so, not vanish
            self._thread_died(exc)

    def _thread_died(self, exc: BaseException) -> None:
        """The current thread raised `exc` and ends: log it once, with its traceback; record it for
        /health and /status; tell `on_failure`. The other threads see it: the intake stops taking
        messages when the committer is gone, the committer ends once the intake's batches are in."""
        name = threading.current_thread().name
        text = f"{name} died: {type(exc).__name__}: {exc}"
        with self._failure_lock:
            self.failures.append(text)
            self._dead.add(name)
        log.error(
            "ingester thread %s died; nothing more is ingested: stopping (unacknowledged readings are "
            "redelivered to the next session)",
            name,
            exc_info=exc,
        )
        self._arrived.set()
        callback = self.on_failure
        if callback is not None:
            callback()

    def failure(self) -> str | None:
        """Why the ingester no longer ingests (a worker thread died), or None while it does."""
        with self._failure_lock:
            return "; ".join(self.failures) or None

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stats.connected:
            time.sleep(0.02)
        return self.stats.connected

    def stop(self, timeout: float = 30.0) -> None:
        """Commit and acknowledge what was received, then disconnect (SIGTERM's path)."""
        self._stop.set()
        self._arrived.set()
        for thread in self._threads:
            thread.join(timeout)
        if self.scoring is not None:
            self.scoring.stop(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        if self.notifier is not None:
            self.notifier.stop()

    # -- intake ------------------------------------------------------------------------------------
    def _intake_loop(self) -> None:
        while True:
            self._arrived.wait(0.05)
            self._arrived.clear()
            if "stream-committer" in self._dead:
                return  # nothing taken now could be committed: the broker redelivers it after the restart
            stopping = self._stop.is_set()
            fresh: list[Reading] = []
            messages = [self._inbox.popleft() for _ in range(len(self._inbox))]
            taken = len(messages)
            # Read together: the event dates of a pass are parsed in one call of the lake's parser.
            items = self.reader.read_many([(m.topic, m.payload) for m in messages]) if messages else []
            for message, item in zip(messages, items, strict=True):
                fresh_one = self._take(message, item)
                if fresh_one is not None:
                    fresh.append(fresh_one)
                if self._batch.messages >= self.cfg.batch_max_readings:
                    self._close_batch()
            if taken:  # one increment a pass: a multiprocess counter's inc costs a lock and an mmap write
                self.metrics.received.inc(taken)
            if fresh and self.scoring is not None:
                self.scoring.submit(fresh)
            if self._batch.messages and (
                stopping or time.monotonic() - self._batch.opened >= self.cfg.batch_max_seconds
            ):
                self._close_batch()
            if stopping and not self._inbox:
                self._hand_over(None)
                return

    def _take(self, message: Inbound, item: Reading | Refusal) -> Reading | None:
        batch = self._batch
        if not batch.messages:
            batch.opened = time.monotonic()
            batch.first_received_ns = message.received_ns
        batch.acks.append((message.connection, message.mid, message.qos))
        self.stats.received += 1
        if isinstance(item, Refusal):
            item.received_ns = message.received_ns
            batch.refusals.append(item)
            self.stats.refused += 1
            self.stats.refused_rules[item.rule] = self.stats.refused_rules.get(item.rule, 0) + 1
            self.metrics.quarantined(item.rule)
            return None
        item.received_ns = message.received_ns
        key = (item.device, item.seq)
        with self._in_flight_lock:
            duplicate = key in self._in_flight
            if not duplicate:
                duplicate = self.committer.already_committed(item)
            if not duplicate:
                self._in_flight.add(key)
        if duplicate:
            batch.duplicates += 1
            self.stats.duplicates += 1
            self.metrics.duplicates.inc()
            return None
        batch.readings.append(item)
        self.stats.readings += 1
        return item

    def _close_batch(self) -> None:
        batch, self._batch = self._batch, MicroBatch()
        self._hand_over(batch)

    def _hand_over(self, item: MicroBatch | None) -> None:
        """To the committer. Blocks while two batches wait (the broker's in-flight window then fills),
        unless the committer died: then the batch stays unacknowledged, for the broker to redeliver."""
        while "stream-committer" not in self._dead:
            try:
                self._closed.put(item, timeout=0.25)
                return
            except queue.Full:
                continue

    def _publish(self, topic: str, payload: str) -> None:
        self.client.publish(topic, payload, qos=1)

    # -- commits -----------------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            try:
                batch = self._closed.get(timeout=0.25)
            except queue.Empty:
                if "stream-intake" in self._dead:
                    return  # the batches it closed are committed: no more will come
                continue
            if batch is None:
                return
            result = self._commit_with_retry(batch)
            self._ack(batch)
            with self._in_flight_lock:
                self._in_flight.difference_update((r.device, r.seq) for r in batch.readings)
            self._announce(batch, result)

    def _commit_with_retry(self, batch: MicroBatch) -> CommitResult:
        delay = 0.5
        while True:
            try:
                return self.committer.commit(batch.readings, batch.refusals)
            except Exception:  # noqa: BLE001 - nothing is acknowledged until the commit succeeds
                self.stats.commit_failures += 1
                self.metrics.commit_failures.inc()
                log.exception("bronze commit failed; retrying in %.1fs (messages stay unacknowledged)", delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _ack(self, batch: MicroBatch) -> None:
        with self._ack_lock:
            current = self._connection
            mids = []
            for connection, mid, qos in batch.acks:
                if qos == 0:
                    continue
                if connection != current:
                    self.stats.ack_skipped_reconnected += 1
                    continue
                mids.append(mid)
            self.client.ack_many(mids)  # in arrival order, one write
            self.stats.acked += len(mids)

    def _announce(self, batch: MicroBatch, result: CommitResult) -> None:
        self.stats.commits += 1
        self.stats.committed_rows += result.rows
        self.metrics.committed_batch(result.rows, result.seconds, batch.first_received_ns)
        event = {
            "dataset": self.dataset,
            "partitions": result.partitions,
            "rows": result.rows,
            "duplicates": result.duplicates + batch.duplicates,
            "refused": result.refused,
            "runs": {d: [list(r) for r in runs] for d, runs in result.runs.items()},
            "commit_seconds": round(result.seconds, 4),
            "commit_phases": {k: round(v, 4) for k, v in result.phases.items()},
            "committed_at": time.time(),
            "first_received_at": batch.first_received_ns / 1e9,
        }
        self.stats.last_commit = {k: v for k, v in event.items() if k != "runs"}
        self.stats.commit_seconds += result.seconds
        for phase, seconds in result.phases.items():
            self.stats.commit_phase_seconds[phase] = self.stats.commit_phase_seconds.get(phase, 0.0) + seconds
        self.client.publish(f"{self.cfg.commits_topic}/{self.dataset}/commits", json.dumps(event), qos=1)
        if self.notifier is not None and result.partitions:
            self.notifier.touched(result.partitions)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset, "failed": self.failure(), "ingest": self.stats.__dict__.copy()}
        out["ingest"]["inbox"] = len(self._inbox)
        if self.scoring is not None:
            out["scoring"] = self.scoring.status()
        if self.notifier is not None:
            out["airflow"] = {"sent_events": self.notifier.sent_events, "last_error": self.notifier.last_error}
        return out


_READ_CHUNK = 256 * 1024
_PUBACK = 0x40


@functools.cache
def buffered_client_class():
    """paho's `Client` reading the socket in large chunks, with a fast path for PUBLISH packets.

    paho reads a packet in three or four `recv` calls (one byte of type, one per length byte, then
    the rest) and one packet per wake-up of its select loop. Each call gives up the interpreter lock,
    and in the ingester getting it back means waiting behind the intake and commit threads: at
    5,000 messages/s the receive thread fell seconds behind the broker with a core to spare. This
    client takes what the socket holds in one `recv`, serves paho's small reads from that buffer and
    keeps reading packets while it holds any.

    With `on_publishes` set (a callable taking a list of (topic, payload, mid, qos)), the complete
    QoS 0 and 1 PUBLISH packets of an MQTT 3.1.1 connection are cut out of that buffer here, in one
    loop, and handed over together: paho's per-packet path (a message object, a debug-log call, the
    topic matcher and its callback lock for each) cost a fifth of the ingester's process at 5,000
    readings/s. Everything else (CONNACK, SUBACK, PUBACK, PINGRESP, QoS 2, a packet not yet whole,
    a topic that is not UTF-8, MQTT 5 properties) goes through paho's own parser, state and
    callbacks. `ack_many` acknowledges many QoS 1 messages with one write (one queued blob of
    PUBACKs instead of a queue entry, a wake-up and a send per message)."""
    import paho.mqtt.client as mqtt

    class BufferedClient(mqtt.Client):
        def __init__(self, *args, **kwargs):
            self._read_buffer = bytearray()
            self.on_publishes = None
            self.on_thread_failure = None  # called with the exception that ends the network thread
            super().__init__(*args, **kwargs)

        def _thread_main(self) -> None:  # loop_start's thread: an exception would end it silently
            try:
                super()._thread_main()
            except BaseException as exc:
                if self.on_thread_failure is None:
                    raise
                self.on_thread_failure(exc)

        def _sock_recv(self, bufsize: int) -> bytes:
            if not self._read_buffer:
                data = super()._sock_recv(_READ_CHUNK)  # BlockingIOError when the socket is empty
                if not data:
                    return data  # the broker closed the connection
                self._read_buffer += data
            out = bytes(self._read_buffer[:bufsize])
            del self._read_buffer[:bufsize]
            return out

        def loop_read(self, max_packets: int = 1):
            rc = super().loop_read(max_packets)  # the first packet of a wake-up fills the buffer
            while rc == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._read_buffer and self._sock is not None:
                if self._drain_publishes() and not self._read_buffer:
                    break
                rc = super().loop_read(max_packets)  # the socket will not wake select() for these
            return rc

        def _drain_publishes(self) -> int:
            """Cut the whole QoS 0/1 PUBLISH packets at the head of the buffer out and hand them to
            `on_publishes`; stop at the first packet paho must see. Returns how many were cut."""
            handler = self.on_publishes
            if handler is None or self._in_packet["command"] != 0 or self._protocol != mqtt.MQTTv311:
                return 0
            buf = self._read_buffer
            size, pos = len(buf), 0
            out = []
            while pos < size:
                header = buf[pos]
                qos = (header >> 1) & 3
                if header & 0xF0 != 0x30 or qos == 2:
                    break
                length, mult, i = 0, 1, pos + 1
                while i < size and i - pos <= 4:
                    byte = buf[i]
                    length += (byte & 127) * mult
                    mult *= 128
                    i += 1
                    if not byte & 128:
                        break
                else:
                    break  # the length is not all here yet (or is malformed: paho says so)
                end = i + length
                if end > size or length < 2:
                    break
                topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                body = topic_end + (2 if qos else 0)
                if body > end:
                    break
                try:
                    topic = buf[i + 2 : topic_end].decode("utf-8")
                except UnicodeDecodeError:
                    break
                mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
                out.append((topic, bytes(buf[body:end]), mid, qos))
                pos = end
            if pos:
                del buf[:pos]
                with self._msgtime_mutex:
                    self._last_bytes_received = mqtt.time_func()
                handler(out)
            return len(out)

        def ack_many(self, mids: list[int]) -> None:
            """Acknowledge these QoS 1 messages (manual_ack) in one queued write."""
            if mids:
                packet = b"".join(struct.pack("!BBH", _PUBACK, 2, mid) for mid in mids)
                self._packet_queue(_PUBACK, packet, 0, 0)

        def reconnect(self):
            self._read_buffer.clear()  # what the old connection left is not the new one's
            return super().reconnect()

    return BufferedClient


def build_scorer(dataset: str, cfg: StreamSettings, settings, store, models=None):
    """The online scorer of a dataset: its gold windows, and the champion (a `ModelManager` polling
    the registry and the canary's rollout state, unless `models` is given)."""
    from pipelines.contracts import load_contract
    from pipelines.datasets import effective_params, get_dataset
    from pipelines.streaming.scoring import OnlineScorer

    ds = get_dataset(dataset)
    if models is None:
        from pipelines.serving.models import ModelManager

        models = ModelManager(settings, ds.model_name, cfg.model_poll_seconds, store)
        models.start()
    from pipelines.metrics import watch_models

    watch_models(models)  # the loaded versions and the canary stage on GET /metrics
    gold = effective_params(dataset)["gold"]
    return OnlineScorer(load_contract(ds.contract_path), gold["window"], gold["long_window"], models, ds.model_name)


def build_scorer_process(dataset: str, cfg: StreamSettings | None = None, *, source, store=None, models=None):
    """`platform stream --role scorer`: scoring, alerts and device state in a process of their own,
    fed the ingester's readings on `source` (its stdin)."""
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore
    from pipelines.streaming.live import ScorerProcess
    from pipelines.streaming.state import state_store

    settings = get_settings()
    cfg = cfg or settings.stream
    store = store or ObjectStore(settings)
    scorer = build_scorer(dataset, cfg, settings, store, models) if cfg.scoring else None
    state = state_store(cfg.redis_url, dataset, cfg.secret("redis_password"))
    return ScorerProcess(dataset, cfg, store=store, scorer=scorer, state=state, source=source)


def build_ingester(
    dataset: str,
    cfg: StreamSettings | None = None,
    *,
    store=None,
    models=None,
    score_in_process: bool = True,
    scoring=None,
) -> Ingester:
    """The ingester: the stack's store, the Airflow notifier as configured and, when scoring in this
    process (tests, small fleets), the registry's champion and the state store; or `scoring`, the
    pipe to a scorer process."""
    from pipelines.datasets import get_dataset
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore
    from pipelines.streaming.notify import AirflowAssetNotifier
    from pipelines.streaming.state import state_store

    settings = get_settings()
    cfg = cfg or settings.stream
    store = store or ObjectStore(settings)
    ds = get_dataset(dataset)
    scorer = build_scorer(dataset, cfg, settings, store, models) if cfg.scoring and score_in_process else None
    notifier = None
    if cfg.airflow_api_url:
        password = cfg.secret("airflow_password")
        notifier = AirflowAssetNotifier(
            cfg.airflow_api_url,
            ds.stream_asset_uri(settings.lake_bucket),
            dataset,
            username=cfg.airflow_username,
            password=password,
            interval_seconds=cfg.notify_interval_seconds,
        ).start()
    return Ingester(
        dataset,
        cfg,
        store=store,
        scorer=scorer,
        state=state_store(cfg.redis_url, dataset, cfg.secret("redis_password")) if score_in_process else None,
        notifier=notifier,
        grain=ds.grain,
        scoring=scoring,
    )
