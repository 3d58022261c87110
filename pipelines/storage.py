"""The lake on S3: object I/O, partition paths, and atomic publish through commit manifests.

Commit protocol (Delta Lake's idea, reduced to one object per partition):
  1. a writer puts its data files under  <layer>/<dataset>/event_date=<d>/run=<run_id>/part-*.parquet
     (invisible: no reader lists data files directly);
  2. it then PUTs  <layer>/<dataset>/event_date=<d>/_manifest.json  naming those files, their
     row counts and a content hash. A single S3 PUT is atomic, so a reader sees either the old
     manifest or the new one, never a half-written partition;
  3. files of superseded runs are deleted after the new manifest is in place.
A writer killed before step 2 leaves only unreferenced files, which the next publish of the
same partition removes. Re-running a logical date rewrites exactly that partition
(idempotent): the manifest is replaced, never appended to.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
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


class ObjectStore:
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
    def put_bytes(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> str:
        result = self._retry(
            lambda: self.client.put_object(
                bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
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
        return sorted(
            o.object_name for o in self.client.list_objects(bucket, prefix=prefix, recursive=recursive)
        )

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        for key in keys:
            self.client.remove_object(bucket, key)

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

    # -- parquet ----------------------------------------------------------------------------
    def put_parquet(self, bucket: str, key: str, table: pa.Table) -> dict[str, Any]:
        data = table_to_parquet_bytes(table)
        self.put_bytes(bucket, key, data)
        return {
            "key": key,
            "rows": table.num_rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    def get_parquet(self, bucket: str, key: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.get_bytes(bucket, key)))


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# -- lake paths -------------------------------------------------------------------------------
def partition_prefix(layer: str, dataset: str, partition: str) -> str:
    if layer not in LAYERS:
        raise StorageError(f"Unknown layer {layer!r}; expected one of {LAYERS}")
    return f"{layer}/{dataset}/event_date={partition}/"


def landing_prefix(dataset: str, partition: str | None = None) -> str:
    return f"{dataset}/" if partition is None else f"{dataset}/{partition}/"


# -- commit protocol --------------------------------------------------------------------------
def publish_partition(
    store: ObjectStore,
    layer: str,
    dataset: str,
    partition: str,
    tables: list[pa.Table] | pa.Table,
    run_id: str,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Write files under a run-scoped prefix, then commit them with one manifest PUT."""
    bucket = store.settings.lake_bucket
    prefix = partition_prefix(layer, dataset, partition)
    safe_run = "".join(c if c.isalnum() or c in "-_.:+" else "_" for c in run_id)
    run_prefix = f"{prefix}run={safe_run}/"
    if isinstance(tables, pa.Table):
        tables = [tables]
    # A previous attempt of this same run may have left files: start the run prefix clean.
    store.delete_keys(bucket, store.list_keys(bucket, run_prefix))
    files = []
    for i, table in enumerate(t for t in tables if t.num_rows > 0 or len(tables) == 1):
        files.append(store.put_parquet(bucket, f"{run_prefix}part-{i:05d}.parquet", table))
    content = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    schema = tables[0].schema.names if tables else []
    manifest = Manifest(
        layer=layer,
        dataset=dataset,
        partition=partition,
        run_id=run_id,
        files=files,
        rows=sum(f["rows"] for f in files),
        content_sha256=content,
        schema=schema,
        committed_at=datetime.now(UTC).isoformat(),
        extra=extra or {},
    )
    store.put_bytes(bucket, prefix + MANIFEST_NAME, manifest.to_json(), "application/json")
    # Garbage-collect superseded and orphaned files (anything not named by the new manifest).
    live = {f["key"] for f in files} | {prefix + MANIFEST_NAME}
    store.delete_keys(bucket, [k for k in store.list_keys(bucket, prefix) if k not in live])
    return manifest


def read_manifest(store: ObjectStore, layer: str, dataset: str, partition: str) -> Manifest | None:
    key = partition_prefix(layer, dataset, partition) + MANIFEST_NAME
    if not store.exists(store.settings.lake_bucket, key):
        return None
    return Manifest.from_json(store.get_bytes(store.settings.lake_bucket, key))


def read_partition(store: ObjectStore, layer: str, dataset: str, partition: str) -> pa.Table:
    """Only committed data: the files the manifest names, nothing else under the prefix."""
    manifest = read_manifest(store, layer, dataset, partition)
    if manifest is None:
        raise StorageError(
            f"No published {layer} partition {dataset}/event_date={partition} in bucket "
            f"{store.settings.lake_bucket!r}; run the pipeline for that date first."
        )
    tables = [store.get_parquet(store.settings.lake_bucket, f["key"]) for f in manifest.files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def list_partitions(store: ObjectStore, layer: str, dataset: str) -> list[str]:
    prefix = f"{layer}/{dataset}/"
    parts = set()
    for key in store.list_keys(store.settings.lake_bucket, prefix):
        if key.endswith("/" + MANIFEST_NAME):
            segment = key[len(prefix) :].split("/")[0]
            if segment.startswith("event_date="):
                parts.add(segment.removeprefix("event_date="))
    return sorted(parts)
