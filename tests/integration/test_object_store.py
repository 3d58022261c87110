"""The lake on the real object store: access control, atomic publish, idempotent re-runs."""

from __future__ import annotations

import urllib.error
import urllib.request

import pyarrow as pa
import pytest

from pipelines import storage


def _anonymous(method: str, url: str) -> int:
    req = urllib.request.Request(url, method=method, data=b"x" if method == "PUT" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_anonymous_requests_are_refused(settings, store):
    store.put_bytes(settings.lake_bucket, "probe/secret.txt", b"secret")
    base = settings.s3_endpoint_url
    assert _anonymous("GET", f"{base}/") == 403
    assert _anonymous("GET", f"{base}/{settings.lake_bucket}/probe/secret.txt") == 403
    assert _anonymous("PUT", f"{base}/{settings.lake_bucket}/probe/anon.txt") == 403
    assert not store.exists(settings.lake_bucket, "probe/anon.txt")


def test_wrong_credentials_are_refused(settings):
    from minio import Minio
    from minio.error import S3Error

    host = settings.s3_endpoint_url.split("://")[1]
    bad = Minio(host, access_key="not-a-user", secret_key="not-a-secret-at-all", secure=False)
    with pytest.raises(S3Error):
        bad.list_buckets()


def test_publish_is_atomic_and_idempotent(store, settings, monkeypatch):
    t1 = pa.table({"device": ["a", "b"], "v": [1.0, 2.0]})
    m1 = storage.publish_partition(store, "silver", "probe", "2026-01-01", t1, run_id="run-1")
    # Re-running the same logical date with the same data: same content, no duplicates.
    m2 = storage.publish_partition(store, "silver", "probe", "2026-01-01", t1, run_id="run-2")
    assert m1.content_sha256 == m2.content_sha256
    assert storage.read_partition(store, "silver", "probe", "2026-01-01").num_rows == 2
    keys = store.list_keys(settings.lake_bucket, storage.partition_prefix("silver", "probe", "2026-01-01"))
    assert not any("run=run-1" in k for k in keys), "superseded files must be collected"

    # A writer killed midway: its data files exist but no manifest names them -> invisible.
    prefix = storage.partition_prefix("silver", "probe", "2026-01-01")
    store.put_parquet(
        settings.lake_bucket,
        prefix + "run=crashed/part-00000.parquet",
        pa.table({"device": ["zzz"] * 5, "v": [9.0] * 5}),
    )
    visible = storage.read_partition(store, "silver", "probe", "2026-01-01")
    assert visible.num_rows == 2 and "zzz" not in visible.column("device").to_pylist()
    # A young unreferenced file may be staged by a concurrent writer about to commit: kept. Once
    # older than lake.gc_grace_seconds, the next commit removes the orphan.
    storage.publish_partition(store, "silver", "probe", "2026-01-01", t1, run_id="run-3")
    assert any("run=crashed" in k for k in store.list_keys(settings.lake_bucket, prefix))
    monkeypatch.setattr(storage, "gc_grace_seconds", lambda: 0.0)
    storage.publish_partition(store, "silver", "probe", "2026-01-01", t1, run_id="run-4")
    keys = store.list_keys(settings.lake_bucket, prefix)
    assert not any("run=crashed" in k or "run=run-3" in k for k in keys)
    assert storage.list_partitions(store, "silver", "probe") == ["2026-01-01"]


def test_reading_an_unpublished_partition_says_what_to_do(store):
    with pytest.raises(storage.StorageError, match="run the pipeline for that date"):
        storage.read_partition(store, "gold", "probe", "1999-01-01")


def test_a_failed_background_upload_fails_the_commit_and_publishes_nothing(store, settings, monkeypatch):
    """PartitionWriter uploads in the background: an upload error must surface, never be lost."""
    t = pa.table({"device": ["a", "b"], "v": [1.0, 2.0]})
    before = storage.publish_partition(store, "silver", "probe-upload", "2026-01-02", t, run_id="ok")
    writer = storage.PartitionWriter(store, "silver", "probe-upload", "2026-01-02", "failing")
    real_put, calls = store.put_bytes, []

    def flaky_put(bucket, key, data, *args, **kwargs):
        calls.append(key)
        if len(calls) == 2:
            raise ConnectionError("store went away")
        return real_put(bucket, key, data, *args, **kwargs)

    monkeypatch.setattr(store, "put_bytes", flaky_put)
    writer.write(pa.table({"device": ["x"], "v": [3.0]}))
    writer.write(pa.table({"device": ["y"], "v": [4.0]}))  # its upload fails in the background
    assert writer.staged == 2
    with pytest.raises(ConnectionError, match="store went away"):
        writer.commit()
    monkeypatch.setattr(store, "put_bytes", real_put)
    writer.abort()
    # the published partition is still the one before, and the failed run's staged file is gone
    manifest = storage.read_manifest(store, "silver", "probe-upload", "2026-01-02")
    assert manifest.run_id == "ok" and manifest.content_sha256 == before.content_sha256
    prefix = storage.partition_prefix("silver", "probe-upload", "2026-01-02")
    assert not any("run=failing" in k for k in store.list_keys(settings.lake_bucket, prefix))
    assert storage.read_partition(store, "silver", "probe-upload", "2026-01-02").num_rows == 2
