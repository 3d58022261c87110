"""One lake: the layer jobs write the same partitions through the object store and through a local directory.

The DVC stages run the DAGs' jobs on a `LocalStore` (pipelines/dvc_stages.py). This lands the same
deliveries through the real object store and through a LocalStore, runs bronze, silver and gold on
both, and compares every partition of every layer.

Run ids and the clock are inputs of the jobs, not outputs: they name the files (`run=<id>/`), fill
bronze's lineage columns (`_ingest_run_id`, `_ingested_at`) and the manifests (`run_id`,
`committed_at`). Both sides get the same ones (as a DVC stage pins them), so the comparison is exact
rather than "equal up to lineage": the manifests field by field (file keys, rows, bytes, sha256,
content hash), and the decoded tables on top (so a failure shows the data that differs, not a hash).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from pipelines import storage
from pipelines.jobs import lake
from pipelines.simulator import simulate_day_csv
from pipelines.storage import LakeStore, LocalStore

DATASET = "iot_telemetry.one_lake"  # production's contract, its own lake prefix
DAY1, DAY2 = "2026-02-01", "2026-02-02"
HEADER = ["ts", "device", "co", "humidity", "light", "lpg", "motion", "smoke", "temp"]


def _epoch(day: str, minute: int) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()) + 60 * minute


def _reading(day: str, minute: int, temp: float) -> dict:
    return dict(
        zip(HEADER, [_epoch(day, minute), "device-07", 0.004, 50.0, True, 0.007, False, 0.02, temp], strict=True)
    )


def _deliveries() -> dict[str, dict[str, bytes]]:
    """Two delivery dates in every format, with late data and a record silver must quarantine."""
    sim = {
        day: simulate_day_csv(dt.date.fromisoformat(day), devices=2, freq_seconds=600, seed=7) for day in (DAY1, DAY2)
    }
    extra = [_reading(DAY1, m, 21.0 + m / 100) for m in range(0, 30)] + [_reading(DAY1, 30, 500.0)]  # out of range
    late = [_reading(DAY1, m, 22.0) for m in range(40, 50)]  # delivered a day late: joins DAY1's partition
    late_csv = (
        ",".join(HEADER)
        + "\n"
        + "".join(
            ",".join(str(r[c]).lower() if isinstance(r[c], bool) else str(r[c]) for c in HEADER) + "\n" for r in late
        )
    )
    return {
        DAY1: {"day.csv": sim[DAY1], "extra.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in extra)},
        DAY2: {"day.csv.gz": gzip.compress(sim[DAY2], mtime=0), "late.csv": late_csv.encode()},
    }


def _clock_at(date: str) -> dt.datetime:
    return dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)


def build_lake(store: LakeStore, set_clock) -> None:
    """What the lakehouse DAG does per delivery date, one date after the other."""
    quiet = lambda _msg: None  # noqa: E731
    for delivery, files in _deliveries().items():
        for name, data in files.items():
            lake.land_bytes(store, DATASET, delivery, name, data)
        set_clock(_clock_at(delivery))
        report = lake.build_bronze(delivery, f"run-{delivery}", dataset=DATASET, store=store, progress=quiet)
        for p in report.partitions:
            lake.build_silver(p, f"run-{delivery}", dataset=DATASET, store=store, progress=quiet)
        for p in lake.gold_targets(list(report.partitions), dataset=DATASET, store=store):
            lake.build_gold(p, f"run-{delivery}", dataset=DATASET, store=store, progress=quiet)


@pytest.fixture(scope="module")
def lakes(store, settings, tmp_path_factory):
    """The same deliveries through the object store and through a LocalStore, same run ids and clock."""
    clock = {"now": _clock_at(DAY1)}
    local = LocalStore(tmp_path_factory.mktemp("one-lake"), settings, clock=lambda: clock["now"])
    local.ensure_buckets()
    s3 = pytest.MonkeyPatch()
    s3.setattr(store, "now", lambda: clock["now"])  # the object store's clock, for this build only
    try:
        build_lake(store, lambda at: clock.update(now=at))
    finally:
        s3.undo()
    build_lake(local, lambda at: clock.update(now=at))
    return store, local


LAYERS = ("bronze", "silver", "quarantine", "gold")


def test_both_stores_hold_the_same_partitions(lakes):
    s3, local = lakes
    for layer in LAYERS:
        assert storage.list_partitions(s3, layer, DATASET) == [DAY1, DAY2], layer
        assert storage.list_partitions(local, layer, DATASET) == [DAY1, DAY2], layer
    # the deliveries exercised what bronze and silver add: JSON lines, late data, quarantine
    bronze = storage.read_manifest(local, "bronze", DATASET, DAY1)
    assert {f["batch"] for f in bronze.files} == {f"delivery={DAY1}", f"delivery={DAY2}"}
    assert storage.read_manifest(local, "quarantine", DATASET, DAY1).rows >= 1


@pytest.mark.parametrize("layer", LAYERS)
def test_partition_manifests_and_content_are_identical(lakes, layer):
    s3, local = lakes
    for partition in (DAY1, DAY2):
        a = storage.read_manifest(s3, layer, DATASET, partition)
        b = storage.read_manifest(local, layer, DATASET, partition)
        where = f"{layer} {partition}"
        assert a.files == b.files, where  # keys, rows, bytes and sha256 of every Parquet file
        assert (a.rows, a.schema, a.content_sha256) == (b.rows, b.schema, b.content_sha256), where
        assert (a.run_id, a.committed_at, a.extra) == (b.run_id, b.committed_at, b.extra), where
        assert a.to_json() == b.to_json(), where
        # what the sha256s stand for: the stored bytes, and what readers decode from them
        assert storage.read_partition_files(s3, layer, DATASET, partition) == storage.read_partition_files(
            local, layer, DATASET, partition
        ), where
        table_a = storage.read_partition(s3, layer, DATASET, partition)
        table_b = storage.read_partition(local, layer, DATASET, partition)
        assert table_a.equals(table_b, check_metadata=True), where


def test_training_reads_the_same_gold_from_both(lakes):
    s3, local = lakes
    frame_a, snap_a = lake.read_gold(dataset=DATASET, store=s3)
    frame_b, snap_b = lake.read_gold(dataset=DATASET, store=local)
    assert snap_a == snap_b
    pd.testing.assert_frame_equal(frame_a, frame_b)


def test_dvc_layer_stages_rebuild_the_same_bytes(tmp_path):
    """What `dvc repro` caches must not change run to run: run ids and the store's clock are pinned
    per date, so two builds of the same inputs are byte-identical (DVC outs only: the jobs' own gate
    reports under data/lake/quality/ hold durations and are not DVC outputs)."""
    import filecmp
    import shutil

    import yaml

    from pipelines import dvc_stages

    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    params["simulate"].update(devices=2, days=2, freq_seconds=900)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    builds = []
    for attempt in range(2):
        for stage in ("ingest", "bronze", "silver", "gold"):
            dvc_stages.STAGES[stage](tmp_path, progress=lambda _msg: None)
        builds.append(tmp_path / f"build-{attempt}")
        shutil.copytree(tmp_path / "data", builds[-1], ignore=shutil.ignore_patterns("quality"))
    outs = ["landing", "lake/bronze", "lake/silver", "lake/quarantine", "lake/gold"]  # dvc.yaml's outs
    for out in outs:
        first = sorted(p.relative_to(builds[0]) for p in (builds[0] / out).rglob("*") if p.is_file())
        second = sorted(p.relative_to(builds[1]) for p in (builds[1] / out).rglob("*") if p.is_file())
        assert first == second and first, out
        _, mismatch, errors = filecmp.cmpfiles(builds[0], builds[1], [str(p) for p in first], shallow=False)
        assert mismatch == errors == [], out
    assert any(p.name == "_manifest.json" for p in (builds[0] / "lake" / "gold").rglob("*"))
