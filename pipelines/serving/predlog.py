"""The prediction log and the feedback table in the lake, written in batches.

``predictions/date=<d>/part-<time>-<id>.parquet``: one row per scored record and model (request id,
record index, device, role, served or shadow, version, score, flag, latency, the model's compute time,
error, rollout id, step).
``feedback/date=<d>/part-*.parquet``: ground-truth labels posted later, joined by request id and
record index. Each part file is one PUT, so a reader never sees half a file; rows stay in memory
while the object store is down (bounded by ``max_rows``) and are written when it is back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pyarrow as pa

log = logging.getLogger("pipelines.serving")
PREDICTIONS, FEEDBACK = "predictions", "feedback"
SLICE_ROWS = 1024  # rows converted per C call while flushing (each holds the GIL ~1 ms)
MICROS_PER_DAY = 86_400_000_000
EPOCH = date(1970, 1, 1)

PREDICTION_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("record_index", pa.int32()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("device", pa.string()),
        ("role", pa.string()),
        ("served", pa.bool_()),
        ("model_version", pa.string()),
        ("score", pa.float64()),
        ("flagged", pa.bool_()),
        ("latency_ms", pa.float64()),
        ("compute_ms", pa.float64()),
        ("error", pa.string()),
        ("rollout_id", pa.string()),
        ("step", pa.string()),
        # the registered model served: several scoring services (datasets) may share one lake, and a
        # reader of one model's log (monitoring) must not count another's versions and labels
        ("model_name", pa.string()),
    ]
)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("record_index", pa.int32()),
        ("is_anomaly", pa.int8()),
        ("ts", pa.timestamp("us", tz="UTC")),
    ]
)


def lake_store(settings, timeout_seconds: float = 5.0):
    """An ObjectStore whose requests give up after ``timeout_seconds`` (the service must not hang)."""
    import urllib3
    from minio import Minio

    from pipelines.storage import ObjectStore

    store = ObjectStore(settings)
    access, secret = settings.require_s3_credentials()
    from urllib.parse import urlparse

    url = urlparse(settings.s3_endpoint_url)
    store.client = Minio(
        url.netloc,
        access_key=access,
        secret_key=secret,
        secure=url.scheme == "https",
        region=settings.s3_region,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_seconds, read=timeout_seconds),
            retries=urllib3.Retry(total=1, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]),
            maxsize=4,
        ),
    )
    return store


class LakeTableWriter:
    """Buffers rows of one table and writes them as Parquet parts from a background thread."""

    def __init__(self, store, table: str, schema: pa.Schema, flush_seconds: float, flush_rows: int, max_rows: int):
        self.store = store
        self.table = table
        self.schema = schema
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.max_rows = max_rows
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._in_flight = 0  # rows taken by the flush in progress, not yet in the lake
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lake-writer-{table}", daemon=True)
        self.written_rows = 0
        self.dropped_rows = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def append(self, rows: list[dict]) -> None:
        with self._lock:
            self._rows.extend(rows)
            over = len(self._rows) - self.max_rows
            if over > 0:  # store down for long: keep the newest rows, count what we lose
                del self._rows[:over]
                self.dropped_rows += over
            big = len(self._rows) >= self.flush_rows
        if big:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Rows not yet in the lake: buffered, or taken by a write that has not finished (a reader
        told "0 pending" must find every row it sent)."""
        with self._lock:
            return len(self._rows) + self._in_flight

    def flush(self) -> int:
        """Write what is buffered; on failure the unwritten rows go back to the buffer. Returns rows
        written. One flush at a time (the writer thread and ``stop`` may both call it)."""
        with self._flush_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                self._in_flight = len(rows)
            if not rows:
                return 0
            written_days: set[str] = set()
            days: list[str] = []
            try:
                days, tables = self._tables_by_day(rows)
                for day, table in tables.items():
                    key = f"{self.table}/date={day}/part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
                    self.store.put_parquet(self.store.settings.lake_bucket, key, table)
                    # a day written is done: a later day's failure must not write it twice
                    written_days.add(day)
                    with self._lock:
                        self._in_flight -= len(table)
                        self.written_rows += len(table)
                self.last_error = None
                return len(rows)
            except Exception as exc:  # noqa: BLE001 - keep the rows, report degraded, retry next round
                kept = [r for r, d in zip(rows, days, strict=True) if d not in written_days] if days else rows
                with self._lock:
                    self._rows[:0] = kept
                    self._in_flight = 0
                self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                log.warning("%s: %d rows kept in memory, write failed: %s", self.table, len(kept), self.last_error)
                return len(rows) - len(kept)

    def _tables_by_day(self, rows: list[dict]) -> tuple[list[str], dict[str, pa.Table]]:
        """Each row's UTC day, and the rows as one Arrow table per day, built ``SLICE_ROWS`` at a time.

        This runs in the writer thread beside the event loop: one ``pd.DataFrame`` of 15,000 rows was a
        single C call holding the GIL for ~80 ms, every flush, a stall for every request in flight.
        A column a row lacks (an optional one, such as compute_ms of a failed call) is null."""
        day_names: dict[int, str] = {}
        days: list[str] = []
        batches: dict[str, list[pa.RecordBatch]] = {}
        for start in range(0, len(rows), SLICE_ROWS):
            part = rows[start : start + SLICE_ROWS]
            micros = [round(r["ts"] * 1_000_000) for r in part]
            day_numbers = [m // MICROS_PER_DAY for m in micros]
            for number in set(day_numbers) - day_names.keys():
                day_names[number] = (EPOCH + timedelta(days=number)).isoformat()
            columns = [
                pa.array(micros, pa.int64()).cast(f.type)
                if f.name == "ts"
                else pa.array([r.get(f.name) for r in part], f.type)
                for f in self.schema
            ]
            batch = pa.RecordBatch.from_arrays(columns, schema=self.schema)
            part_days = [day_names[n] for n in day_numbers]
            days += part_days
            slice_days = set(part_days)
            for day in sorted(slice_days):
                piece = batch if len(slice_days) == 1 else batch.filter(pa.array([d == day for d in part_days]))
                batches.setdefault(day, []).append(piece)
        return days, {day: pa.Table.from_batches(b, schema=self.schema) for day, b in batches.items()}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()


# --------------------------------------------------------------------------- readers (canary DAG)


def _days(since: datetime, until: datetime) -> list[str]:
    d: date = since.astimezone(UTC).date()
    out = []
    while d <= until.astimezone(UTC).date():
        out.append(d.isoformat())
        d += timedelta(days=1)
    return out


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: columns a part written by an older service lacks are read as nulls."""
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(len(table), f.type))
    return table.select(schema.names).cast(schema)


def read_table(store, table: str, since: datetime, until: datetime | None = None) -> pd.DataFrame:
    """Rows of ``predictions`` or ``feedback`` written for the days from ``since`` to ``until``."""
    until = until or datetime.now(UTC)
    bucket = store.settings.lake_bucket
    schema = PREDICTION_SCHEMA if table == PREDICTIONS else FEEDBACK_SCHEMA
    parts = []
    for day in _days(since, until):
        for key in store.list_keys(bucket, f"{table}/date={day}/"):
            if key.endswith(".parquet"):
                parts.append(_conform(store.get_parquet(bucket, key), schema))
    if not parts:
        return schema.empty_table().to_pandas()
    frame = pa.concat_tables(parts).to_pandas()
    return frame[frame["ts"] >= pd.Timestamp(since).tz_convert("UTC")].reset_index(drop=True)
