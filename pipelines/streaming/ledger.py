"""Which (device, seq) pairs bronze already holds, per event-date partition.

The bronze files themselves are the ledger: a streamed row carries its device and its seq
(`_source_line`), and a row is in bronze exactly when the partition's manifest names its file.
So the ledger can never disagree with the data: it is read back from the committed stream
batches of a partition the first time a reading for that partition arrives, and kept in memory
(updated after each commit) while the ingester runs. One ingester writes a dataset's stream
batches (its MQTT session id is the lock: the broker disconnects a second client with the same
id), so the in-memory copy stays true.
"""

from __future__ import annotations

import bisect
import io
import threading

import pyarrow.parquet as pq

from pipelines import storage
from pipelines.storage import LakeStore

STREAM_BATCH_PREFIX = "stream="


class SeqSet:
    """A set of non-negative ints as sorted disjoint [lo, hi] runs: a device's seqs are nearly
    contiguous, so a day of readings is a handful of runs, not millions of entries."""

    __slots__ = ("_los", "_his")

    def __init__(self) -> None:
        self._los: list[int] = []
        self._his: list[int] = []

    def __contains__(self, value: int) -> bool:
        i = bisect.bisect_right(self._los, value) - 1
        return i >= 0 and value <= self._his[i]

    def add(self, value: int) -> None:
        self.add_range(value, value)

    def add_range(self, lo: int, hi: int) -> None:
        los, his = self._los, self._his
        i = bisect.bisect_left(his, lo - 1)  # first run that ends at or after lo - 1
        j = bisect.bisect_right(los, hi + 1)  # runs [i, j) touch or overlap [lo, hi]
        if i < j:
            lo, hi = min(lo, los[i]), max(hi, his[j - 1])
        los[i:j] = [lo]
        his[i:j] = [hi]

    def runs(self) -> list[tuple[int, int]]:
        return list(zip(self._los, self._his, strict=True))

    def __len__(self) -> int:
        return sum(h - l + 1 for l, h in zip(self._los, self._his, strict=True))  # noqa: E741


class SeqLedger:
    """{partition: {device: SeqSet}} for one dataset's bronze, loaded lazily per partition."""

    def __init__(self, store: LakeStore, dataset: str, device_column: str, constant_device: str | None = None):
        """`constant_device`: the contract's one device when its rows name none (a NAB series): its
        bronze rows have no device column."""
        self.store, self.dataset, self.device_column = store, dataset, device_column
        self.constant_device = constant_device
        self._partitions: dict[str, dict[str, SeqSet]] = {}
        self._lock = threading.RLock()  # the intake thread reads while the committer records

    def partition(self, partition: str) -> dict[str, SeqSet]:
        with self._lock:
            found = self._partitions.get(partition)
            if found is None:
                found = self._partitions[partition] = self._load(partition)
            return found

    def holds(self, partition: str, device: str, seq: int) -> bool:
        with self._lock:
            seqs = self.partition(partition).get(device)
            return seqs is not None and seq in seqs

    def record(self, partition: str, pairs) -> None:
        """After a commit: these (device, seq) pairs are now in the partition."""
        with self._lock:
            devices = self.partition(partition)
            for device, seq in pairs:
                seqs = devices.get(device)
                if seqs is None:
                    seqs = devices[device] = SeqSet()
                seqs.add(seq)

    def _load(self, partition: str) -> dict[str, SeqSet]:
        manifest = storage.read_manifest(self.store, "bronze", self.dataset, partition)
        devices: dict[str, SeqSet] = {}
        if manifest is None:
            return devices
        bucket = self.store.settings.lake_bucket
        for entry in manifest.files:
            if not str(entry.get("batch", "")).startswith(STREAM_BATCH_PREFIX):
                continue  # landed deliveries carry line numbers, not seqs
            blob = self.store.get_bytes(bucket, entry["key"])
            if self.constant_device is not None:
                seqs_read = pq.read_table(io.BytesIO(blob), columns=["_source_line"]).column("_source_line").to_pylist()
                names = [self.constant_device] * len(seqs_read)
            else:
                table = pq.read_table(io.BytesIO(blob), columns=[self.device_column, "_source_line"])
                names = table.column(self.device_column).to_pylist()
                seqs_read = table.column("_source_line").to_pylist()
            for device, seq in zip(names, seqs_read, strict=True):
                seqs = devices.get(device)
                if seqs is None:
                    seqs = devices[device] = SeqSet()
                seqs.add(seq)
        return devices
