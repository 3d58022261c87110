"""Lake jobs per layer and partition: read the layer below, transform, gate with GX, publish atomically."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa

from pipelines import storage
from pipelines.settings import get_settings, load_params
from pipelines.storage import LakeStore, ObjectStore

Progress = Callable[[str], None]


@dataclass
class LayerReport:
    layer: str
    dataset: str
    partition: str
    rows_in: int
    rows_out: int
    quarantined: int = 0
    quality: dict[str, Any] = field(default_factory=dict)
    manifest_key: str = ""
    content_sha256: str = ""
    collapsed_duplicates: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _contract(dataset: str):
    from pipelines.contracts import load_contract
    from pipelines.datasets import get_dataset

    return load_contract(get_dataset(dataset).contract_path)


def _grain(dataset: str) -> str:
    from pipelines.datasets import get_dataset

    return get_dataset(dataset).grain


def _resolve(store: LakeStore | None, dataset: str | None) -> tuple[LakeStore, str]:
    """The store and dataset a job works on: the given ones, else the settings' defaults."""
    store = store or ObjectStore()
    return store, dataset or store.settings.dataset


def _layer_report(
    layer: str, dataset: str, partition: str, rows_in: int, manifest, quality: dict, **extra
) -> LayerReport:
    return LayerReport(
        layer,
        dataset,
        partition,
        rows_in,
        manifest.rows,
        quality=_short(quality),
        manifest_key=storage.partition_prefix(layer, dataset, partition) + storage.MANIFEST_NAME,
        content_sha256=manifest.content_sha256,
        **extra,
    )


def _gate(
    df: pd.DataFrame,
    layer: str,
    contract,
    partition: str,
    progress: Progress,
    *,
    store: LakeStore | None = None,
    dataset: str | None = None,
    **kwargs,
) -> dict:
    """Run the layer's GX suite; a critical failure raises before anything is published.

    A failing result is still stored (and the Data Docs site refreshed) so the failure can be
    browsed, not only read in the task log."""
    from pipelines.quality import QualityGateError, enforce, validate_partition

    config = (load_params().get("quality") or {}).get(contract.name, {}).get(layer)
    result = validate_partition(df, layer, contract, partition, config=config, **kwargs)
    progress(result.summary())
    try:
        enforce(result)
    except QualityGateError:
        if store is not None and dataset is not None:
            _put_quality(store, layer, dataset, partition, result.to_dict())
            publish_docs(store, progress)
        raise
    return result.to_dict()


def publish_docs(store: LakeStore | None = None, progress: Progress = print) -> str:
    """Rebuild the Data Docs site from every stored validation and upload it to the lake.

    Called once per lakehouse run after its gold partitions (and by a failing gate, so the failure
    can be browsed): not per partition, where parallel tasks would rebuild the same site side by side."""
    from pipelines.quality import publish_data_docs

    store = store or ObjectStore()
    try:
        key = publish_data_docs(store)
        url = f"s3://{store.settings.lake_bucket}/{key}"
        progress(f"[gx] Data Docs: {url}")
        return url
    except Exception as e:  # noqa: BLE001 - docs are a view; never fail a publish because of them
        progress(f"[gx] Data Docs not refreshed: {e}")
        return ""


def _put_quality(store: LakeStore, layer: str, dataset: str, partition: str, quality: dict) -> None:
    key = f"quality/{layer}/{dataset}/event_date={partition}/validation.json"
    store.put_bytes(store.settings.lake_bucket, key, json.dumps(quality, default=str).encode(), "application/json")


# -- landing ------------------------------------------------------------------------------------
def land_bytes(store: LakeStore, dataset: str, partition: str, filename: str, data: bytes) -> str:
    """Land a delivered file as-is (never modified later) under landing/<dataset>/<date>/.

    Landed bytes are immutable. The same bytes under the same name are the same delivery: the key
    is returned, nothing is written. Other bytes under a name already delivered that date are kept
    beside the first, as `<name>.2.csv`, `<name>.3.csv`... (the returned key says which)."""
    bucket = store.settings.landing_bucket
    prefix = storage.landing_prefix(dataset, partition)
    stem, dot, suffixes = filename.partition(".")
    key, copy = prefix + filename, 1
    while store.exists(bucket, key):
        if store.get_bytes(bucket, key) == data:
            return key
        copy += 1
        key = f"{prefix}{stem}.{copy}{dot}{suffixes}"
    store.put_bytes(bucket, key, data, "text/csv")
    return key


class LandingError(ValueError):
    """A file refused before anything lands: the message names the file, the rule and the fix."""


class _ValidatingReader(io.RawIOBase):
    """Reads a local file through to the store, checking as it streams: the bytes are the ones
    hashed before (the file did not change while landing) and, for `.gz`, the gzip stream is whole.
    An error raised here aborts the upload (S3: the multipart upload), so nothing lands."""

    def __init__(self, f: Any, path: str, expected_sha256: str, length: int):
        import hashlib
        import zlib

        self.f, self.path, self.expected, self.length = f, path, expected_sha256, length
        self.digest, self.read_bytes = hashlib.sha256(), 0
        self.gzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if path.endswith(".gz") else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.f.read(len(buffer))
        if chunk:
            self.digest.update(chunk)
            if self.gzip is not None:
                self._inflate(chunk)
            self.read_bytes += len(chunk)
            if self.read_bytes >= self.length:  # the uploader stops at `length`: check before it completes
                self._finish()
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def _inflate(self, chunk: bytes) -> None:
        import zlib

        try:
            while chunk and not self.gzip.eof:
                self.gzip.decompress(chunk, 1 << 20)  # bounded output per call; the rest stays queued
                chunk = self.gzip.unconsumed_tail
        except zlib.error as exc:
            raise LandingError(
                f"{self.path}: the gzip stream is corrupt near byte {self.read_bytes:,} ({exc}) [rule gzip]; "
                "nothing was landed: compress the file again"
            ) from None

    def _finish(self) -> None:
        if self.gzip is not None and not self.gzip.eof:
            raise LandingError(
                f"{self.path}: the gzip stream ends before its end-of-stream marker (truncated at byte "
                f"{self.read_bytes:,}) [rule gzip]; nothing was landed: send the complete file"
            )
        if self.read_bytes != self.length or self.digest.hexdigest() != self.expected:
            raise LandingError(f"{self.path} changed while it was being landed; nothing was landed: land it again")


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _object_sha256(store: LakeStore, bucket: str, key: str, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    stream = store.open_object(bucket, key)
    try:
        for block in iter(lambda: stream.read(chunk), b""):
            digest.update(block)
    finally:
        stream.close()
    return digest.hexdigest()


def land_part_bytes() -> int:
    """`lake.land_part_mb` in params.yaml: the bytes `land_file` holds at a time (one upload part)."""
    return int(float((load_params().get("lake") or {}).get("land_part_mb", 16)) * 2**20)


def land_file(store: LakeStore, dataset: str, partition: str, path: Path | str, name: str | None = None) -> str:
    """Land a local file as delivered, streaming it: memory holds one upload part
    (`lake.land_part_mb`), never the file. Same rules as `land_bytes`: the same bytes under a name
    already delivered land nothing; other bytes are kept beside the first (`name.2.csv`). The file is
    read twice (once to hash it, once to upload it), and checked as it streams (`_ValidatingReader`)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise LandingError(f"{path}: the file is empty [rule not_empty]; nothing was landed: send the data")
    sha = _file_sha256(path)
    bucket = store.settings.landing_bucket
    prefix = storage.landing_prefix(dataset, partition)
    filename = name or path.name
    stem, dot, suffixes = filename.partition(".")
    key, copy = prefix + filename, 1
    while store.exists(bucket, key):
        if store.size(bucket, key) == size and _object_sha256(store, bucket, key) == sha:
            return key
        copy += 1
        key = f"{prefix}{stem}.{copy}{dot}{suffixes}"
    with open(path, "rb") as f:
        reader = io.BufferedReader(_ValidatingReader(f, str(path), sha, size), buffer_size=1 << 20)
        store.put_stream(bucket, key, reader, size, land_part_bytes())
    return key


def land_simulated_days(
    start: dt.date, days: int, *, store: LakeStore | None = None, progress: Progress = print
) -> list[str]:
    from pipelines.simulator import simulate_day_csv

    store = store or ObjectStore()
    p = load_params()["simulate"]
    keys = []
    for i in range(days):
        day = start + dt.timedelta(days=i)
        data = simulate_day_csv(day, devices=p["devices"], freq_seconds=p["freq_seconds"], seed=p["seed"])
        keys.append(land_bytes(store, get_settings().dataset, day.isoformat(), f"telemetry-{day}.csv", data))
        progress(f"[land] {keys[-1]} ({len(data) / 1e6:.1f} MB)")
    return keys


# -- bronze -------------------------------------------------------------------------------------
class RowCountMismatch(RuntimeError):
    pass


def _arrow_frame(table: pa.Table) -> pd.DataFrame:
    """Zero-copy pandas view (Arrow-backed columns) for gates that only read the data."""
    return table.to_pandas(types_mapper=pd.ArrowDtype)


@dataclass
class BronzeReport:
    """One delivery (landing date) ingested: the event-date partitions it touched."""

    delivery_date: str
    dataset: str
    files: list[str]
    rows: int
    partitions: dict[str, int]  # event date -> rows of this delivery in it
    quality: dict[str, Any] = field(default_factory=dict)
    quarantined_files: list[dict[str, Any]] = field(default_factory=list)  # file, rule, line, reason

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class SourceLineCounter(io.RawIOBase):
    """Reads a delivered object through, counting its records independently of the CSV parser:
    the bronze gate checks that every delivered record became a bronze row.

    A record is a non-blank line (whitespace-only lines are blank); with `csv`, a line inside a
    quoted value continues its record. A file whose lines end in a bare CR (old Mac) is counted by those."""

    def __init__(self, raw, csv: bool = True):
        self.raw, self.lines, self._partial, self.csv = raw, 0, b"", csv
        self._in_quotes = False
        self._cr_only: bool | None = None  # decided on the first bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        chunk = self.raw.read(len(buffer))
        if not chunk:
            if self._partial.strip() and not self._in_quotes:
                self.lines += 1
            self._partial = b""
            return 0
        if self._cr_only is None:  # decided at the first line end (a CR last in a read may start a CRLF)
            from pipelines.layers.bronze import cr_only_line_endings

            seen = self._partial + chunk
            if b"\n" in seen or b"\r" in seen.rstrip(b"\r"):
                self._cr_only = cr_only_line_endings(seen)
                if self._cr_only:
                    self._partial = self._partial.replace(b"\r", b"\n")
        text = chunk.replace(b"\r", b"\n") if self._cr_only else chunk
        data = self._partial + text
        parts = data.split(b"\n")
        self._partial = parts.pop()
        if not self.csv or (not self._in_quotes and b'"' not in data):
            self.lines += sum(1 for line in parts if line.strip())
        else:  # quotes: a line inside a quoted value (a newline in a field) is not a record
            for line in parts:
                if not self._in_quotes and line.strip():
                    self.lines += 1
                if line.count(b'"') % 2:
                    self._in_quotes = not self._in_quotes
        buffer[: len(chunk)] = chunk
        return len(chunk)

    @property
    def records(self) -> int:
        return max(self.lines - 1, 0)  # minus the header


def open_landed(store: LakeStore, bucket: str, key: str):
    """A streaming, decompressed, line-counted reader over a landed object."""
    import gzip

    from pipelines.layers.bronze import PrefixedStream

    resp = store.open_object(bucket, key)  # one-lake: any LakeStore, not the S3 client
    head = resp.read(2)
    body = PrefixedStream(head, resp)
    stream = gzip.GzipFile(fileobj=body) if head == b"\x1f\x8b" else body
    from pipelines.layers.bronze import is_json_lines

    return resp, SourceLineCounter(stream, csv=not is_json_lines(key))


def build_bronze(
    delivery_date: str,
    run_id: str,
    *,
    dataset: str | None = None,
    store: LakeStore | None = None,
    progress: Progress = print,
    on_bad_file: str | None = None,
) -> BronzeReport:
    """Ingest every file delivered on `delivery_date` into bronze, partitioned by EVENT date.

    Late records (event date earlier than the delivery) land in their own event-date partition
    next to what was delivered before; each delivery is one batch of the partition's manifest,
    so re-running a delivery replaces exactly its records. All files are gated before anything
    is committed: a critical failure publishes nothing.

    A file that cannot be read at all (corrupt gzip, not UTF-8, no header...) is quarantined as a
    file: none of its rows are published, its file, rule, line and reason are stored under
    `quarantine/<dataset>/_files/delivery=<date>/` and reported, and the rest of the delivery
    proceeds. With `on_bad_file="stop"` (or `lake.on_bad_file: stop` in params.yaml) it stops the
    run instead; when no file of the delivery is readable the first file's error is raised.
    """
    from pipelines.layers.bronze import BronzeError, is_json_lines, iter_landing_records
    from pipelines.layers.partitioning import split_by_event_date

    store, dataset = _resolve(store, dataset)
    contract = _contract(dataset)
    grain = _grain(dataset)
    bucket = store.settings.landing_bucket
    prefix = storage.landing_prefix(dataset, delivery_date)
    keys = [k for k in store.list_keys(bucket, prefix) if not k.endswith("/")]
    if not keys:
        raise FileNotFoundError(
            f"No landed files for {dataset} delivered on {delivery_date} under s3://{bucket}/{prefix}; "
            "land data first (`platform land`)."
        )
    batch_id = f"delivery={delivery_date}"
    now = store.now()  # one-lake: the store's clock (LocalStore pins it for DVC)
    writers: dict[str, storage.PartitionWriter] = {}
    qualities, rows = [], 0
    policy = on_bad_file or str((load_params().get("lake") or {}).get("on_bad_file", "quarantine"))
    if policy not in ("quarantine", "stop"):
        raise ValueError(f"on_bad_file={policy!r}: use 'quarantine' or 'stop' (lake.on_bad_file in params.yaml)")
    bad_files: list[tuple[str, BronzeError]] = []
    try:
        for key in keys:
            resp, counter = open_landed(store, bucket, key)
            file_rows = 0
            marks = {d: w.staged for d, w in writers.items()}  # to forget this file's rows if it is unreadable
            gated = len(qualities)
            try:
                batches = iter_landing_records(
                    io.BufferedReader(counter, buffer_size=1 << 20),
                    source_key=f"s3://{bucket}/{key}",
                    source_etag=store.etag(bucket, key),
                    run_id=run_id,
                    ingested_at=now,
                    contract=contract,
                )
                for batch in batches:
                    table = pa.Table.from_batches([batch])
                    qualities.append(
                        _gate(
                            _arrow_frame(table),
                            "bronze",
                            contract,
                            delivery_date,
                            progress,
                            store=store,
                            dataset=dataset,
                        )
                    )
                    if contract.entity.source in table.column_names:
                        # device order inside each file: silver's device buckets skip row groups
                        table = table.sort_by(contract.entity.source)
                    for event_date, part in split_by_event_date(table, contract, delivery_date, grain).items():
                        if event_date not in writers:
                            writers[event_date] = storage.PartitionWriter(
                                store, "bronze", dataset, event_date, run_id, batch_id
                            )
                        writers[event_date].write(part)
                    file_rows += table.num_rows
            except BronzeError as err:
                if policy == "stop":
                    raise
                _forget_file_rows(writers, marks)
                del qualities[gated:]
                bad_files.append((key, err))
                progress(f"[bronze] {key}: quarantined as a file, none of its rows published: {err}")
                continue
            finally:
                resp.close()  # one-lake: also releases the S3 connection
            source_records = counter.lines if is_json_lines(key) else counter.records
            if file_rows != source_records:
                raise RowCountMismatch(
                    f"s3://{bucket}/{key}: the file has {source_records} non-blank data lines but bronze "
                    f"parsed {file_rows} records [rule bronze.row_count]; a quoted field spanning lines or "
                    "a parser bug would cause this: inspect the file, nothing was published"
                )
            rows += file_rows
            progress(
                f"[bronze] {key}: {file_rows} records (source has {source_records}); event dates {sorted(writers)}"
            )
        quarantined_files = _quarantine_files(store, dataset, delivery_date, run_id, bad_files)
        if len(bad_files) == len(keys):  # nothing readable: the run fails on the first file's error
            key, err = bad_files[0]
            if len(keys) > 1:
                err.add_note(f"none of the {len(keys)} files delivered on {delivery_date} could be read")
            raise err
    except Exception:
        for writer in writers.values():
            writer.abort()
        raise
    good_keys = [k for k in keys if k not in {b for b, _ in bad_files}]
    # Each commit merges this delivery's batch into the partition's manifest (read, modify, write):
    # other runs writing the same partitions wait for these leases, so no batch is lost.
    locked = False
    try:
        with storage.lock_partitions(store, dataset, list(writers), run_id, "bronze commit", progress):
            locked = True
            for _, writer in sorted(writers.items()):
                writer.commit(extra={"sources": good_keys, "delivery_date": delivery_date})
    except BaseException:
        if not locked:  # nothing committed: the staged files go (after a commit, manifests name them)
            for writer in writers.values():
                writer.abort()
        raise
    quality = qualities[-1] if len(qualities) == 1 else _merge_quality(qualities)
    _put_quality(store, "bronze", dataset, delivery_date, quality)
    late = [d for d in writers if d < delivery_date]
    if late:
        progress(f"[bronze] late records for earlier event dates {late}: merged into their partitions")
    return BronzeReport(
        delivery_date,
        dataset,
        good_keys,
        rows,
        {d: w.rows for d, w in sorted(writers.items())},
        quality=_short(quality),
        quarantined_files=quarantined_files,
    )


def _forget_file_rows(writers: dict[str, storage.PartitionWriter], marks: dict[str, int]) -> None:
    """Unstage what a file found unreadable part-way staged: none of its rows are published."""
    for date in list(writers):
        writer = writers[date]
        if date not in marks:  # a partition only this file touched
            writer.abort()
            del writers[date]
            continue
        _ = writer.rows  # waits for the upload in flight, so `files` holds every staged file
        del writer.files[marks[date] :]  # unreferenced, collected by the next commit of the partition


def _quarantine_files(
    store: LakeStore, dataset: str, delivery_date: str, run_id: str, bad: list[tuple[str, Any]]
) -> list[dict[str, Any]]:
    """One JSON record per unreadable file of a delivery (the landed bytes stay in landing)."""
    records = []
    for key, err in bad:
        record = {
            "file": f"s3://{store.settings.landing_bucket}/{key}",
            "rule": err.rule,
            "line": err.line,
            "reason": str(err),
            "delivery_date": delivery_date,
            "run_id": run_id,
        }
        name = key.rsplit("/", 1)[-1]
        target = f"quarantine/{dataset}/_files/delivery={delivery_date}/{name}.json"
        store.put_bytes(store.settings.lake_bucket, target, json.dumps(record).encode(), "application/json")
        records.append(record)
    return records


def _merge_quality(results: list[dict]) -> dict:
    merged = dict(results[0])
    merged["success"] = all(r.get("success") for r in results)
    merged["files"] = results
    stats = [r.get("statistics") or {} for r in results]
    merged["statistics"] = {
        "evaluated_expectations": sum(s.get("evaluated_expectations", 0) for s in stats),
        "successful_expectations": sum(s.get("successful_expectations", 0) for s in stats),
        "unsuccessful_expectations": sum(s.get("unsuccessful_expectations", 0) for s in stats),
        "rows": sum(s.get("rows", 0) for s in stats),
        "duration_seconds": round(sum(s.get("duration_seconds", 0.0) for s in stats), 4),
        "gate_calls": len(results),
    }
    return merged


def gold_targets(partitions: list[str], *, dataset: str | None = None, store: LakeStore | None = None) -> list[str]:
    """Gold partitions to rebuild after silver changed `partitions`: those, plus the following
    partition where it exists, because its first rolling windows read the changed one's tail."""
    from pipelines.layers.partitioning import next_partition

    store, dataset = _resolve(store, dataset)
    grain = _grain(dataset)
    existing = set(storage.list_partitions(store, "silver", dataset))
    out = set(partitions)
    for p in partitions:
        nxt = next_partition(p, grain)
        if nxt in existing:
            out.add(nxt)
    return sorted(out)


# -- device buckets -----------------------------------------------------------------------------
def _bucket_rows(layer: str = "silver") -> int:
    lake = load_params().get("lake") or {}
    default = int(lake.get("bucket_rows", 200_000))
    return int(lake.get("gold_bucket_rows", default)) if layer == "gold" else default


def _device_buckets(
    files: list[bytes], device_column: str | None, bucket_rows: int | None, layer: str = "silver"
) -> list[list | None]:
    """Devices of a partition grouped into buckets of at most `lake.bucket_rows` rows; [None]
    (one bucket, everything) when the data has no device column (a single-entity contract)."""
    from pipelines.layers.partitioning import plan_device_buckets

    if device_column is None:
        return [None]
    import pyarrow.parquet as pq

    if not any(device_column in pq.read_schema(io.BytesIO(blob)).names for blob in files):
        return [None]
    return plan_device_buckets(storage.rows_per_value(files, device_column), bucket_rows or _bucket_rows(layer))


def _bucket_label(bucket: list | None, index: int, total: int) -> str:
    if bucket is None or total == 1:
        return ""
    return f" bucket {index + 1}/{total} ({len(bucket)} devices)"


# -- silver -------------------------------------------------------------------------------------
@dataclass
class _BucketTask:
    """What every bucket of one partition needs; forked bucket workers inherit it."""

    store: LakeStore
    dataset: str
    partition: str
    contract: Any
    files: list[bytes]
    progress: Progress

    def __post_init__(self) -> None:
        self.parent_pid = os.getpid()

    @property
    def in_worker(self) -> bool:
        return os.getpid() != self.parent_pid

    def worker_store(self) -> LakeStore:
        # A forked worker must not share the task process's open connections to the store.
        return self.store.for_worker() if self.in_worker else self.store  # one-lake

    def run(self, work: Callable[[Callable[[str], None]], dict[str, Any]]) -> dict[str, Any]:
        """Run one bucket's `work(say)`: in the task process its messages go straight to progress;
        a worker returns them with its result, or attaches them to the error it raises."""
        if not self.in_worker:
            return {**work(self.progress), "messages": []}
        messages: list[str] = []
        try:
            return {**work(messages.append), "messages": messages}
        except Exception as e:
            for message in messages:
                e.add_note(message)
            raise


@dataclass
class _SilverTask(_BucketTask):
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    grain: str = "day"


def _silver_bucket(job: tuple[int, list | None, int]) -> dict[str, Any]:
    """One device bucket: decode, type, check, deduplicate and gate; the tables to write come back."""
    from pipelines.jobs.buckets import shared
    from pipelines.layers.silver import to_silver

    index, bucket, total = job
    task: _SilverTask = shared()

    def work(say: Callable[[str], None]) -> dict[str, Any]:
        bronze = storage.decode_rows(task.files, task.contract.entity.source, bucket)
        rows_in = bronze.num_rows
        silver, quarantine = to_silver(bronze, task.contract, partition=task.partition, now=task.now, grain=task.grain)
        del bronze
        n_collapsed = int(silver.attrs.get("collapsed_duplicates", 0))
        say(
            f"[silver] {task.partition}{_bucket_label(bucket, index, total)}: {len(silver)} silver, "
            f"{len(quarantine)} quarantined, {n_collapsed} identical re-deliveries collapsed"
        )
        store = task.worker_store()
        quality = _gate(
            silver, "silver", task.contract, task.partition, say, store=store, dataset=task.dataset, now=task.now
        )
        return {
            "rows_in": rows_in,
            "collapsed": n_collapsed,
            "quality": quality,
            # quarantine keeps every value as delivered, as text
            "quarantine": pa.Table.from_pandas(
                quarantine.astype(str) if len(quarantine) else quarantine, preserve_index=False
            ),
            "silver": pa.Table.from_pandas(silver, preserve_index=False),
        }

    return task.run(work)


def build_silver(
    partition: str,
    run_id: str,
    *,
    dataset: str | None = None,
    store: LakeStore | None = None,
    progress: Progress = print,
    bucket_rows: int | None = None,
    workers: int | None = None,
) -> LayerReport:
    """Type, check and deduplicate one bronze partition into silver, quarantining rule breakers.

    Works through the partition in buckets of whole devices (`lake.bucket_rows`): deduplication
    is per (device, ts), so a bucket holds everything a decision needs and memory stays bounded
    whatever the partition's size. Buckets run side by side in `workers` processes (default
    `lake.workers`, see `pipelines.jobs.buckets`). Every bucket is gated before anything is
    committed; silver and quarantine are then committed (quarantine first, so a bad record is
    never lost)."""

    store, dataset = _resolve(store, dataset)
    # The partition's lease, from reading bronze to committing: another run's bronze commit or
    # silver build of this partition waits (a silver built from a bronze read before another run's
    # commit, then committed after it, would lose that run's records).
    with storage.lock_partitions(store, dataset, [partition], run_id, "silver build", progress):
        return _build_silver(partition, run_id, dataset, store, progress, bucket_rows, workers)


def _build_silver(partition, run_id, dataset, store, progress, bucket_rows, workers) -> LayerReport:
    from pipelines.jobs.buckets import map_buckets, workers_for

    contract = _contract(dataset)
    files = storage.read_partition_files(store, "bronze", dataset, partition)
    buckets = _device_buckets(files, contract.entity.source, bucket_rows)
    # one clock for the future-timestamp rule of every bucket
    task = _SilverTask(store, dataset, partition, contract, files, progress, grain=_grain(dataset), now=store.now())
    workers = workers_for(len(buckets), workers)
    silver_writer = storage.PartitionWriter(store, "silver", dataset, partition, run_id)
    quarantine_writer = storage.PartitionWriter(store, "quarantine", dataset, partition, run_id)
    qualities, rows_in, quarantined, collapsed, empty_quarantine = [], 0, 0, 0, None
    jobs = [(i, bucket, len(buckets)) for i, bucket in enumerate(buckets)]
    results = map_buckets(_silver_bucket, jobs, task, workers)
    try:
        for result in results:
            for message in result["messages"]:
                progress(message)
            qualities.append(result["quality"])
            quarantine = result["quarantine"]
            if quarantine.num_rows:
                quarantine_writer.write(quarantine)
            elif empty_quarantine is None:
                empty_quarantine = quarantine
            silver_writer.write(result["silver"])
            rows_in += result["rows_in"]
            quarantined, collapsed = quarantined + quarantine.num_rows, collapsed + result["collapsed"]
            del result, quarantine
        if not quarantine_writer.staged and empty_quarantine is not None:
            quarantine_writer.write(empty_quarantine)  # an empty, committed quarantine: "checked, none"
    except BaseException:
        results.close()
        silver_writer.abort()
        quarantine_writer.abort()
        raise
    quality = qualities[0] if len(qualities) == 1 else _merge_quality(qualities)
    # Quarantine first: a bad record is never lost, even if the silver commit fails next.
    quarantine_writer.commit()
    manifest = silver_writer.commit()
    _put_quality(store, "silver", dataset, partition, quality)
    progress(
        f"[silver] {partition}: {rows_in} in -> {manifest.rows} silver, {quarantined} quarantined, "
        f"{collapsed} identical re-deliveries collapsed"
    )
    return _layer_report(
        "silver",
        dataset,
        partition,
        rows_in,
        manifest,
        quality,
        quarantined=quarantined,
        collapsed_duplicates=collapsed,
    )


# -- gold ---------------------------------------------------------------------------------------
@dataclass
class _GoldTask(_BucketTask):
    previous_files: list[bytes]  # the previous partition's silver, for the warm-up ([] on the first)
    reference: Any
    window: int | str  # readings, or a duration such as "15min"
    long_window: int | str


def _gold_bucket(job: tuple[int, list | None, int]) -> dict[str, Any]:
    """One device bucket: features (warmed up with the same devices' previous day) and their gate."""
    from pipelines.jobs.buckets import shared
    from pipelines.layers.gold import to_gold, to_storage, warmup_tail
    from pipelines.quality.suites import reference_profile

    index, bucket, total = job
    task: _GoldTask = shared()
    device = task.contract.entity.column

    def work(say: Callable[[str], None]) -> dict[str, Any]:
        silver = storage.decode_rows(task.files, device, bucket).to_pandas()
        warmup = None
        if task.previous_files:
            prev = storage.decode_rows(task.previous_files, device, bucket).to_pandas()
            warmup = warmup_tail(prev, device, task.contract.event_time.column, task.window, task.long_window)
            del prev
        gold = to_gold(silver, task.contract, window=task.window, warmup=warmup, long_window=task.long_window)
        rows_in = len(silver)
        del silver, warmup
        store = task.worker_store()
        quality = _gate(
            gold,
            "gold",
            task.contract,
            task.partition,
            say,
            reference=task.reference,
            store=store,
            dataset=task.dataset,
        )
        if total > 1:  # a single bucket's line would repeat the partition's own
            say(f"[gold] {task.partition}{_bucket_label(bucket, index, total)}: {len(gold)} feature rows")
        return {"rows_in": rows_in, "quality": quality, "profile": reference_profile(gold), "gold": to_storage(gold)}

    return task.run(work)


def build_gold(
    partition: str,
    run_id: str,
    *,
    dataset: str | None = None,
    store: LakeStore | None = None,
    progress: Progress = print,
    bucket_rows: int | None = None,
    workers: int | None = None,
) -> LayerReport:
    """Model features for one silver partition, device bucket by device bucket (bounded memory).

    Each bucket's rolling windows are warmed up with the same devices' last readings of the
    previous day; every bucket is gated against the previous gold partition's feature profile
    before the partition is committed. Buckets run side by side in `workers` processes, as silver's."""

    store, dataset = _resolve(store, dataset)
    with storage.lock_partitions(store, dataset, [partition], run_id, "gold build", progress):
        return _build_gold(partition, run_id, dataset, store, progress, bucket_rows, workers)


def _build_gold(partition, run_id, dataset, store, progress, bucket_rows, workers) -> LayerReport:
    from pipelines.datasets import effective_params
    from pipelines.jobs.buckets import map_buckets, workers_for
    from pipelines.layers.partitioning import previous_partition
    from pipelines.quality.suites import combine_profiles

    contract = _contract(dataset)
    gold_params = effective_params(dataset)["gold"]
    files = storage.read_partition_files(store, "silver", dataset, partition)
    silver_manifest = storage.read_manifest(store, "silver", dataset, partition)
    if silver_manifest is not None and silver_manifest.rows == 0:
        # Every reading of the partition was quarantined (one future-dated reading, a delivery in the
        # wrong unit): a valid outcome, not a failure. There is nothing to compute features from.
        progress(
            f"[gold] {partition}: no silver rows (every reading quarantined, see "
            f"s3://{store.settings.lake_bucket}/{storage.partition_prefix('quarantine', dataset, partition)}); "
            "gold skipped"
        )
        return LayerReport("gold", dataset, partition, 0, 0)
    # Warm-up: the previous partition's tail, so rolling features at its edge see the readings before it.
    previous = previous_partition(partition, _grain(dataset))
    previous_manifest = storage.read_manifest(store, "silver", dataset, previous)
    previous_files = (
        storage.read_partition_files(store, "silver", dataset, previous)
        if previous_manifest is not None and previous_manifest.rows
        else []
    )
    buckets = _device_buckets(files, contract.entity.column, bucket_rows, "gold")
    task = _GoldTask(
        store,
        dataset,
        partition,
        contract,
        files,
        progress,
        previous_files=previous_files,
        reference=_gold_reference(store, dataset, partition),
        window=gold_params["window"],
        long_window=gold_params["long_window"],
    )
    workers = workers_for(len(buckets), workers)
    writer = storage.PartitionWriter(store, "gold", dataset, partition, run_id)
    qualities, profiles, rows_in = [], [], 0
    results = map_buckets(_gold_bucket, [(i, b, len(buckets)) for i, b in enumerate(buckets)], task, workers)
    try:
        for result in results:
            for message in result["messages"]:
                progress(message)
            qualities.append(result["quality"])
            profiles.append(result["profile"])
            writer.write(result["gold"])
            rows_in += result["rows_in"]
            del result
    except BaseException:
        results.close()
        writer.abort()
        raise
    quality = qualities[0] if len(qualities) == 1 else _merge_quality(qualities)
    manifest = writer.commit(extra={"reference_profile": combine_profiles(profiles)})
    _put_quality(store, "gold", dataset, partition, quality)
    progress(f"[gold] {partition}: {manifest.rows} feature rows")
    return _layer_report("gold", dataset, partition, rows_in, manifest, quality)


def _gold_reference(store: LakeStore, dataset: str, partition: str) -> pd.DataFrame | dict | None:
    """The latest earlier gold partition's feature profile: the reference window for drift bounds.

    Its manifest carries the profile; a partition published before profiles existed is read whole."""
    earlier = [p for p in storage.list_partitions(store, "gold", dataset) if p < partition]
    if not earlier:
        return None
    manifest = storage.read_manifest(store, "gold", dataset, earlier[-1])
    if manifest is not None and manifest.extra.get("reference_profile"):
        return manifest.extra["reference_profile"]
    return storage.read_partition(store, "gold", dataset, earlier[-1]).to_pandas()


def _short(quality: dict) -> dict:
    keep = ("layer", "partition", "success", "statistics")
    return {k: quality.get(k) for k in keep if k in quality}


# -- reading gold for training ------------------------------------------------------------------
def read_gold(
    partitions: list[str] | None = None,
    *,
    dataset: str | None = None,
    store: LakeStore | None = None,
    max_rows: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Gold partitions for training, at most `train.sample.max_rows` rows (params.yaml; 0 = all),
    and a snapshot naming exactly what was read, the sample included.

    Memory is bounded by configuration, not by the lake: the rule (`latest_partitions`) keeps the
    newest partitions whole, newest first, while their rows (known from the manifests, before
    anything is read) fit; where the newest partition alone is larger, whole devices of it up to
    the bound (a device's readings stay together and in time order, as the per-device detectors and
    the time split need). The same call gives the same rows (the gate re-reads what training read).
    The snapshot's `sample` says the rule, the bound and what was left out; training logs it (tag
    `gold_snapshot`, `lineage/gold_snapshot.json`) beside the params `train.sample.*`."""
    from pipelines.datasets import effective_params
    from pipelines.layers.gold import from_storage

    store, dataset = _resolve(store, dataset)
    partitions = partitions or storage.list_partitions(store, "gold", dataset)
    if not partitions:
        raise storage.StorageError(f"No gold partitions for {dataset}: run the lakehouse DAG first.")
    sample = (effective_params(dataset).get("train") or {}).get("sample") or {}
    limit = int(sample.get("max_rows", 0) if max_rows is None else max_rows)
    rule = str(sample.get("rule", "latest_partitions"))
    if rule != "latest_partitions":
        raise ValueError(f"train.sample.rule={rule!r} in params.yaml: the rule is 'latest_partitions'")
    manifests = {p: storage.read_manifest(store, "gold", dataset, p) for p in sorted(partitions)}
    missing = [p for p, m in manifests.items() if m is None]
    if missing:
        raise storage.StorageError(f"No published gold partition {dataset} {missing[0]}: run that date first.")
    available = sum(m.rows for m in manifests.values())
    chosen: dict[str, list | None] = {}  # partition -> devices read (None: all)
    if limit <= 0 or available <= limit:
        chosen = {p: None for p in manifests}
    else:
        total = 0
        for p in sorted(manifests, reverse=True):
            rows = manifests[p].rows
            if total + rows <= limit:
                chosen[p], total = None, total + rows
            elif not chosen:  # the newest partition alone is over the bound: whole devices of it
                chosen[p] = _devices_within(store, dataset, p, limit)
                break
            else:
                break
    frames, snapshot = [], {"dataset": dataset, "bucket": store.settings.lake_bucket, "partitions": {}}
    device = None
    for p in sorted(chosen):
        manifest, devices = manifests[p], chosen[p]
        if devices is None:
            table = storage.read_partition(store, "gold", dataset, p)
        else:
            device = device or _contract(dataset).entity.column
            table = storage.decode_rows(storage.read_partition_files(store, "gold", dataset, p), device, devices)
        frames.append(from_storage(table))
        del table
        snapshot["partitions"][p] = {
            "run_id": manifest.run_id,
            "rows": manifest.rows,
            "content_sha256": manifest.content_sha256,
            **({"devices_read": len(devices)} if devices is not None else {}),
        }
    import hashlib

    snapshot["content_sha256"] = hashlib.sha256(
        "".join(v["content_sha256"] for _, v in sorted(snapshot["partitions"].items())).encode()
    ).hexdigest()
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    del frames
    snapshot["sample"] = {
        "rule": rule,
        "max_rows": limit,
        "rows_available": available,
        "rows_read": len(frame),
        "partitions_available": len(manifests),
        "partitions_left_out": sorted(set(manifests) - set(chosen)),
    }
    return frame, snapshot


def _devices_within(store: LakeStore, dataset: str, partition: str, limit: int) -> list:
    """Whole devices of a gold partition, in device order, whose rows together fit in `limit`
    (at least one device, even if it alone is larger)."""
    device = _contract(dataset).entity.column
    counts = storage.rows_per_value(storage.read_partition_files(store, "gold", dataset, partition), device)
    kept, total = [], 0
    for value in sorted(counts, key=lambda v: (v is None, str(v))):
        if kept and total + counts[value] > limit:
            break
        kept.append(value)
        total += counts[value]
    return kept


def read_quality(
    layer: str, partitions: list[str] | None = None, *, dataset: str | None = None, store: LakeStore | None = None
) -> dict[str, Any]:
    """The gate results of `layer` per partition; all recorded ones when `partitions` is None (bronze's
    are filed under the delivery date, which names no event-date partition)."""
    store, dataset = _resolve(store, dataset)
    if partitions is None:
        prefix = f"quality/{layer}/{dataset}/event_date="
        keys = store.list_keys(store.settings.lake_bucket, prefix)
        partitions = sorted({k[len(prefix) :].split("/", 1)[0] for k in keys if k.endswith("/validation.json")})
    out = {}
    for p in partitions:
        key = f"quality/{layer}/{dataset}/event_date={p}/validation.json"
        if store.exists(store.settings.lake_bucket, key):
            out[p] = json.loads(store.get_bytes(store.settings.lake_bucket, key))
    return out


def partition_from_context(context: dict[str, Any]) -> str:
    """The event date a DAG run owns: conf `partition_date` if given, else its data interval's start."""
    conf = (context.get("dag_run").conf if context.get("dag_run") else None) or {}
    # A run for a delivery of any age names it in its conf: a logical date before the DAG's
    # start_date would create a run without tasks.
    for key in ("delivery_date", "partition_date"):
        if conf.get(key):
            return dt.date.fromisoformat(str(conf[key])).isoformat()
    start = context.get("data_interval_start") or context.get("logical_date")
    if start is None:
        raise ValueError(
            'This run has no data interval or logical date: trigger it with conf {"partition_date": "YYYY-MM-DD"}.'
        )
    return start.date().isoformat()
