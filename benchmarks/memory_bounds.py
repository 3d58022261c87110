"""Memory bounded by configuration, not by input: peak RSS of `platform land` and of training's gold read.

    python benchmarks/memory_bounds.py                       # ~1 GB file, 5M gold rows
    python benchmarks/memory_bounds.py --gb 0.3 --gold-rows 1000000 --skip-unbounded

Measures, each in its own process (peak RSS = the process's VmHWM):
  * land: `land_file` (what `platform land --file` runs: streamed, one `lake.land_part_mb` part in
    memory) of a generated ~1 GB CSV into the object store, beside the whole-file read it replaced
    (`land_bytes(path.read_bytes())`, measured in the same run) and the issue's 1.26 GB;
  * training's read of gold: `read_gold` + the time split training does before fitting, with the
    configured bound (`train.sample.max_rows`), beside the unbounded read of every partition (what
    it did before, measured in the same run) and the issue's 4.8 GB for 5M rows. Fitting itself
    works on the frame read, so its memory follows the same bound.
It starts a throwaway object store in a temp state directory, then stops it and removes the directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATASET = "iot_telemetry.memory_bench"
ISSUE_LAND_GB = 1.26  # issue 18: `land` of a 1.1 GB file
ISSUE_TRAIN_GB = 4.8  # issue 18: read_gold of 5M gold rows


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- phases (each in its own process) ------------------------------------------------------------
def phase_land(path: str, how: str) -> dict:
    from pipelines.jobs.lake import land_bytes, land_file
    from pipelines.storage import ObjectStore

    store = ObjectStore()
    base = _rss_mb()
    started = time.time()
    dataset = f"{DATASET}.land"  # not the gold's delivery: bronze must not read these
    if how == "streamed":
        key = land_file(store, dataset, "2026-03-01", path, name=f"{how}.csv")
    else:
        key = land_bytes(store, dataset, "2026-03-01", f"{how}.csv", Path(path).read_bytes())
    return {"key": key, "seconds": time.time() - started, "peak_rss_mb": _peak_rss_mb(), "start_rss_mb": base}


def phase_gold(max_rows: int | None) -> dict:
    from pipelines.jobs.lake import read_gold
    from pipelines.settings import load_params
    from pipelines.training import split_by_time

    base = _rss_mb()
    started = time.time()
    frame, snapshot = read_gold(dataset=DATASET, max_rows=max_rows)
    train_df, test_df = split_by_time(frame, float(load_params()["train"]["test_fraction"]))
    return {
        "rows": len(frame),
        "train_rows": len(train_df),
        "test_rows": len(test_df),
        "sample": snapshot["sample"],
        "seconds": time.time() - started,
        "peak_rss_mb": _peak_rss_mb(),
        "start_rss_mb": base,
    }


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"phase {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- set-up --------------------------------------------------------------------------------------
def write_big_csv(path: Path, gigabytes: float) -> int:
    from pipelines.simulator import simulate_day_csv

    block = simulate_day_csv(dt.date(2026, 3, 1), devices=20, freq_seconds=60, seed=7)
    header, body = block.split(b"\n", 1)
    target, written = int(gigabytes * 1e9), 0
    with open(path, "wb") as f:
        f.write(header + b"\n")
        while written < target:
            f.write(body)
            written += len(body)
    return path.stat().st_size


def build_large_gold(rows: int, progress=print) -> int:
    """One real gold day (simulated, through bronze, silver and gold), its file then published again
    under as many event dates as make `rows`: what read_gold reads is real gold, at scale."""
    from pipelines import storage
    from pipelines.jobs import lake
    from pipelines.simulator import simulate_day_csv
    from pipelines.storage import Manifest, ObjectStore

    store = ObjectStore()
    day = dt.date(2026, 3, 1)
    lake.land_bytes(store, DATASET, day.isoformat(), "gold-seed.csv", simulate_day_csv(day, 40, 60, 7))
    quiet = lambda _m: None  # noqa: E731
    lake.build_bronze(day.isoformat(), "seed", dataset=DATASET, store=store, progress=quiet)
    lake.build_silver(day.isoformat(), "seed", dataset=DATASET, store=store, progress=quiet)
    lake.build_gold(day.isoformat(), "seed", dataset=DATASET, store=store, progress=quiet)
    seed = storage.read_manifest(store, "gold", DATASET, day.isoformat())
    blobs = storage.read_partition_files(store, "gold", DATASET, day.isoformat())
    copies = max(1, -(-rows // seed.rows))
    bucket = store.settings.lake_bucket
    for i in range(1, copies):
        partition = (day + dt.timedelta(days=i)).isoformat()
        prefix = storage.partition_prefix("gold", DATASET, partition)
        files = []
        for n, (blob, entry) in enumerate(zip(blobs, seed.files, strict=True)):
            key = f"{prefix}run=copy/part-{n:05d}.parquet"
            store.put_bytes(bucket, key, blob)
            files.append({**entry, "key": key})
        manifest = Manifest(**{**seed.__dict__, "partition": partition, "run_id": "copy", "files": files})
        store.put_bytes(bucket, prefix + storage.MANIFEST_NAME, manifest.to_json(), "application/json")
        if i % 20 == 0:
            progress(f"  {i + 1} of {copies} gold partitions ({(i + 1) * seed.rows:,} rows)", flush=True)
    return copies * seed.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the generated file to land")
    parser.add_argument("--gold-rows", type=int, default=5_000_000)
    parser.add_argument("--skip-unbounded", action="store_true", help="do not measure the old, unbounded ways")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        kind, *rest = args.phase
        if kind == "land":
            result = phase_land(rest[0], rest[1])
        else:
            result = phase_gold(None if rest[0] == "configured" else int(rest[0]))
        print(json.dumps(result, default=str))
        return

    from benchmarks.throwaway import object_store
    from pipelines.settings import load_params

    results: dict = {}
    with object_store("memory-bench-") as state:
        big = state / "big.csv"
        size = write_big_csv(big, args.gb)
        print(f"landing a generated {size / 1e9:.2f} GB CSV:", flush=True)
        results["land_streamed"] = _child("land", str(big), "streamed")
        if not args.skip_unbounded:
            results["land_whole"] = _child("land", str(big), "whole")
        big.unlink()
        print(f"building {args.gold_rows:,} gold rows (one real gold day, published again per date):", flush=True)
        gold_rows = build_large_gold(args.gold_rows)
        results["gold_bounded"] = _child("gold", "configured")
        if not args.skip_unbounded:
            results["gold_unbounded"] = _child("gold", "0")

    part_mb = float((load_params().get("lake") or {}).get("land_part_mb", 16))
    sample = load_params()["train"].get("sample") or {}
    gb = 1024
    print()
    print(f"{'':52}{'peak RSS':>12}{'seconds':>10}   baseline")
    streamed = results["land_streamed"]
    print(
        f"{f'land {size / 1e9:.2f} GB, streamed ({part_mb:g} MB parts)':52}"
        f"{streamed['peak_rss_mb'] / gb:>10.2f} GB{streamed['seconds']:>10.1f}   issue: {ISSUE_LAND_GB} GB for 1.1 GB"
    )
    if "land_whole" in results:
        whole = results["land_whole"]
        print(
            f"{'land, whole file read (before), same run':52}{whole['peak_rss_mb'] / gb:>10.2f} GB"
            f"{whole['seconds']:>10.1f}"
        )
    bounded = results["gold_bounded"]
    bound = bounded["sample"]["max_rows"]
    print(
        f"{f'training read, {gold_rows:,} gold rows, bound {bound:,}':52}"
        f"{bounded['peak_rss_mb'] / gb:>10.2f} GB{bounded['seconds']:>10.1f}   issue: {ISSUE_TRAIN_GB} GB for 5M rows"
    )
    if "gold_unbounded" in results:
        unbounded = results["gold_unbounded"]
        print(
            f"{'training read, every partition (before)':52}{unbounded['peak_rss_mb'] / gb:>10.2f} GB"
            f"{unbounded['seconds']:>10.1f}"
        )
    print(
        f"\nsample rule {sample.get('rule')}: read {bounded['rows']:,} of {bounded['sample']['rows_available']:,} "
        f"rows ({len(bounded['sample']['partitions_left_out'])} oldest partitions left out); "
        "the rule and the counts are in the training run's gold_snapshot"
    )
    print(json.dumps({"size_bytes": size, "gold_rows": gold_rows, **results}, default=str))


if __name__ == "__main__":
    main()
