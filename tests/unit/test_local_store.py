"""LocalStore: the lake in a directory, with the object store's semantics (listing order, atomic
puts, a commit that fails leaves no manifest)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pyarrow as pa
import pytest

from pipelines import storage
from pipelines.settings import Settings
from pipelines.storage import LakeStore, LocalStore, ObjectStore


@pytest.fixture
def local(tmp_path) -> LocalStore:
    store = LocalStore(tmp_path / "data", Settings(landing_bucket="landing", lake_bucket="lake"))
    store.ensure_buckets()
    return store


def test_both_stores_implement_the_lake_store_interface(local):
    assert isinstance(local, LakeStore)  # runtime_checkable: every member, `settings` included
    methods = [name for name in dir(LakeStore) if not name.startswith("_")]
    assert "put_bytes" in methods and "open_object" in methods
    assert [m for m in methods if not callable(getattr(ObjectStore, m, None))] == []


def test_objects_round_trip_with_s3_etags(local, tmp_path):
    etag = local.put_bytes("lake", "a/b/c.bin", b"hello")
    assert etag == hashlib.md5(b"hello").hexdigest() == local.etag("lake", "a/b/c.bin")
    assert local.get_bytes("lake", "a/b/c.bin") == b"hello"
    with local.open_object("lake", "a/b/c.bin") as stream:
        assert stream.read(2) == b"he" and stream.read() == b"llo"
    assert local.exists("lake", "a/b/c.bin") and not local.exists("lake", "a/b")
    assert (tmp_path / "data" / "lake" / "a" / "b" / "c.bin").read_bytes() == b"hello"
    table = pa.table({"device": ["x", "y"], "v": [1.0, 2.0]})
    info = local.put_parquet("lake", "t/part.parquet", table)
    assert info["rows"] == 2 and info["sha256"] == hashlib.sha256(local.get_bytes("lake", "t/part.parquet")).hexdigest()
    assert local.get_parquet("lake", "t/part.parquet").equals(table)
    with pytest.raises(FileNotFoundError, match="No object 'nope' in bucket 'lake'"):
        local.get_bytes("lake", "nope")
    for bad in ("../escape", "a/../../b", "/abs", "a//b", ""):
        with pytest.raises(storage.StorageError):
            local.put_bytes("lake", bad, b"x")


def test_list_keys_is_sorted_like_s3_and_honours_string_prefixes(local):
    keys = ["b", "a/x", "a-b", "a0", "a/y/z", "event_date=2026-01-10/m", "event_date=2026-01-9/m", "ä"]
    for key in reversed(keys):
        local.put_bytes("lake", key, key.encode())
    # S3 lists by UTF-8 bytes: '-' (0x2d) < '/' (0x2f) < '0' (0x30), 'ä' after ASCII
    assert local.list_keys("lake") == [
        "a-b", "a/x", "a/y/z", "a0", "b", "event_date=2026-01-10/m", "event_date=2026-01-9/m", "ä"
    ]  # fmt: skip
    assert local.list_keys("lake", "a") == ["a-b", "a/x", "a/y/z", "a0"]
    assert local.list_keys("lake", "a/") == ["a/x", "a/y/z"]
    assert local.list_keys("lake", "event_date=2026-01-1") == ["event_date=2026-01-10/m"]
    assert local.list_keys("lake", "a/", recursive=False) == ["a/x", "a/y/"]
    assert local.list_keys("lake", "", recursive=False)[:3] == ["a-b", "a/", "a0"]
    assert local.list_keys("lake", "nothing/here/") == [] and local.list_keys("missing-bucket") == []


def test_delete_removes_objects_and_the_folders_they_leave_empty(local, tmp_path):
    local.put_bytes("lake", "p/run=1/part-0.parquet", b"1")
    local.put_bytes("lake", "p/_manifest.json", b"{}")
    local.delete_keys("lake", ["p/run=1/part-0.parquet", "p/never-existed"])  # a missing key is no error
    assert local.list_keys("lake", "p/") == ["p/_manifest.json"]
    assert not (tmp_path / "data" / "lake" / "p" / "run=1").exists()
    assert local.list_keys("lake", "", recursive=False) == ["p/"]


def test_a_put_that_fails_keeps_the_old_object_and_leaves_no_temp_file(local, monkeypatch):
    local.put_bytes("lake", "k/_manifest.json", b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        local.put_bytes("lake", "k/_manifest.json", b"new")
    monkeypatch.undo()
    assert local.get_bytes("lake", "k/_manifest.json") == b"old"
    assert os.listdir(local.root / "lake" / "k") == ["_manifest.json"]


def test_a_temp_file_of_a_dead_writer_is_never_listed(local):
    local.put_bytes("lake", "k/a", b"1")
    (local.root / "lake" / "k" / ".tmp-dead").write_bytes(b"half")
    assert local.list_keys("lake", "k/") == ["k/a"]


def test_a_failed_commit_leaves_no_manifest_and_the_previous_one_stays(local, monkeypatch):
    t = pa.table({"device": ["a", "b"], "v": [1.0, 2.0]})
    # first publish of a fresh partition fails at the manifest PUT: nothing is visible
    real_put = local.put_bytes

    def failing_manifest(bucket, key, data, *args, **kwargs):
        if key.endswith(storage.MANIFEST_NAME):
            raise OSError("crashed before the commit")
        return real_put(bucket, key, data, *args, **kwargs)

    monkeypatch.setattr(local, "put_bytes", failing_manifest)
    with pytest.raises(OSError, match="crashed before the commit"):
        storage.publish_partition(local, "silver", "probe", "2026-01-01", t, run_id="crashed")
    assert storage.read_manifest(local, "silver", "probe", "2026-01-01") is None
    assert storage.list_partitions(local, "silver", "probe") == []
    monkeypatch.undo()

    before = storage.publish_partition(local, "silver", "probe", "2026-01-01", t, run_id="ok")
    monkeypatch.setattr(local, "put_bytes", failing_manifest)
    with pytest.raises(OSError):
        storage.publish_partition(local, "silver", "probe", "2026-01-01", t.slice(0, 1), run_id="crashed-2")
    monkeypatch.undo()
    after = storage.read_manifest(local, "silver", "probe", "2026-01-01")
    assert after is not None and after.to_json() == before.to_json()
    assert storage.read_partition(local, "silver", "probe", "2026-01-01").num_rows == 2
    # a young orphan may be staged by a concurrent writer about to commit: the next commit keeps it;
    # once older than lake.gc_grace_seconds, the next successful commit collects the failed runs' orphans
    storage.publish_partition(local, "silver", "probe", "2026-01-01", t, run_id="ok-1")
    prefix = storage.partition_prefix("silver", "probe", "2026-01-01")
    assert any("crashed" in k for k in local.list_keys("lake", prefix))
    monkeypatch.setattr(storage, "gc_grace_seconds", lambda: 0.0)
    storage.publish_partition(local, "silver", "probe", "2026-01-01", t, run_id="ok-2")
    keys = local.list_keys("lake", storage.partition_prefix("silver", "probe", "2026-01-01"))
    assert not any("crashed" in k for k in keys) and any("run=ok-2" in k for k in keys)


def test_a_pinned_clock_makes_a_commit_repeatable(local):
    at = dt.datetime(2026, 1, 6, tzinfo=dt.UTC)
    local.clock = lambda: at
    t = pa.table({"device": ["a"], "v": [1.0]})
    first = storage.publish_partition(local, "gold", "probe", "2026-01-05", t, run_id="dvc-2026-01-05").to_json()
    second = storage.publish_partition(local, "gold", "probe", "2026-01-05", t, run_id="dvc-2026-01-05").to_json()
    assert first == second and b'"committed_at": "2026-01-06T00:00:00+00:00"' in first
    assert local.for_worker() is local
