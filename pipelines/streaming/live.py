"""Online scoring of the live stream: readings in, alerts and device state out.

`ScoringWorker` scores whatever queued while it scored the previous pass (one `OnlineScorer` call,
so the fixed cost of silver's and gold's functions is paid once per pass, not per reading),
publishes an alert for each reading at or above its model's threshold on `alerts/<dataset>/<device>`
and writes each device's latest state.

`platform stream` runs it in a process of its own (`ScorerProcess`, `--role scorer`), fed by the
ingester over a pipe (`ScoringPipe`) with the readings it accepted: pandas' work in the scorer would
otherwise hold the ingester's interpreter lock and delay its commits (at 5,000 readings/s on two
shared cores the p99 from publish to bronze commit was 16.5 s with scoring in the ingester's
process, 1.6-2.2 s with scoring in its own). It starts warm: each device's tail is read back from
the bronze readings the ingester committed, so the first readings after a restart get the same
windows as gold gives them. Readings that arrive while the scorer is down are committed by the
ingester but not alerted on (replaying them after the tail was rebuilt from bronze would count them
twice in the windows).
"""

from __future__ import annotations

import collections
import json
import logging
import pickle
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from pipelines.streaming.ledger import SeqSet
from pipelines.streaming.messages import STREAM_SOURCE, Reading, bronze_table

log = logging.getLogger("pipelines.streaming")


class ScoringWorker:
    def __init__(
        self,
        dataset: str,
        scorer,
        state,
        publish: Callable[[str, str], Any],
        *,
        columns: list[str],
        alerts_topic: str = "alerts",
        run_id: str = "online",
        interval: float = 0.0,
    ):
        self.dataset, self.scorer, self.state, self.publish = dataset, scorer, state, publish
        self.columns, self.alerts_topic, self.run_id = columns, alerts_topic, run_id
        self.interval = interval  # a pass starts at most this often (StreamSettings.score_interval_seconds)
        self.scored = 0
        self.alerts = 0
        self.failures = 0
        from pipelines.metrics import ScorerMetrics

        self.metrics = ScorerMetrics(dataset)  # Prometheus counters (GET /metrics)
        self._queue: collections.deque[Reading] = collections.deque()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stream-scorer", daemon=True)

    def start(self) -> ScoringWorker:
        self._thread.start()
        return self

    def submit(self, readings: list[Reading]) -> None:
        self._queue.extend(readings)
        self._ready.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._ready.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        from threadpoolctl import threadpool_limits

        # OpenMP and BLAS on this thread only: HistGradientBoosting's predict is one OpenMP region per
        # tree, each ending at a barrier that waits for a time slice on every core it spread to while
        # the broker, the ingester and the MQTT threads share them (the serving stall of issue 18).
        threadpool_limits(limits=1)
        while True:
            self._ready.wait(0.05)
            self._ready.clear()
            pending = [self._queue.popleft() for _ in range(len(self._queue))]
            if pending:
                started = time.monotonic()
                self.score(pending)
                rest = self.interval - (time.monotonic() - started)
                if rest > 0:
                    self._stop.wait(rest)  # the readings of the interval gather into the next pass
            elif self._stop.is_set():
                return

    def score(self, readings: list[Reading]) -> None:
        try:
            scored = []
            if self.scorer is not None:
                from datetime import UTC, datetime

                table = bronze_table(
                    readings, self.columns, batch_key="online", run_id=self.run_id, ingested_at=datetime.now(UTC)
                )
                scored = self.scorer.score_bronze(table)
            self.scored += len(scored)
            self.metrics.scored.inc(len(scored))
            by_key = {(r.device, r.seq): r for r in readings}
            latest: dict[str, dict[str, Any]] = {}
            last = {s.device: i for i, s in enumerate(scored)}  # each device's latest scored reading
            now = time.time()
            for i, s in enumerate(scored):
                if not s.is_anomaly and last[s.device] != i:
                    continue  # neither an alert nor the device's latest state: no event to build
                reading = by_key.get((s.device, s.seq))
                event = {
                    "dataset": self.dataset,
                    "device": s.device,
                    "seq": s.seq,
                    "ts": s.ts.isoformat(),
                    "score": s.score,
                    "threshold": s.threshold,
                    "is_anomaly": s.is_anomaly,
                    "model_version": s.model_version,
                    "role": s.role,
                    "reading": reading.values if reading else None,
                    "received_at": reading.received_ns / 1e9 if reading else None,  # by the ingester
                    "scored_at": now,
                }
                if s.shadow:
                    event["shadow"] = s.shadow
                if s.is_anomaly:
                    self.publish(f"{self.alerts_topic}/{self.dataset}/{s.device}", json.dumps(event))
                    self.alerts += 1
                    self.metrics.alerts.inc()
                latest[s.device] = event
            if self.state is not None and latest:
                self.state.put_many(list(latest.values()))
        except Exception:  # noqa: BLE001 - scoring must never stop the stream
            self.failures += 1
            self.metrics.failures.inc()
            log.exception("online scoring failed for %d readings (they are still committed)", len(readings))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scored": self.scored,
            "alerts": self.alerts,
            "failures": self.failures,
            "queued": len(self._queue),
        }
        if self.scorer is not None:
            out |= self.scorer.stats.__dict__
        return out


def warm_tails(scorer, store, dataset: str, contract, days: int = 2):
    """Each device's tail from the bronze readings already committed (the latest `days` event-date
    partitions): what gold's windows would read. Returns those silver rows (their seqs are in
    `_source_line`: the caller does not score them again)."""
    import pandas as pd

    from pipelines import storage
    from pipelines.layers.silver import to_silver

    partitions = storage.list_partitions(store, "bronze", dataset)[-days:]
    frames = []
    for partition in partitions:
        silver, _ = to_silver(storage.read_partition(store, "bronze", dataset, partition), contract)
        frames.append(silver)
    if not frames:
        scorer.warm_streams(pd.DataFrame())  # nothing to replay; the model's states loaded before readings
        return None
    silver = pd.concat(frames, ignore_index=True)
    scorer.features.warm_up(silver)
    for role, count in scorer.warm_streams(silver).items():
        log.info("%s: %d committed readings after its training replayed into its device states", role, count)
    return silver


def streamed_seqs(silver, device_column: str) -> dict[str, SeqSet]:
    """Each device's seqs among silver rows read back from bronze: streamed rows only, whose
    `_source_line` is the device's seq. A landed file's `_source_line` is its line number, which says
    nothing of which seqs were streamed (the ledger skips landed deliveries the same way): counting it
    had a reading with seq 11,000 streamed after a landed 11,000-row file go unscored."""
    streamed = silver[silver["_source_key"].astype("str").str.startswith(STREAM_SOURCE)]
    out: dict[str, SeqSet] = {}
    for name, seq in zip(streamed[device_column], streamed["_source_line"], strict=True):
        out.setdefault(name, SeqSet()).add(int(seq))
    return out


FRAME = struct.Struct(">I")  # a frame on the ingester -> scorer pipe: its length, then a pickle


def encode_readings(readings: list[Reading]) -> bytes:
    """One frame of readings for the scorer child: tuples of plain values, pickled (the pipe joins a
    parent and the child it started, nothing else writes to it)."""
    payload = pickle.dumps(
        [(r.device, r.seq, r.values, r.topic, r.partition, r.received_ns) for r in readings],
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    return FRAME.pack(len(payload)) + payload


def read_frames(source: BinaryIO):
    """The readings of each frame until the writer closes the pipe."""
    while True:
        head = source.read(FRAME.size)
        if len(head) < FRAME.size:
            return
        (size,) = FRAME.unpack(head)
        body = source.read(size)
        if len(body) < size:
            return
        yield [Reading(*fields) for fields in pickle.loads(body)]  # noqa: S301 - our own parent's frames


class ScoringPipe:
    """The ingester's end of scoring in a child process: the readings each intake pass found new,
    written to the child's stdin by a thread of their own, so the intake never waits on the child.

    The ingester has read and checked every message already: the child gets them as parsed readings
    instead of subscribing to the broker itself, which had cost it a second MQTT client, JSON parse
    and PUBACK per reading (at 5,000 readings/s, more than half of its process's time). A backlog
    beyond `max_backlog` readings (a child that stopped reading) is dropped and counted, never held
    without bound; so are readings sent while no child is attached (it restarts warm from bronze)."""

    def __init__(self, max_backlog: int = 200_000):
        self.max_backlog = max_backlog
        self.forwarded = 0
        self.dropped_backlog = 0
        self.dropped_no_scorer = 0
        self._sink: BinaryIO | None = None
        self._queue: collections.deque[list[Reading]] = collections.deque()
        self._queued = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scoring-pipe", daemon=True)

    def attach(self, sink: BinaryIO | None) -> None:
        """Write to `sink` from now on (a restarted child's stdin)."""
        with self._lock:
            old, self._sink = self._sink, sink
        if old is not None and old is not sink:
            try:
                old.close()
            except OSError:
                pass

    def start(self) -> ScoringPipe:
        if not self._thread.is_alive():  # the ingester starts it too
            self._thread.start()
        return self

    def submit(self, readings: list[Reading]) -> None:
        with self._lock:
            if self._queued + len(readings) > self.max_backlog:
                self.dropped_backlog += len(readings)
                return
            self._queue.append(readings)
            self._queued += len(readings)
        self._ready.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._ready.set()
        self._thread.join(timeout)
        with self._lock:
            sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.close()
            except OSError:
                pass

    def _loop(self) -> None:
        while True:
            self._ready.wait(0.05)
            self._ready.clear()
            with self._lock:
                batches, self._queue = list(self._queue), collections.deque()
                self._queued = 0
                sink = self._sink
            readings = [r for batch in batches for r in batch]
            if readings:
                if sink is None:
                    self.dropped_no_scorer += len(readings)
                else:
                    try:
                        sink.write(encode_readings(readings))
                        sink.flush()
                        self.forwarded += len(readings)
                    except (OSError, ValueError):  # the child is gone (restarting): it warms up from bronze
                        self.dropped_no_scorer += len(readings)
            elif self._stop.is_set():
                return

    def status(self) -> dict[str, Any]:
        """What the pipe passed on (the child reports its scoring on its own /status)."""
        return {
            "forwarded": self.forwarded,
            "dropped_backlog": self.dropped_backlog,
            "dropped_no_scorer": self.dropped_no_scorer,
            "queued": self._queued,
        }


class ScorerProcess:
    """`platform stream`'s scoring child (`--role scorer`): the readings the ingester accepted arrive
    on `source` (its stdin, `ScoringPipe` frames); alerts go out over its own MQTT connection."""

    def __init__(self, dataset: str, cfg, *, store, scorer, state, source: BinaryIO):
        import paho.mqtt.client as mqtt

        from pipelines.contracts import load_contract
        from pipelines.datasets import get_dataset
        from pipelines.streaming.messages import MessageReader

        self.dataset, self.cfg, self.store = dataset, cfg, store
        contract = load_contract(get_dataset(dataset).contract_path)
        self.contract = contract
        self.source = source
        self.seen: dict[str, SeqSet] = collections.defaultdict(SeqSet)  # the warm-up's rows are not scored twice
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{cfg.session_id(dataset)}-scorer",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if cfg.mqtt_username:
            self.client.username_pw_set(cfg.mqtt_username, cfg.secret("mqtt_password"))
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(100_000)
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.worker = ScoringWorker(
            dataset,
            scorer,
            state,
            lambda t, p: self.client.publish(t, p, qos=1),
            columns=MessageReader(dataset, contract).columns,
            alerts_topic=cfg.alerts_topic,
            interval=cfg.score_interval_seconds,
        )
        self.ended = threading.Event()  # the ingester closed the pipe
        self._backlog: list[list[Reading]] = []  # frames that came while the tails were read back
        self._warm = False
        self._warm_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="scorer-pipe", daemon=True)

    def start(self) -> ScorerProcess:
        # Read the pipe first, then bronze: a reading is either in the tail read back or among the
        # frames buffered meanwhile (or both, and then it is skipped), never in neither.
        self._reader.start()
        self.client.connect_async(self.cfg.mqtt_host, self.cfg.mqtt_port, keepalive=self.cfg.keepalive_seconds)
        self.client.loop_start()
        deadline = time.monotonic() + 30
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.worker.scorer is not None:
            try:
                silver = warm_tails(self.worker.scorer, self.store, self.dataset, self.contract)
                if silver is not None:
                    for name, seqs in streamed_seqs(silver, self.contract.entity.column).items():
                        self.seen[name] = seqs
                    log.info("scorer warmed up from %d committed bronze readings", len(silver))
            except Exception:  # noqa: BLE001 - a cold start only makes the first windows shorter
                log.exception("warm-up from bronze failed; starting with empty device tails")
        self.worker.start()
        with self._warm_lock:  # the frames that came meanwhile first, in order; then the pipe's own
            for readings in self._backlog:
                self._take(readings)
            self._backlog.clear()
            self._warm = True
        return self

    def _read_loop(self) -> None:
        """Each frame's new readings straight to the scoring worker (one thread between the pipe and
        the pass: each hand-over is a wait for the interpreter lock)."""
        try:
            for readings in read_frames(self.source):
                if not self._warm:
                    with self._warm_lock:
                        if not self._warm:
                            self._backlog.append(readings)
                            continue
                self._take(readings)
        except (OSError, ValueError, pickle.UnpicklingError):
            log.exception("the ingester's pipe broke")
        self.ended.set()

    def _take(self, readings: list[Reading]) -> None:
        fresh = []
        for item in readings:
            seen = self.seen[item.device]
            if item.seq in seen:
                continue
            seen.add(item.seq)
            fresh.append(item)
        if fresh:
            self.worker.submit(fresh)

    def stop(self) -> None:
        self.worker.stop()
        self.client.disconnect()
        self.client.loop_stop()

    def status(self) -> dict[str, Any]:
        # warm: the model is loaded and the device tails (and a streaming detector's states) are
        # brought up to date from bronze; readings that came meanwhile wait in a backlog until then
        return {"dataset": self.dataset, "warm": self._warm, "scoring": self.worker.status()}
