"""The lake on S3: object I/O, partition paths, and atomic publish through commit manifests.

Commit protocol (Delta Lake's idea, reduced to one object per partition):
  1. a writer puts its data files under  <layer>/<dataset>/event_date=<d>/run=<run_id>/part-*.parquet
     (invisible: no reader lists data files directly);
  2. it then PUTs  <layer>/<dataset>/event_date=<d>/_manifest.json  naming those files, their
     row counts and a content hash. A single S3 PUT is atomic, so a reader sees either the old
     manifest or the new one, never a half-written partition;
  3. files no manifest names are deleted after the new manifest is in place, once older than a
     grace period (`lake.gc_grace_seconds`): a younger one may be staged by a concurrent writer.
A writer killed before step 2 leaves only unreferenced files, which a later publish of the
same partition removes. Writers of one partition in different runs hold its lease (`Lease`, an
object created with a conditional put), so they are serialised across processes and machines.
Re-running a logical date rewrites exactly that partition (idempotent): the manifest is replaced, never appended to.

One interface, two stores (`LakeStore`): `ObjectStore` (S3: MinIO, SeaweedFS) for the DAGs, and
`LocalStore` (a directory: buckets are sub-folders, keys relative paths) for the DVC stages, so
both run the same layer jobs and write the same lake.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.settings import Settings, get_settings

MANIFEST_NAME = "_manifest.json"
LAYERS = ("bronze", "silver", "gold", "quarantine")


class StorageError(RuntimeError):
    pass


@dataclass
class Manifest:
    layer: str
    dataset: str
    partition: str
    run_id: str
    files: list[dict[str, Any]]  # {key, rows, bytes, sha256}
    rows: int
    content_sha256: str
    schema: list[str]
    committed_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls(**json.loads(data))


@runtime_checkable
class LakeStore(Protocol):
    """What the lake jobs need from a store: buckets of objects addressed by key.

    Keys are '/'-separated; `list_keys` returns them sorted (S3's order); a put is atomic (a
    reader sees the old object or the new one). Implemented by `ObjectStore` (S3) and
    `LocalStore` (a directory)."""

    settings: Settings

    def ensure_buckets(self, *names: str) -> None: ...

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = ...) -> str: ...

    def get_bytes(self, bucket: str, key: str) -> bytes: ...

    def open_object(self, bucket: str, key: str) -> BinaryIO:
        """A streaming reader of one object (read(n), close()); the caller closes it."""
        ...

    def etag(self, bucket: str, key: str) -> str: ...

    def exists(self, bucket: str, key: str) -> bool: ...

    def list_keys(self, bucket: str, prefix: str = "", recursive: bool = True) -> list[str]: ...

    def list_ages(self, bucket: str, prefix: str = "") -> dict[str, float]:
        """{key: seconds since it was last written} of every object under `prefix`."""
        ...

    def put_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str | None:
        """Conditional put: create `key` only if absent (`etag` None), or replace it only if its
        ETag is still `etag`. The new ETag, or None when the condition did not hold. Atomic: of two
        writers racing on one condition, one wins. Locks (`Lease`) are built on this."""
        ...

    def delete_keys(self, bucket: str, keys: list[str]) -> None: ...

    def size(self, bucket: str, key: str) -> int: ...

    def put_stream(self, bucket: str, key: str, stream: BinaryIO, length: int, part_size: int) -> str:
        """Store `length` bytes read from `stream`, holding about `part_size` of them at a time (S3:
        a multipart upload, completed only when every part is stored: an error while reading aborts
        it and nothing is visible). Returns the ETag."""
        ...

    def put_parquet(self, bucket: str, key: str, table: pa.Table) -> dict[str, Any]: ...

    def put_encoded_parquet(self, bucket: str, key: str, data: bytes, rows: int) -> dict[str, Any]: ...

    def get_parquet(self, bucket: str, key: str) -> pa.Table: ...

    def now(self) -> datetime:
        """The clock the lake records (commit and ingestion times): a reproducible store pins it."""
        ...

    def for_worker(self) -> LakeStore:
        """The store a forked worker process uses (it must not share open connections)."""
        ...


class _ParquetObjects:
    """Parquet objects over put_bytes/get_bytes: one definition for every store."""

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        raise NotImplementedError

    def get_bytes(self, bucket: str, key: str) -> bytes:
        raise NotImplementedError

    def put_parquet(self, bucket: str, key: str, table: pa.Table) -> dict[str, Any]:
        return self.put_encoded_parquet(bucket, key, table_to_parquet_bytes(table), table.num_rows)

    def put_encoded_parquet(self, bucket: str, key: str, data: bytes, rows: int) -> dict[str, Any]:
        """Store Parquet bytes; the file's entry as a manifest lists it (key, rows, bytes, sha256)."""
        self.put_bytes(bucket, key, data)
        return {"key": key, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def get_parquet(self, bucket: str, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.get_bytes(bucket, key)))


class _ResponseStream(io.RawIOBase):
    """A MinIO response as a plain stream: close() also returns its connection to the pool."""

    def __init__(self, response: Any):
        super().__init__()
        self._response = response

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        return self._response.read(None if size is None or size < 0 else size)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._response.close()
                self._response.release_conn()
            finally:
                super().close()


class ObjectStore(_ParquetObjects):
    """Thin wrapper over the MinIO client (works against MinIO and SeaweedFS alike)."""

    def __init__(self, settings: Settings | None = None):
        from minio import Minio

        self.settings = settings or get_settings()
        access, secret = self.settings.require_s3_credentials()
        url = urlparse(self.settings.s3_endpoint_url)
        self.client = Minio(
            url.netloc,
            access_key=access,
            secret_key=secret,
            secure=url.scheme == "https",
            region=self.settings.s3_region,
        )

    # -- buckets ----------------------------------------------------------------------------
    def ensure_buckets(self, *names: str) -> None:
        s = self.settings
        for bucket in names or (s.landing_bucket, s.lake_bucket, s.mlflow_bucket):
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)

    # -- objects ----------------------------------------------------------------------------
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        result = self._retry(
            lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        )
        return (result.etag or "").strip('"')

    def get_bytes(self, bucket: str, key: str) -> bytes:
        def _get() -> bytes:
            resp = self.client.get_object(bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry(_get)

    def open_object(self, bucket: str, key: str) -> BinaryIO:
        return _ResponseStream(self.client.get_object(bucket, key))  # type: ignore[return-value]

    def etag(self, bucket: str, key: str) -> str:
        return (self.client.stat_object(bucket, key).etag or "").strip('"')

    def exists(self, bucket: str, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(bucket, key)
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise

    def list_keys(self, bucket: str, prefix: str = "", recursive: bool = True) -> list[str]:
        return sorted(o.object_name for o in self.client.list_objects(bucket, prefix=prefix, recursive=recursive))

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        for key in keys:
            self.client.remove_object(bucket, key)

    def size(self, bucket: str, key: str) -> int:
        return int(self.client.stat_object(bucket, key).size or 0)

    def put_stream(self, bucket: str, key: str, stream: BinaryIO, length: int, part_size: int) -> str:
        part_size = max(int(part_size), 5 * 2**20)  # S3's smallest part
        result = self.client.put_object(
            bucket,
            key,
            stream,
            length,
            content_type="application/octet-stream",
            part_size=part_size,
            num_parallel_uploads=1,  # one part in memory at a time
        )
        return (result.etag or "").strip('"')

    def list_ages(self, bucket: str, prefix: str = "") -> dict[str, float]:
        now = datetime.now(UTC)
        return {
            o.object_name: (now - o.last_modified).total_seconds() if o.last_modified else 0.0
            for o in self.client.list_objects(bucket, prefix=prefix, recursive=True)
        }

    def put_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str | None:
        """S3 conditional writes (If-None-Match: * / If-Match: <etag>; MinIO, SeaweedFS and AWS S3)."""
        from minio.error import S3Error

        condition = {"If-None-Match": "*"} if etag is None else {"If-Match": f'"{etag}"'}
        headers = {"Content-Length": str(len(data)), "Content-Type": "application/json", **condition}
        try:
            response = self.client._execute("PUT", bucket, key, body=data, headers=headers)
        except S3Error as e:
            if e.code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            raise
        return (response.headers.get("etag") or "").strip('"') or hashlib.md5(data).hexdigest()  # noqa: S324

    @staticmethod
    def _retry(fn, attempts: int = 4, base_delay: float = 0.5):
        """Transient object-store errors (connection resets, 5xx) are retried with backoff."""
        from minio.error import ServerError
        from urllib3.exceptions import HTTPError

        for attempt in range(attempts):
            try:
                return fn()
            except (ServerError, HTTPError, ConnectionError):
                if attempt == attempts - 1:
                    raise
                time.sleep(base_delay * 2**attempt)

    # -- clock and processes (see LakeStore) --------------------------------------------------
    def now(self) -> datetime:
        return datetime.now(UTC)

    def for_worker(self) -> ObjectStore:
        return ObjectStore(self.settings)


_TEMP_PREFIX = ".tmp-"  # an object being written; never listed, removed if its writer dies


class LocalStore(_ParquetObjects):
    """The lake in a local directory, with ObjectStore's methods: `<root>/<bucket>/<key>`.

    The DVC stages run the lake jobs on it, so data/ holds exactly what the object store would.
    A put writes a temp file beside its target and renames it over the target (os.replace is
    atomic), so the commit protocol holds here too: a reader sees the old manifest or the new one.
    `clock` pins `now()` (ingestion and commit times) for outputs that must not change run to run.
    """

    def __init__(self, root: Path | str, settings: Settings | None = None, clock: Callable[[], datetime] | None = None):
        self.root = Path(root)
        self.settings = settings or get_settings()
        self.clock = clock

    def _path(self, bucket: str, key: str) -> Path:
        parts = key.split("/")
        if not bucket or "/" in bucket or bucket in (".", "..") or key.startswith("/") or not key:
            raise StorageError(f"Invalid object {bucket!r}/{key!r}: a bucket name and a relative key are required")
        if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", ".."):
            raise StorageError(f"Invalid key {key!r} in bucket {bucket!r}: no empty, '.' or '..' segments")
        return self.root / bucket / key

    # -- buckets ----------------------------------------------------------------------------
    def ensure_buckets(self, *names: str) -> None:
        for bucket in names or (self.settings.landing_bucket, self.settings.lake_bucket):
            (self.root / bucket).mkdir(parents=True, exist_ok=True)

    # -- objects ----------------------------------------------------------------------------
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        path = self._path(bucket, key)
        if key.endswith("/"):  # a "folder marker" object: nothing to store locally
            path.mkdir(parents=True, exist_ok=True)
            return hashlib.md5(data).hexdigest()  # noqa: S324 - S3's ETag, not security
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; an object is as readable as any other file
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return hashlib.md5(data).hexdigest()  # noqa: S324 - S3's ETag of a single-part PUT

    def get_bytes(self, bucket: str, key: str) -> bytes:
        path = self._path(bucket, key)
        if not path.is_file():
            raise FileNotFoundError(f"No object {key!r} in bucket {bucket!r} (looked for {path})")
        return path.read_bytes()

    def open_object(self, bucket: str, key: str) -> BinaryIO:
        path = self._path(bucket, key)
        if not path.is_file():
            raise FileNotFoundError(f"No object {key!r} in bucket {bucket!r} (looked for {path})")
        return open(path, "rb")

    def etag(self, bucket: str, key: str) -> str:
        """The MD5 hex digest, as S3 reports for an object stored with one PUT."""
        h = hashlib.md5()  # noqa: S324 - S3's ETag, not security
        with self.open_object(bucket, key) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def exists(self, bucket: str, key: str) -> bool:
        return self._path(bucket, key).is_file()

    def list_keys(self, bucket: str, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys starting with `prefix` (a string prefix, as S3's), sorted as S3 lists them; not
        recursive: the keys and "sub/" prefixes one level below `prefix`'s last '/'."""
        base = self.root / bucket
        folder = base / prefix.rsplit("/", 1)[0] if "/" in prefix else base
        if not folder.is_dir():
            return []
        found: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(folder):
            rel = Path(dirpath).relative_to(base).as_posix()
            rel = "" if rel == "." else rel + "/"
            for name in filenames:
                key = rel + name
                if not name.startswith(_TEMP_PREFIX) and key.startswith(prefix):
                    found.add(key)
            # only descend where keys can still start with the prefix
            dirnames[:] = [
                d for d in dirnames if (rel + d + "/").startswith(prefix) or prefix.startswith(rel + d + "/")
            ]
        if not recursive:
            found = {
                prefix + rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                for rest in (k[len(prefix) :] for k in found)
            }
        return sorted(found)  # code point order = UTF-8 byte order = S3's listing order

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        """Delete objects (a missing one is no error, as in S3) and the folders they leave empty."""
        base = self.root / bucket
        for key in keys:
            path = self._path(bucket, key)
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != base and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def size(self, bucket: str, key: str) -> int:
        path = self._path(bucket, key)
        if not path.is_file():
            raise FileNotFoundError(f"No object {key!r} in bucket {bucket!r} (looked for {path})")
        return path.stat().st_size

    def put_stream(self, bucket: str, key: str, stream: BinaryIO, length: int, part_size: int) -> str:
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
        digest = hashlib.md5()  # noqa: S324 - S3's ETag, not security
        try:
            with os.fdopen(fd, "wb") as f:
                written = 0
                for chunk in iter(lambda: stream.read(max(int(part_size), 1 << 16)), b""):
                    digest.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
                if written != length:
                    raise StorageError(f"{key}: read {written} bytes, expected {length}")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest.hexdigest()

    def list_ages(self, bucket: str, prefix: str = "") -> dict[str, float]:
        now = time.time()
        ages = {}
        for key in self.list_keys(bucket, prefix):
            try:
                ages[key] = now - self._path(bucket, key).stat().st_mtime
            except FileNotFoundError:
                continue
        return ages

    def put_if(self, bucket: str, key: str, data: bytes, etag: str | None) -> str | None:
        """Conditional put on a directory: the check and the write run under an exclusive flock of
        the bucket's lock file, so writers in other processes see one winner."""
        import fcntl

        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.root / bucket).mkdir(parents=True, exist_ok=True)
        guard = self.root / bucket / f"{_TEMP_PREFIX}put-if.lock"  # never listed as an object
        with open(guard, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                exists = path.is_file()
                if (etag is None and exists) or (etag is not None and (not exists or self.etag(bucket, key) != etag)):
                    return None
                return self.put_bytes(bucket, key, data, "application/json")
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- clock and processes (see LakeStore) --------------------------------------------------
    def now(self) -> datetime:
        return self.clock() if self.clock is not None else datetime.now(UTC)

    def for_worker(self) -> LocalStore:
        return self  # no connections to share: a forked worker uses the same directory


ROW_GROUP_ROWS = 65_536


def table_to_parquet_bytes(table: pa.Table, dictionary: list[str] | None = None) -> bytes:
    """zstd Parquet, with dictionary encoding only for columns that repeat values (device ids,
    labels, lineage, readings rounded by the sensor). Timestamps as delivered and features computed
    from windows are nearly all distinct: trying a dictionary for each of them first doubled the
    write time of gold and cost bronze a quarter of its encoding. `dictionary`: the columns to
    encode so, when the caller already knows (a writer decides once for all its files)."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=(_repetitive_columns(table) if dictionary is None else dictionary) or False,
        # Row groups small enough that a reader of a few devices skips most of a file by its
        # min/max statistics (lake files are written in device order), big enough to compress well.
        row_group_size=ROW_GROUP_ROWS,
    )
    return sink.getvalue().to_pybytes()


def _repetitive_columns(table: pa.Table, sample: int = 20_000) -> list[str]:
    """Columns whose first `sample` values are less than half distinct (nulls count as repeats)."""
    import pyarrow.compute as pc

    head = table.slice(0, sample)
    return [
        name
        for name, column in zip(head.column_names, head.columns, strict=True)
        if len(column) and pc.count_distinct(column).as_py() < 0.5 * len(column)
    ]


# -- lake paths -------------------------------------------------------------------------------
def partition_prefix(layer: str, dataset: str, partition: str) -> str:
    if layer not in LAYERS:
        raise StorageError(f"Unknown layer {layer!r}; expected one of {LAYERS}")
    return f"{layer}/{dataset}/event_date={partition}/"


def landing_prefix(dataset: str, partition: str | None = None) -> str:
    return f"{dataset}/" if partition is None else f"{dataset}/{partition}/"


# -- commit protocol --------------------------------------------------------------------------
def publish_partition(
    store: LakeStore,
    layer: str,
    dataset: str,
    partition: str,
    tables: list[pa.Table] | pa.Table,
    run_id: str,
    extra: dict[str, Any] | None = None,
    batch: str | None = None,
) -> Manifest:
    """Write files under a run-scoped prefix, then commit them with one manifest PUT.

    Without `batch`, the new manifest replaces the partition's content. With `batch` (e.g.
    "delivery=2026-01-05"), only that batch's files are replaced and other batches stay: this is
    how bronze merges several deliveries (late data) into one event-date partition, and why
    re-delivering or re-running one delivery never duplicates records.
    """
    writer = PartitionWriter(store, layer, dataset, partition, run_id, batch)
    for table in [tables] if isinstance(tables, pa.Table) else tables:
        writer.write(table)
    return writer.commit(extra)


class PartitionWriter:
    """Stage files for one partition (invisible to readers) and commit them in one manifest PUT.

    Writers of one partition in different runs are serialised by the partition's lease in the store
    (`lock_partitions`), so a commit's read-modify-write of the manifest never loses another run's
    batch; the manifest PUT itself is atomic, so readers never see a half-written partition. Staged
    files of a writer that dies are never referenced and are collected by a later commit of the
    partition once older than `lake.gc_grace_seconds` (a younger one may belong to a writer about
    to commit).
    """

    def __init__(
        self,
        store: LakeStore,
        layer: str,
        dataset: str,
        partition: str,
        run_id: str,
        batch: str | None = None,
    ):
        self.store, self.layer, self.dataset, self.partition = store, layer, dataset, partition
        self.run_id, self.batch = run_id, batch
        self.bucket = store.settings.lake_bucket
        self.prefix = partition_prefix(layer, dataset, partition)
        self.run_prefix = f"{self.prefix}run={_safe(run_id)}/" + (f"{_safe(batch)}/" if batch else "")
        self.files: list[dict[str, Any]] = []
        self.schema: list[str] = []
        self._pending: Any = None  # the upload in flight (a Future), see write()
        self._uploader: Any = None
        self._dictionary: list[str] | None = None
        # A previous attempt of this same run may have left files: start the run prefix clean.
        store.delete_keys(self.bucket, store.list_keys(self.bucket, self.run_prefix))

    def write(self, table: pa.Table) -> None:
        """Encode `table` here, upload it in the background while the caller computes the next one.

        At most one upload is in flight (memory: one encoded file more than a synchronous writer);
        an upload error surfaces at the next write, at commit or at abort, never silently."""
        if table.num_rows == 0 and self.staged:
            return
        self.schema = self.schema or table.schema.names
        key = f"{self.run_prefix}part-{self.staged:05d}.parquet"
        if self._dictionary is None:  # decided on the first file, the same for all of them
            self._dictionary = _repetitive_columns(table)
        data, rows = table_to_parquet_bytes(table, self._dictionary), table.num_rows
        self._finish_upload()
        if self._uploader is None:
            from concurrent.futures import ThreadPoolExecutor

            self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"upload-{self.layer}")

        def upload() -> dict[str, Any]:
            info = self.store.put_encoded_parquet(self.bucket, key, data, rows)
            return {**info, "batch": self.batch} if self.batch else info

        self._pending = self._uploader.submit(upload)

    def _finish_upload(self) -> None:
        """Wait for the upload in flight; its file joins `files` only once it is stored."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.files.append(pending.result())

    def _close_uploader(self) -> None:
        try:
            self._finish_upload()
        finally:
            if self._uploader is not None:
                self._uploader.shutdown(wait=True)
                self._uploader = None

    @property
    def rows(self) -> int:
        self._finish_upload()
        return sum(f["rows"] for f in self.files)

    @property
    def staged(self) -> int:
        """Files written so far, stored or still uploading."""
        return len(self.files) + (self._pending is not None)

    def commit(self, extra: dict[str, Any] | None = None) -> Manifest:
        self._close_uploader()  # every staged file is stored before the manifest names it
        if not self.batch:
            return self._commit(extra)
        # A batch commit reads the manifest, keeps the other batches and writes it back: writers of
        # other batches (another delivery, the live path) wait for this manifest's lease meanwhile.
        ttl, wait = lock_settings()
        name = f"manifest/{self.prefix.rstrip('/')}"
        with Lease(self.store, name, f"{self.run_id}/{self.batch}", f"commit of {self.prefix}", ttl).acquire(wait):
            return self._commit(extra)

    def _commit(self, extra: dict[str, Any] | None) -> Manifest:
        kept: list[dict[str, Any]] = []
        previous = read_manifest(self.store, self.layer, self.dataset, self.partition)
        if self.batch and previous is not None:
            kept = [f for f in previous.files if f.get("batch") and f.get("batch") != self.batch]
        all_files = sorted(kept, key=lambda f: (f["batch"], f["key"])) + self.files
        content = hashlib.sha256("".join(f["sha256"] for f in all_files).encode()).hexdigest()
        manifest = Manifest(
            layer=self.layer,
            dataset=self.dataset,
            partition=self.partition,
            run_id=self.run_id,
            files=all_files,
            rows=sum(f["rows"] for f in all_files),
            content_sha256=content,
            schema=self.schema,
            committed_at=self.store.now().isoformat(),
            extra=extra or {},
        )
        # A manifest never names a file that does not exist: checked against one listing, before the PUT.
        ages = self.store.list_ages(self.bucket, self.prefix)
        missing = [f["key"] for f in all_files if f["key"] not in ages]
        if missing:
            raise StorageError(
                f"Not committing {self.layer} partition {self.dataset}/event_date={self.partition}: "
                f"{len(missing)} file(s) it would name are not in the store (first: {missing[0]}); another "
                "writer removed them. Run the partition again; nothing was published."
            )
        self.store.put_bytes(self.bucket, self.prefix + MANIFEST_NAME, manifest.to_json(), "application/json")
        live = {f["key"] for f in all_files} | {self.prefix + MANIFEST_NAME}
        superseded = {f["key"] for f in previous.files} if previous is not None else set()
        self.store.delete_keys(self.bucket, collectable(ages, live, self.run_prefix, gc_grace_seconds(), superseded))
        return manifest

    def abort(self) -> None:
        try:
            self._close_uploader()
        except Exception:  # noqa: BLE001 - aborting anyway; the failed upload left nothing to keep
            pass
        self.store.delete_keys(self.bucket, [f["key"] for f in self.files])
        self.files = []


def gc_grace_seconds() -> float:
    """`lake.gc_grace_seconds` in params.yaml: how old an unreferenced file must be to be collected."""
    from pipelines.settings import load_params

    return float((load_params().get("lake") or {}).get("gc_grace_seconds", 3600))


def collectable(
    ages: dict[str, float], live: set[str], own_prefix: str, grace_seconds: float, superseded: set[str] = frozenset()
) -> list[str]:
    """Files a commit may delete: unreferenced by the manifest it just published, and either named by
    the manifest it replaced (superseded, under the partition's lease), its own writer's leftovers,
    or older than the grace period. A younger unlisted file of another run may be staged for a
    manifest a concurrent writer is about to publish: deleting it would leave that manifest naming
    a file that does not exist. What is left is collected by a later commit."""
    return sorted(
        k
        for k, age in ages.items()
        if k not in live
        and not k.endswith("/" + MANIFEST_NAME)
        and (k in superseded or k.startswith(own_prefix) or age >= grace_seconds)
    )


def verify_partition(store: LakeStore, layer: str, dataset: str, partition: str) -> list[str]:
    """The files the partition's manifest names that are not in the store (empty: it is whole)."""
    manifest = read_manifest(store, layer, dataset, partition)
    if manifest is None:
        return []
    present = set(store.list_keys(store.settings.lake_bucket, partition_prefix(layer, dataset, partition)))
    return [f["key"] for f in manifest.files if f["key"] not in present]


# -- leases: locks in the object store ----------------------------------------------------------
LOCK_PREFIX = "_locks/"


class LockHeld(StorageError, TimeoutError):
    """Another run holds the lease: the message names it, since when, until when, and what to do.
    A TimeoutError: a task that waited its `lake.lock_wait_seconds` in vain is retried by Airflow
    (as for a busy service), never failed as a deterministic error."""


@dataclass
class Lease:
    """A lock held in the store: one small object created with a conditional put (If-None-Match),
    naming its owner and an expiry. It is renewed while held (If-Match on its own ETag), released
    by its owner, and taken over once expired (If-Match on the expired ETag: of two claimants one
    wins). A crashed holder therefore blocks others for at most one `ttl`."""

    store: LakeStore
    name: str
    owner: str
    purpose: str
    ttl: float
    etag: str = ""
    _stop: Any = None
    _thread: Any = None

    @property
    def key(self) -> str:
        return LOCK_PREFIX + self.name + ".json"

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "purpose": self.purpose,
                "acquired_at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                "expires_at": now + self.ttl,
                "host": os.uname().nodename,
                "pid": os.getpid(),
            },
            sort_keys=True,
        ).encode()

    def acquire(self, wait: float = 0.0, poll: float = 0.5, progress: Callable[[str], None] | None = None) -> Lease:
        bucket = self.store.settings.lake_bucket
        deadline, said = time.monotonic() + wait, False
        while True:
            etag = self.store.put_if(bucket, self.key, self._body(), None)
            if etag is None:
                holder, held_etag = _read_lease(self.store, bucket, self.key)
                if holder is None:
                    continue  # released between our put and our read: try again
                if holder.get("owner") == self.owner or float(holder.get("expires_at", 0)) < time.time():
                    etag = self.store.put_if(bucket, self.key, self._body(), held_etag)  # ours again, or expired
            if etag is not None:
                self.etag = etag
                self._start_renewal()
                return self
            if time.monotonic() >= deadline:
                raise LockHeld(self.refusal(holder))
            if progress is not None and not said:
                progress(f"[lock] {self.purpose}: waiting for {_describe(holder)} (up to {wait:.0f} s)")
                said = True
            time.sleep(poll)

    def refusal(self, holder: dict | None) -> str:
        return (
            f"{self.purpose} is refused: {self.name} is held by {_describe(holder)}. Wait for that run to "
            f"finish and run this again (a crashed holder's lease expires by itself; lock object "
            f"s3://{self.store.settings.lake_bucket}/{self.key})"
        )

    def _start_renewal(self) -> None:
        import threading

        self._stop = threading.Event()

        def renew() -> None:
            bucket = self.store.settings.lake_bucket
            while not self._stop.wait(self.ttl / 3):
                try:
                    etag = self.store.put_if(bucket, self.key, self._body(), self.etag)
                except Exception:  # noqa: BLE001 - a missed renewal is retried; the lease lasts a ttl
                    continue
                if etag is None:
                    return  # taken over after expiry: nothing more to renew
                self.etag = etag

        self._thread = threading.Thread(target=renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=5)
        bucket = self.store.settings.lake_bucket
        holder, _ = _read_lease(self.store, bucket, self.key)
        if holder is not None and holder.get("owner") == self.owner and holder.get("pid") == os.getpid():
            self.store.delete_keys(bucket, [self.key])

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_lease(store: LakeStore, bucket: str, key: str) -> tuple[dict | None, str | None]:
    """The lease's content and ETag (the store's own: with encryption at rest it is not the MD5).
    Read one after the other: if the lease changed between, the conditional put on that ETag fails
    and the caller reads again."""
    try:
        etag = store.etag(bucket, key)
        data = store.get_bytes(bucket, key)
    except Exception:  # noqa: BLE001 - gone (released): the caller tries again
        return None, None
    try:
        return json.loads(data), etag
    except ValueError:
        return {"owner": "?", "expires_at": 0}, etag


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another run"
    left = float(holder.get("expires_at", 0)) - time.time()
    return (
        f"{holder.get('owner')} ({holder.get('purpose')}, host {holder.get('host')} pid {holder.get('pid')}, "
        f"since {holder.get('acquired_at')}, lease renewed while it runs, expires in {max(left, 0):.0f} s if not)"
    )


def lock_settings() -> tuple[float, float]:
    """(ttl, wait) seconds of partition leases: `lake.lock_ttl_seconds`, `lake.lock_wait_seconds`."""
    from pipelines.settings import load_params

    lake = load_params().get("lake") or {}
    return float(lake.get("lock_ttl_seconds", 120)), float(lake.get("lock_wait_seconds", 900))


@contextlib.contextmanager
def lock_partitions(store: LakeStore, dataset: str, partitions: list[str], owner: str, purpose: str, progress=None):
    """Hold the leases of event-date partitions for the `with` block (taken in sorted order: two runs
    never wait on each other in a cycle). Writers of one partition — bronze commits, silver and gold
    builds of any run — are serialised by these, so a manifest's read-modify-write never loses another
    run's batch. Waits up to `lake.lock_wait_seconds` for each, then raises LockHeld naming the holder."""
    ttl, wait = lock_settings()
    held: list[Lease] = []
    try:
        for partition in sorted(set(partitions)):
            lease = Lease(store, f"{dataset}/event_date={partition}", owner, f"{purpose} of {dataset} {partition}", ttl)
            held.append(lease.acquire(wait=wait, progress=progress))
        yield held
    finally:
        release_all(held)


def release_all(leases: list[Lease]) -> None:
    for lease in reversed(leases):
        try:
            lease.release()
        except Exception:  # noqa: BLE001 - an unreleased lease expires by itself
            pass


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.:+=" else "_" for c in name)


def read_manifest(store: LakeStore, layer: str, dataset: str, partition: str) -> Manifest | None:
    key = partition_prefix(layer, dataset, partition) + MANIFEST_NAME
    if not store.exists(store.settings.lake_bucket, key):
        return None
    return Manifest.from_json(store.get_bytes(store.settings.lake_bucket, key))


def read_partition(store: LakeStore, layer: str, dataset: str, partition: str) -> pa.Table:
    """Only committed data: the files the manifest names, nothing else under the prefix."""
    tables = [pq.read_table(io.BytesIO(blob)) for blob in read_partition_files(store, layer, dataset, partition)]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def read_partition_files(store: LakeStore, layer: str, dataset: str, partition: str) -> list[bytes]:
    """The committed Parquet files of a partition, still encoded (a few bytes per row): a job
    that works through a large partition in device buckets decodes only one bucket at a time."""
    manifest = read_manifest(store, layer, dataset, partition)
    if manifest is None:
        raise StorageError(
            f"No published {layer} partition {dataset}/event_date={partition} in bucket "
            f"{store.settings.lake_bucket!r}; run the pipeline for that date first."
        )
    return [store.get_bytes(store.settings.lake_bucket, f["key"]) for f in manifest.files]


def rows_per_value(files: list[bytes], column: str) -> dict[Any, int]:
    """Rows per distinct value of `column` across encoded Parquet files (null counted under None)."""
    import pyarrow.compute as pc

    counts: dict[Any, int] = {}
    for blob in files:
        values = pq.read_table(io.BytesIO(blob), columns=[column]).column(column)
        for item in pc.value_counts(values).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def decode_rows(files: list[bytes], column: str | None = None, values: list | None = None) -> pa.Table:
    """Decode encoded Parquet files, keeping only rows whose `column` is in `values` (None in
    `values` keeps nulls); all rows when no filter is given.

    Row groups whose min/max statistics of `column` cannot hold any of `values` are not decoded:
    lake files are written in device order, so a bucket of devices reads about its own share."""
    import pyarrow.compute as pc

    tables = []
    for blob in files:
        source = pq.ParquetFile(io.BytesIO(blob))
        if column is None or values is None or column not in source.schema_arrow.names:
            tables.append(source.read())
            continue
        groups = _row_groups_for(source, column, values)
        if not groups:
            continue
        table = source.read_row_groups(groups)
        named = [v for v in values if v is not None]
        keep = pc.is_in(table.column(column), value_set=pa.array(named, type=table.schema.field(column).type))
        if None in values:
            keep = pc.or_(pc.fill_null(keep, False), pc.is_null(table.column(column)))
        tables.append(table.filter(pc.fill_null(keep, False)))
    if not tables:  # no row of these devices: an empty table of the files' schema
        return pq.ParquetFile(io.BytesIO(files[0])).schema_arrow.empty_table()
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _row_groups_for(source: pq.ParquetFile, column: str, values: list) -> list[int]:
    named = sorted(v for v in values if v is not None)
    lo, hi = (named[0], named[-1]) if named else (None, None)
    index = source.schema_arrow.get_field_index(column)
    groups = []
    for g in range(source.num_row_groups):
        stats = source.metadata.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max:
            groups.append(g)  # no statistics (or only nulls): decode it and filter
            continue
        if (None in values and stats.null_count) or (named and stats.min <= hi and stats.max >= lo):
            groups.append(g)
    return groups


def list_partitions(store: LakeStore, layer: str, dataset: str) -> list[str]:
    prefix = f"{layer}/{dataset}/"
    parts = set()
    for key in store.list_keys(store.settings.lake_bucket, prefix):
        if key.endswith("/" + MANIFEST_NAME):
            segment = key[len(prefix) :].split("/")[0]
            if segment.startswith("event_date="):
                parts.add(segment.removeprefix("event_date="))
    return sorted(parts)
