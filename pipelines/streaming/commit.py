"""Micro-batches of readings committed to bronze through the lake's manifest protocol.

A micro-batch is split by event date (`split_by_event_date`, as a landed delivery is); each touched
partition gets one `PartitionWriter` with its own batch id, so the manifest PUT adds this batch and
keeps every other batch (landed deliveries, earlier micro-batches). The batch id is a digest of
the (device, seq) pairs it holds: committing the same readings again (a retry after a failed
commit) replaces its own files instead of adding a copy. Readings the ledger already holds
(redelivered after a crash between commit and acknowledgement) are left out before that.

Refused messages go to `quarantine/<dataset>.stream/` (the silver job owns `quarantine/<dataset>/`
and rewrites it whole), one batch per micro-batch, with the rule and the raw payload.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipelines import storage
from pipelines.contracts import Contract
from pipelines.layers.partitioning import partition_of, split_by_event_date
from pipelines.storage import LakeStore
from pipelines.streaming.ledger import STREAM_BATCH_PREFIX, SeqLedger
from pipelines.streaming.messages import Reading, Refusal, bronze_table, refusal_table


def refused_dataset(dataset: str) -> str:
    """Where refused messages of a dataset's stream are kept (beside silver's own quarantine)."""
    return f"{dataset}.stream"


@dataclass
class CommitResult:
    partitions: dict[str, int] = field(default_factory=dict)  # event date -> rows added
    rows: int = 0
    duplicates: int = 0  # readings bronze already held: left out
    refused: int = 0
    seconds: float = 0.0
    runs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # device -> committed seq runs
    phases: dict[str, float] = field(default_factory=dict)  # seconds: table, upload, manifest, quarantine


class BronzeCommitter:
    def __init__(self, store: LakeStore, dataset: str, contract: Contract, columns: list[str], grain: str, run_id: str):
        self.store, self.dataset, self.contract = store, dataset, contract
        self.columns, self.grain, self.run_id = columns, grain, run_id
        entity = contract.entity
        self.ledger = SeqLedger(
            store, dataset, entity.source or entity.column, entity.constant if entity.source is None else None
        )

    def already_committed(self, reading: Reading) -> bool:
        # the ledger is kept per bronze partition (a month of a month-grain dataset), as its manifests are
        return self.ledger.holds(partition_of(reading.partition, self.grain), reading.device, reading.seq)

    def commit(self, readings: list[Reading], refusals: Sequence[Refusal] = ()) -> CommitResult:
        """Commit one micro-batch; returns only once every partition's manifest names it."""
        started = time.perf_counter()
        result = CommitResult()
        fresh: dict[tuple[str, int], Reading] = {}
        for r in readings:  # one row per (device, seq): the ledger and this batch both deduplicate
            if (r.device, r.seq) in fresh or self.already_committed(r):
                result.duplicates += 1
            else:
                fresh[(r.device, r.seq)] = r
        phases = result.phases = {"table": 0.0, "upload": 0.0, "manifest": 0.0, "quarantine": 0.0}
        if refusals:
            mark = time.perf_counter()
            self._quarantine(list(refusals))
            result.refused = len(refusals)
            phases["quarantine"] += time.perf_counter() - mark
        by_partition: dict[str, list[Reading]] = defaultdict(list)
        for r in fresh.values():
            by_partition[r.partition].append(r)
        now = self.store.now()
        for partition, rows in sorted(by_partition.items()):
            rows.sort(key=lambda r: (r.device, r.seq))  # device order: silver's buckets skip row groups
            mark = time.perf_counter()
            key = batch_key(rows)
            table = bronze_table(rows, self.columns, batch_key=key, run_id=self.run_id, ingested_at=now)
            # The same split as a landed delivery: the partition is decided by the same parser.
            parts = split_by_event_date(table, self.contract, partition, self.grain)
            phases["table"] += time.perf_counter() - mark
            for event_partition, part in parts.items():
                mark = time.perf_counter()
                writer = storage.PartitionWriter(self.store, "bronze", self.dataset, event_partition, self.run_id, key)
                try:
                    writer.write(part)
                    writer.rows  # noqa: B018 - waits for the upload: its time is the upload's, not the manifest's
                    phases["upload"] += time.perf_counter() - mark
                    mark = time.perf_counter()
                    writer.commit(extra={"source": "mqtt", "batch": key, "committed_by": self.run_id})
                    phases["manifest"] += time.perf_counter() - mark
                except BaseException:
                    writer.abort()
                    raise
                result.partitions[event_partition] = result.partitions.get(event_partition, 0) + part.num_rows
            self.ledger.record(partition_of(partition, self.grain), ((r.device, r.seq) for r in rows))
            result.rows += len(rows)
        runs: dict[str, list[tuple[int, int]]] = {}
        for device, seq in sorted(fresh):
            span = runs.setdefault(device, [])
            if span and span[-1][1] == seq - 1:
                span[-1] = (span[-1][0], seq)
            else:
                span.append((seq, seq))
        result.runs = runs
        result.seconds = time.perf_counter() - started
        return result

    def _quarantine(self, refusals: list[Refusal]) -> None:
        table = refusal_table(refusals)
        day = time.strftime("%Y-%m-%d", time.gmtime(refusals[0].received_ns / 1e9))
        digest = hashlib.sha256("".join(f"{r.topic}\0{r.received_ns}\0{r.payload}" for r in refusals).encode())
        key = f"{STREAM_BATCH_PREFIX}{digest.hexdigest()[:16]}"
        writer = storage.PartitionWriter(self.store, "quarantine", refused_dataset(self.dataset), day, self.run_id, key)
        try:
            writer.write(table)
            writer.commit(extra={"source": "mqtt", "batch": key})
        except BaseException:
            writer.abort()
            raise


def batch_key(rows: list[Reading]) -> str:
    """`stream=<digest of the (device, seq) pairs>`: the same readings always get the same batch id."""
    h = hashlib.sha256("".join([f"{r.device}\0{r.seq}\n" for r in rows]).encode())
    return f"{STREAM_BATCH_PREFIX}{h.hexdigest()[:20]}"
