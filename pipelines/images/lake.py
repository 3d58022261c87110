"""Image layer jobs: landing -> bronze -> silver -> gold, one delivery (date) per partition.

Every layer publishes through the lake's own commit protocol (``pipelines.storage.PartitionWriter``:
files under a run prefix, one ``_manifest.json`` PUT makes them visible) and works through a
partition one Parquet file (``FILE_IMAGES`` images) at a time, so a task's memory depends on that
batch, never on the delivery.

* landing: a zip is landed as delivered; a folder is landed as zip shards of its files, stored
  (not recompressed) with fixed timestamps, so landing the same folder twice lands nothing new.
* bronze: one row per distinct image (content SHA-256), with its bytes, class (its sub-folder; none
  for files at the archive's root: unlabelled) and lineage (landed object, path inside it). An image
  delivered twice, in this delivery or an earlier one, is one image: the duplicate is counted, not stored.
* silver: decoded by ``pipelines.images.decode`` (EXIF orientation, RGB, the contract's size); files
  that are not images, truncated, corrupt, too small, too elongated or too large go to
  ``quarantine/<dataset>/event_date=<d>/`` with the rule and reason; GX gates the metadata.
* gold: pixels, a 64-bin colour histogram and a stable train/test split by content hash (an image
  is in the same split in every run, whatever was delivered beside it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.images.contract import CHANNELS, ImageContract, load_image_contract
from pipelines.images.decode import HIST_BINS, Decoded, colour_histograms, decode_image, pixel_matrix
from pipelines.storage import LakeStore, ObjectStore, PartitionWriter

Progress = Callable[[str], Any]
FILE_IMAGES = 1000  # images per Parquet file in every layer: the unit of memory of a task
SHARD_IMAGES = 2000  # images per landed zip shard of a folder
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same folder makes the same shard bytes
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}

BRONZE_SCHEMA = pa.schema(
    [
        ("content_sha256", pa.string()),
        ("label", pa.string()),
        ("source_object", pa.string()),
        ("source_path", pa.string()),
        ("byte_size", pa.int64()),
        ("delivery", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        ("image", pa.binary()),
    ]
)
SILVER_META = [
    ("content_sha256", pa.string()),
    ("label", pa.string()),
    ("source_object", pa.string()),
    ("source_path", pa.string()),
    ("delivery", pa.string()),
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("orig_mode", pa.string()),
    ("orig_format", pa.string()),
    ("exif_transposed", pa.bool_()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("channels", pa.int8()),
    ("pixel_bytes", pa.int32()),
]
SILVER_SCHEMA = pa.schema([*SILVER_META, ("pixels", pa.binary())])
QUARANTINE_SCHEMA = pa.schema(
    [
        ("content_sha256", pa.string()),
        ("label", pa.string()),
        ("source_object", pa.string()),
        ("source_path", pa.string()),
        ("delivery", pa.string()),
        ("byte_size", pa.int64()),
        ("rule", pa.string()),
        ("reason", pa.string()),
        ("fix", pa.string()),
    ]
)
GOLD_SCHEMA = pa.schema(
    [
        ("content_sha256", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("source_path", pa.string()),
        ("delivery", pa.string()),
        ("pixel_bytes", pa.int32()),
        *[(f"hist_{i:02d}", pa.float32()) for i in range(HIST_BINS**3)],
        ("pixels", pa.binary()),
    ]
)
HIST_COLUMNS = [f"hist_{i:02d}" for i in range(HIST_BINS**3)]


class ImageDeliveryError(ValueError):
    """A delivery cannot be landed or read (the message names the file and the fix)."""


def _store(store: LakeStore | None) -> LakeStore:
    return store or ObjectStore()


# -- landing ------------------------------------------------------------------------------------
def _folder_files(root: Path) -> list[Path]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.parts[len(root.parts) :])
    )
    if not files:
        raise ImageDeliveryError(f"{root} holds no files: deliver one sub-folder of images per class")
    return files


def _shards(root: Path, files: list[Path], shard_images: int) -> Iterator[tuple[str, bytes]]:
    for start in range(0, len(files), shard_images):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for path in files[start : start + shard_images]:
                info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=_ZIP_TIME)
                zf.writestr(info, path.read_bytes())
        yield f"{root.name or 'images'}-{start // shard_images:05d}.zip", buf.getvalue()


def land_images(
    source: Path | str,
    dataset: str,
    delivery: str | None = None,
    *,
    store: LakeStore | None = None,
    shard_images: int = SHARD_IMAGES,
    progress: Progress = print,
) -> list[str]:
    """Land a folder (one sub-folder per class) or a zip under ``landing/<dataset>/<delivery>/``."""
    from pipelines.jobs.lake import land_bytes

    load_image_contract(dataset)  # an unknown dataset fails before anything lands
    store = _store(store)
    delivery = delivery or dt.datetime.now(dt.UTC).date().isoformat()
    source = Path(source)
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise ImageDeliveryError(f"{source} is not a zip: deliver a folder or a .zip of class sub-folders")
        objects = [(source.name, source.read_bytes())]
    elif source.is_dir():
        objects = _shards(source, _folder_files(source), shard_images)
    else:
        raise ImageDeliveryError(f"{source} does not exist: give a folder or a .zip of class sub-folders")
    store.ensure_buckets(store.settings.landing_bucket, store.settings.lake_bucket)
    keys = []
    for name, data in objects:
        keys.append(land_bytes(store, dataset, delivery, name, data))
        progress(f"[land] s3://{store.settings.landing_bucket}/{keys[-1]} ({len(data) / 1e6:.1f} MB)")
    return keys


# -- bronze -------------------------------------------------------------------------------------
def _entry_label(parts: list[str], common_root: str | None) -> tuple[str | None, str]:
    if common_root is not None:
        parts = parts[1:]
    return (parts[0] if len(parts) >= 2 else None), "/".join(parts)


def _archive_entries(zf: zipfile.ZipFile) -> tuple[list[zipfile.ZipInfo], str | None]:
    """The files of an archive (no folders, no macOS metadata) and a single top folder wrapping
    the class folders, if there is one (``fruits/apple/1.jpg``: the class is ``apple``)."""
    entries = [
        i
        for i in zf.infolist()
        if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not Path(i.filename).name.startswith(".")
    ]
    tops = {i.filename.split("/")[0] for i in entries}
    deep = all(i.filename.count("/") >= 2 for i in entries)
    return sorted(entries, key=lambda i: i.filename), (next(iter(tops)) if len(tops) == 1 and deep else None)


def known_hashes(store: LakeStore, dataset: str, but: str | None = None) -> set[str]:
    """Content hashes already in bronze, in every partition except ``but``."""
    seen: set[str] = set()
    for partition in storage.list_partitions(store, "bronze", dataset):
        if partition == but:
            continue
        for f in storage.read_manifest(store, "bronze", dataset, partition).files:
            blob = store.get_bytes(store.settings.lake_bucket, f["key"])
            seen.update(pq.read_table(io.BytesIO(blob), columns=["content_sha256"]).column(0).to_pylist())
    return seen


def build_image_bronze(
    delivery: str, run_id: str, *, dataset: str, store: LakeStore | None = None, progress: Progress = print
) -> dict[str, Any]:
    store = _store(store)
    bucket = store.settings.landing_bucket
    objects = [k for k in store.list_keys(bucket, storage.landing_prefix(dataset, delivery)) if k.endswith(".zip")]
    if not objects:
        raise ImageDeliveryError(
            f"nothing landed under s3://{bucket}/{storage.landing_prefix(dataset, delivery)}: "
            f"`platform land --images DIR --dataset {dataset} --date {delivery}` first"
        )
    seen = known_hashes(store, dataset, but=delivery)
    earlier = len(seen)
    writer = PartitionWriter(store, "bronze", dataset, delivery, run_id)
    rows: list[dict] = []
    ingested_at = store.now()
    files = duplicates = labels_conflicting = 0
    labels: dict[str, str | None] = {}
    try:
        for key in objects:
            with zipfile.ZipFile(io.BytesIO(store.get_bytes(bucket, key))) as zf:
                entries, common_root = _archive_entries(zf)
                for info in entries:
                    data = zf.read(info)
                    files += 1
                    digest = hashlib.sha256(data).hexdigest()
                    label, path = _entry_label(info.filename.split("/"), common_root)
                    if digest in seen:
                        duplicates += 1
                        labels_conflicting += int(digest in labels and labels[digest] != label)
                        continue
                    seen.add(digest)
                    labels[digest] = label
                    rows.append(
                        {
                            "content_sha256": digest,
                            "label": label,
                            "source_object": key,
                            "source_path": path,
                            "byte_size": len(data),
                            "delivery": delivery,
                            "ingested_at": ingested_at,
                            "image": data,
                        }
                    )
                    if len(rows) >= FILE_IMAGES:
                        writer.write(pa.Table.from_pylist(rows, schema=BRONZE_SCHEMA))
                        rows = []
        if rows or not writer.staged:
            writer.write(pa.Table.from_pylist(rows, schema=BRONZE_SCHEMA))
        report = {
            "layer": "bronze",
            "dataset": dataset,
            "partition": delivery,
            "files": files,
            "images": writer.rows,
            "duplicates": duplicates,
            "duplicates_with_another_label": labels_conflicting,
            "landed_objects": objects,
            "earlier_images": earlier,
        }
        manifest = writer.commit({"report": report})
    except BaseException:
        writer.abort()
        raise
    progress(
        f"[bronze] {dataset} {delivery}: {files} files -> {manifest.rows} images "
        f"({duplicates} duplicates of an image already delivered, {labels_conflicting} of them under another class)"
    )
    return {**report, "content_sha256": manifest.content_sha256}


# -- silver -------------------------------------------------------------------------------------
def partition_tables(
    store: LakeStore, layer: str, dataset: str, partition: str, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """A committed partition, one file at a time (only the files its manifest names)."""
    manifest = storage.read_manifest(store, layer, dataset, partition)
    if manifest is None:
        raise storage.StorageError(
            f"no published {layer} partition {dataset}/event_date={partition}: build {layer} for it first"
        )
    for f in manifest.files:
        yield pq.read_table(io.BytesIO(store.get_bytes(store.settings.lake_bucket, f["key"])), columns=columns)


def to_silver(bronze: pa.Table, contract: ImageContract) -> tuple[pa.Table, pa.Table]:
    """(silver rows, quarantine rows) of one bronze table: pure, no I/O."""
    good: list[dict] = []
    bad: list[dict] = []
    for row in bronze.to_pylist():
        image = row.pop("image")
        result = decode_image(
            image,
            contract.width,
            contract.height,
            min_width=contract.min_width,
            min_height=contract.min_height,
            max_aspect_ratio=contract.max_aspect_ratio,
            max_bytes=contract.max_bytes,
        )
        lineage = {k: row[k] for k in ("content_sha256", "label", "source_object", "source_path", "delivery")}
        if isinstance(result, Decoded):
            good.append(
                {
                    **lineage,
                    "orig_width": result.orig_width,
                    "orig_height": result.orig_height,
                    "orig_mode": result.orig_mode,
                    "orig_format": result.orig_format,
                    "exif_transposed": result.exif_transposed,
                    "width": contract.width,
                    "height": contract.height,
                    "channels": CHANNELS,
                    "pixel_bytes": len(result.pixels),
                    "pixels": result.pixels,
                }
            )
        else:
            bad.append(
                {
                    **lineage,
                    "byte_size": row["byte_size"],
                    "rule": result.rule,
                    "reason": result.reason,
                    "fix": result.fix,
                }
            )
    return pa.Table.from_pylist(good, schema=SILVER_SCHEMA), pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA)


def _gate(
    meta: pd.DataFrame, suite, layer: str, dataset: str, partition: str, store: LakeStore, progress: Progress
) -> dict:
    from pipelines.images.quality import validate_images
    from pipelines.jobs.lake import _put_quality
    from pipelines.quality import enforce

    result = validate_images(meta, suite, layer, dataset, partition)
    progress(result.summary())
    _put_quality(store, layer, dataset, partition, result.to_dict())  # failures too: browsable
    enforce(result)
    return result.to_dict()


def build_image_silver(
    partition: str,
    run_id: str,
    *,
    dataset: str,
    store: LakeStore | None = None,
    contract: ImageContract | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    from pipelines.images.quality import silver_suite, with_class_share

    store = _store(store)
    contract = contract or load_image_contract(dataset)
    writer = PartitionWriter(store, "silver", dataset, partition, run_id)
    quarantined: list[pa.Table] = []
    metas: list[pd.DataFrame] = []
    rows_in = 0
    try:
        for bronze in partition_tables(store, "bronze", dataset, partition):
            rows_in += bronze.num_rows
            silver, bad = to_silver(bronze, contract)
            writer.write(silver)
            metas.append(silver.drop_columns(["pixels"]).to_pandas())
            if bad.num_rows:
                quarantined.append(bad)
        meta = with_class_share(pd.concat(metas, ignore_index=True))
        quality = _gate(meta, silver_suite(contract, dataset, meta), "silver", dataset, partition, store, progress)
        bad_all = pa.concat_tables(quarantined) if quarantined else QUARANTINE_SCHEMA.empty_table()
        rules: dict[str, int] = {}
        for rule in bad_all.column("rule").to_pylist():
            rules[rule] = rules.get(rule, 0) + 1
        report = {
            "layer": "silver",
            "dataset": dataset,
            "partition": partition,
            "rows_in": rows_in,
            "rows_out": writer.rows,
            "quarantined": rules,
            "classes": {str(k): int(v) for k, v in meta["label"].value_counts(dropna=False).items()},
            "quality_success": quality["success"],
        }
        manifest = writer.commit({"report": report, "contract": contract.model_dump()})
    except BaseException:
        writer.abort()
        raise
    # a re-run with nothing to quarantine still replaces an earlier run's quarantine partition
    if bad_all.num_rows or storage.read_manifest(store, "quarantine", dataset, partition) is not None:
        storage.publish_partition(store, "quarantine", dataset, partition, bad_all, run_id)
    progress(
        f"[silver] {dataset} {partition}: {rows_in} images -> {manifest.rows} decoded at "
        f"{contract.width}x{contract.height}, {sum(rules.values())} quarantined {rules or ''}"
    )
    return report


# -- gold ---------------------------------------------------------------------------------------
def split_of(content_sha256: str, test_fraction: float) -> str:
    """``test`` for a stable ``test_fraction`` of images, by content hash: the same image is in the
    same split in every run, and a duplicate (one image) cannot be in both."""
    return "test" if int(content_sha256[:8], 16) / 0xFFFFFFFF < test_fraction else "train"


def to_gold(silver: pa.Table, contract: ImageContract) -> pa.Table:
    """Gold rows of one silver table: pure, no I/O."""
    matrix = pixel_matrix(silver.column("pixels").to_pylist(), contract.pixels)
    hist = colour_histograms(matrix)
    hashes = silver.column("content_sha256").to_pylist()
    return pa.table(
        {
            "content_sha256": hashes,
            "label": silver.column("label"),
            "split": [split_of(h, contract.train.test_fraction) for h in hashes],
            "source_path": silver.column("source_path"),
            "delivery": silver.column("delivery"),
            "pixel_bytes": silver.column("pixel_bytes"),
            **{name: hist[:, i] for i, name in enumerate(HIST_COLUMNS)},
            "pixels": silver.column("pixels"),
        },
        schema=GOLD_SCHEMA,
    )


def build_image_gold(
    partition: str,
    run_id: str,
    *,
    dataset: str,
    store: LakeStore | None = None,
    contract: ImageContract | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    from pipelines.images.quality import HIST_SUM, gold_suite

    store = _store(store)
    contract = contract or load_image_contract(dataset)
    writer = PartitionWriter(store, "gold", dataset, partition, run_id)
    metas = []
    try:
        for silver in partition_tables(store, "silver", dataset, partition):
            gold = to_gold(silver, contract)
            writer.write(gold)
            hist_sum = np.column_stack([gold.column(c).to_numpy() for c in HIST_COLUMNS]).sum(axis=1)
            metas.append(
                gold.select(["content_sha256", "label", "split", "pixel_bytes"])
                .to_pandas()
                .assign(**{HIST_SUM: hist_sum})
            )
        meta = pd.concat(metas, ignore_index=True)
        quality = _gate(meta, gold_suite(contract, dataset), "gold", dataset, partition, store, progress)
        splits = {str(k): int(v) for k, v in meta["split"].value_counts().items()}
        report = {
            "layer": "gold",
            "dataset": dataset,
            "partition": partition,
            "rows_out": writer.rows,
            "splits": splits,
            "quality_success": quality["success"],
        }
        manifest = writer.commit({"report": report})
    except BaseException:
        writer.abort()
        raise
    train, test = splits.get("train", 0), splits.get("test", 0)
    progress(f"[gold] {dataset} {partition}: {manifest.rows} images (train {train}, test {test})")
    return {**report, "content_sha256": manifest.content_sha256}


# -- reading gold for training --------------------------------------------------------------------
def gold_snapshot(store: LakeStore, dataset: str, partitions: list[str] | None = None) -> dict[str, Any]:
    """The gold partitions a model reads, each with its manifest's content hash (lineage)."""
    available = storage.list_partitions(store, "gold", dataset)
    parts = sorted(partitions or available)
    missing = sorted(set(parts) - set(available))
    if missing or not parts:
        raise storage.StorageError(
            f"no published gold partition {missing or ''} of image dataset {dataset}: run its layers first "
            f"(published: {available})"
        )
    manifests = {p: storage.read_manifest(store, "gold", dataset, p) for p in parts}
    return {
        "dataset": dataset,
        "partitions": parts,
        "manifests": {
            p: {"content_sha256": m.content_sha256, "rows": m.rows, "run_id": m.run_id} for p, m in manifests.items()
        },
    }


def iter_gold(
    store: LakeStore, snapshot: dict[str, Any], split: str, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """Gold rows of one split, one file at a time, in a fixed order (partitions, then files). Only
    ``columns`` are decoded: counting labels does not decompress pixels."""
    import pyarrow.compute as pc

    wanted = None if columns is None else sorted({*columns, "split"})
    for partition in snapshot["partitions"]:
        for table in partition_tables(store, "gold", snapshot["dataset"], partition, columns=wanted):
            part = table.filter(pc.equal(table.column("split"), split))
            if part.num_rows:
                yield part.select(columns) if columns else part
