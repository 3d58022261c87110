"""Concurrent runs, on the real object store and through `platform run` as a user starts them.

Runs that write the same event-date partition are serialised by the partition's lease in the lake;
the same delivery started twice at once is refused with who holds it; a manifest never names a
file that is not in the store, and `platform summary` checks that.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from pipelines import storage
from pipelines.jobs import lake
from tests.integration.test_bad_input import HEADER, row

REPO = Path(__file__).resolve().parents[2]
DATASET = "iot_telemetry.concurrent"
QUIET = lambda _msg: None  # noqa: E731
DAY = "2022-07-01"  # the event date both deliveries write


def _deliver_and_build(delivery: str, barrier) -> None:
    """One run in its own process: bronze for its delivery, then silver and gold of what it touched."""
    from pipelines.storage import ObjectStore

    store = ObjectStore()
    run = f"concurrent-{delivery}"
    barrier.wait(timeout=60)
    report = lake.build_bronze(delivery, run, dataset=DATASET, store=store, progress=QUIET)
    for p in report.partitions:
        lake.build_silver(p, run, dataset=DATASET, store=store, progress=QUIET)
    for p in lake.gold_targets(list(report.partitions), dataset=DATASET, store=store):
        lake.build_gold(p, run, dataset=DATASET, store=store, progress=QUIET)


def test_two_runs_writing_the_same_partition_at_once_lose_nothing(store):
    """Delivery 07-01 and delivery 07-02 (with 07-01's late readings, another device) run side by
    side: both batches end in bronze, every reading in silver, and no manifest names a missing file."""
    lake.land_bytes(store, DATASET, DAY, "a.csv", (HEADER + "".join(row(DAY, i) for i in range(300))).encode())
    late = "".join(row(DAY, i, device="device-02") for i in range(200))
    own = "".join(row("2022-07-02", i, device="device-02") for i in range(50))
    lake.land_bytes(store, DATASET, "2022-07-02", "b.csv", (HEADER + late + own).encode())
    import great_expectations  # noqa: F401 - imported once here, not in each forked run

    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    runs = [context.Process(target=_deliver_and_build, args=(d, barrier)) for d in (DAY, "2022-07-02")]
    for p in runs:
        p.start()
    for p in runs:
        p.join(timeout=300)
    assert [p.exitcode for p in runs] == [0, 0]
    bronze = storage.read_manifest(store, "bronze", DATASET, DAY)
    assert {f["batch"] for f in bronze.files} == {f"delivery={DAY}", "delivery=2022-07-02"} and bronze.rows == 500
    assert storage.read_partition(store, "silver", DATASET, DAY).num_rows == 500
    assert storage.read_partition(store, "gold", DATASET, DAY).num_rows == 500
    for layer in ("bronze", "silver", "quarantine", "gold"):
        for p in storage.list_partitions(store, layer, DATASET):
            assert storage.verify_partition(store, layer, DATASET, p) == [], (layer, p)
    assert not store.list_keys(store.settings.lake_bucket, storage.LOCK_PREFIX + DATASET), "leases left behind"


def test_a_writer_waits_for_the_partitions_lease_then_is_refused_naming_the_holder(store, monkeypatch):
    p = "2022-07-05"
    lake.land_bytes(store, DATASET, p, "c.csv", (HEADER + "".join(row(p, i) for i in range(10))).encode())
    lake.build_bronze(p, "first", dataset=DATASET, store=store, progress=QUIET)
    held = storage.Lease(store, f"{DATASET}/event_date={p}", "another-run", "silver build", 60).acquire()
    monkeypatch.setattr(storage, "lock_settings", lambda: (60.0, 1.0))  # wait 1 s, not 15 min
    said: list[str] = []
    started = time.monotonic()
    with pytest.raises(storage.LockHeld) as err:
        lake.build_silver(p, "second", dataset=DATASET, store=store, progress=said.append)
    assert time.monotonic() - started >= 1.0
    message = str(err.value)
    assert f"silver build of {DATASET} {p} is refused" in message and "held by another-run" in message, message
    assert "Wait for that run to finish" in message and any("waiting for another-run" in m for m in said), said
    assert storage.read_manifest(store, "silver", DATASET, p) is None  # nothing written meanwhile
    held.release()
    assert lake.build_silver(p, "second", dataset=DATASET, store=store, progress=QUIET).rows_out == 10
    # an expired lease (its holder crashed) is taken over, not waited for
    crashed = {"owner": "crashed-run", "purpose": "silver build", "expires_at": time.time() - 1, "pid": 1}
    key = f"{storage.LOCK_PREFIX}{DATASET}/event_date={p}.json"
    store.put_bytes(store.settings.lake_bucket, key, __import__("json").dumps(crashed).encode())
    with storage.Lease(store, f"{DATASET}/event_date={p}", "third", "silver build", 60).acquire(wait=0):
        assert b'"owner": "third"' in store.get_bytes(store.settings.lake_bucket, key)
    assert not store.exists(store.settings.lake_bucket, key)


def test_summary_verifies_that_every_file_a_manifest_names_exists(store, capsys):
    from pipelines.cli import format_summary

    p = "2022-07-06"
    lake.land_bytes(store, DATASET, p, "d.csv", (HEADER + "".join(row(p, i) for i in range(5))).encode())
    lake.build_bronze(p, "summary", dataset=DATASET, store=store, progress=QUIET)
    lake.build_silver(p, "summary", dataset=DATASET, store=store, progress=QUIET)
    (key,) = [f["key"] for f in storage.read_manifest(store, "silver", DATASET, p).files]
    assert storage.verify_partition(store, "silver", DATASET, p) == []
    store.delete_keys(store.settings.lake_bucket, [key])  # what the old collector did to a concurrent run
    assert storage.verify_partition(store, "silver", DATASET, p) == [key]
    from pipelines.cli import build_summary

    summary = build_summary(DATASET)
    assert summary["layers"]["silver"]["missing_files"] == {p: [key]}
    assert f"NOT READABLE: silver {p}: 1 file(s) its manifest names are missing (first: {key})" in format_summary(
        summary
    )
    lake.build_silver(p, "summary-again", dataset=DATASET, store=store, progress=QUIET)  # the fix it names
    assert storage.verify_partition(store, "silver", DATASET, p) == []


def test_the_same_date_started_while_it_runs_is_refused_with_a_clear_message(store, settings, capsys):
    """`platform run` holds a lease per DAG and delivery in the lake: started again while the first
    runs (here: its lease held as another terminal's run would hold it), it is refused at once,
    naming the holder, before Airflow is started (no "FOREIGN KEY constraint failed"). The real
    double start, two `platform run` processes at once, is in test_bad_input_cli.py."""
    from pipelines.cli import main
    from pipelines.datasets import get_dataset

    p = "2022-08-01"
    dag = get_dataset("iot_telemetry").lakehouse_dag_id
    other = "platform run (pid 4242 on another-terminal)"
    name = f"runs/{dag}/{p}"
    with storage.Lease(store, name, other, f"DAG {dag} for delivery {p}", 60).acquire():
        started = time.monotonic()
        assert main(["run", p, "--dataset", "iot_telemetry", "--skip-training"]) == 1
        assert time.monotonic() - started < 30  # refused at once, not after an Airflow run
    err = capsys.readouterr().err
    (refusal,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"DagRunRefused: DAG {dag} for delivery {p} is refused" in refusal, refusal
    assert f"held by {other}" in refusal and "Wait for that run to finish" in refusal, refusal
    assert "Traceback" not in err and "IntegrityError" not in err
    assert not store.exists(settings.lake_bucket, f"{storage.LOCK_PREFIX}{name}.json")  # released by its holder
