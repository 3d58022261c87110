"""Lake throughput: landing → bronze → silver → gold on the embedded object store, beside the floor.

    python benchmarks/lake_throughput.py --rows 1000000          # 1M rows over 2 delivery days
    python benchmarks/lake_throughput.py --rows 10000000 --days 4

Prints rows/s per layer and end to end, the pipeline process's peak RSS, the second day's cost
against the first day's, and the floor measured in the same run: pyarrow reading the same raw
CSV objects and writing them as Parquet to the same store. Targets (issue 3): end to end at
least half the floor's rows/s; peak RSS under 1 GB at 10M rows; day 2 within 20% of day 1.

Each phase runs in its own process so the pipeline's peak RSS is its own (not the simulator's),
and each layer of each day runs in a process of its own, as Airflow runs each task.
It starts a throwaway object store in a temp state directory, then stops it and removes the directory.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATASET = "iot_telemetry.bench"
START = dt.date(2026, 2, 2)


def _devices_for(rows: int, days: int, freq: int) -> int:
    return max(1, round(rows / days / (86400 // freq)))


def phase_land(rows: int, days: int, freq: int) -> dict:
    from pipelines.jobs.lake import land_bytes
    from pipelines.simulator import simulate_day_csv
    from pipelines.storage import ObjectStore

    store = ObjectStore()
    devices = _devices_for(rows, days, freq)
    landed, total = [], 0
    for i in range(days):
        day = START + dt.timedelta(days=i)
        data = simulate_day_csv(day, devices=devices, freq_seconds=freq, seed=7)
        land_bytes(store, DATASET, day.isoformat(), f"telemetry-{day}.csv", data)
        n = data.count(b"\n") - 1
        total += n
        landed.append({"day": day.isoformat(), "rows": n, "mb": round(len(data) / 1e6, 1)})
        print(f"  landed {day}: {n:,} rows, {len(data) / 1e6:.0f} MB ({devices} devices)", flush=True)
        del data
    return {"devices": devices, "rows": total, "landed": landed}


def phase_floor(days: int) -> dict:
    """pyarrow alone: read each raw CSV object, write it as Parquet to the same store."""
    import io

    import pyarrow.csv as pacsv

    from pipelines.storage import ObjectStore, table_to_parquet_bytes

    store = ObjectStore()
    rows, t0 = 0, time.perf_counter()
    for i in range(days):
        day = (START + dt.timedelta(days=i)).isoformat()
        key = f"{DATASET}/{day}/telemetry-{day}.csv"
        table = pacsv.read_csv(io.BytesIO(store.get_bytes(store.settings.landing_bucket, key)))
        store.put_bytes(store.settings.lake_bucket, f"floor/{day}.parquet", table_to_parquet_bytes(table))
        rows += table.num_rows
        del table
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "peak_rss_mb": _peak_rss_mb()}


def phase_task(layer: str, day: str) -> dict:
    """One DAG task's work in its own process, as Airflow runs it: bronze for a delivery date, or
    silver / gold (+ the data_docs task) for the partitions that delivery touched."""
    from pipelines.jobs import lake

    quiet = lambda _m: None  # noqa: E731
    # One-time cost of a task process (imports, GX context), reported apart from per-row work.
    t = time.perf_counter()
    from pipelines.quality import quality_context

    quality_context()
    warmup = time.perf_counter() - t
    run_id = f"bench-{day}"
    tree = _TreeMemory()  # the task's own process plus its bucket workers
    t = time.perf_counter()
    partitions = json.loads(os.environ.get("BENCH_PARTITIONS", "[]"))
    rows, gate = 0, 0.0

    def gate_seconds(report) -> float:
        return float((report.quality.get("statistics") or {}).get("duration_seconds", 0.0))

    if layer == "bronze":
        report = lake.build_bronze(day, run_id, dataset=DATASET, progress=quiet)
        partitions, rows, gate = sorted(report.partitions), report.rows, gate_seconds(report)
    elif layer == "silver":
        for p in partitions:
            gate += gate_seconds(lake.build_silver(p, run_id, dataset=DATASET, progress=quiet))
    elif partitions == ["docs"]:
        lake.publish_docs(progress=quiet)  # the DAG's data_docs task, once per run: counted with gold
    else:
        for p in partitions:
            gate += gate_seconds(lake.build_gold(p, run_id, dataset=DATASET, progress=quiet))
    seconds = time.perf_counter() - t
    return {
        "seconds": seconds,
        "gate_s": gate,
        "warmup_s": warmup,
        "peak_rss_mb": max(_peak_rss_mb(), tree.stop()),
        "partitions": partitions,
        "rows": rows,
    }


def phase_pipeline(days: int) -> dict:
    from pipelines.jobs import lake

    per_day, peaks, warmups, gates = [], {}, [], {}
    for i in range(days):
        day = (START + dt.timedelta(days=i)).isoformat()
        timings, partitions, rows = {}, [], 0
        for layer in ("bronze", "silver", "gold"):
            # bronze: one task per delivery; silver and gold: one mapped task per partition, each in
            # its own process (as Airflow runs them); gold's partitions are planned like plan_gold's.
            jobs = [[]] if layer == "bronze" else [[p] for p in partitions]
            if layer == "gold":
                jobs = [[p] for p in lake.gold_targets(partitions, dataset=DATASET)] + [["docs"]]
            timings[layer] = 0.0
            for job in jobs:
                os.environ["BENCH_PARTITIONS"] = json.dumps(job)
                out = _child("task", "--layer", layer, "--day", day)
                timings[layer] += out["seconds"]
                gates[layer] = gates.get(layer, 0.0) + out["gate_s"]
                peaks[layer] = max(peaks.get(layer, 0.0), out["peak_rss_mb"])
                warmups.append(out["warmup_s"])
                if layer == "bronze":
                    partitions, rows = out["partitions"], out["rows"]
        per_day.append({"day": day, "rows": rows, **timings})
        print(
            f"  {day}: {rows:,} rows  "
            + "  ".join(f"{k} {v:.1f}s" for k, v in timings.items())
            + f"  (peak RSS per task so far: {', '.join(f'{k} {v:.0f} MB' for k, v in peaks.items())})",
            flush=True,
        )
    return {
        "per_day": per_day,
        "peak_rss_mb": max(peaks.values()),
        "peaks": peaks,
        "gates": gates,
        "warmup_s": sum(warmups) / len(warmups),
    }


CEILING_CODECS = ("zstd", "lz4", "none")


def phase_ceiling(days: int) -> dict:
    """The least any implementation of this lake must add to the floor, measured on this run's data.

    Bronze parses the same CSV with the same reader and writes it as Parquet to the same store: the
    floor's own work (plus lineage columns), so bronze alone costs at least the floor. Silver must
    at least store its typed rows, and gold compute the issue's features for every row and store
    them. Here only those: per
    numeric column the rolling mean, std, min and max over the window, the delta and the z-score,
    plus time of day (not this lake's flat-count and long-horizon median), with pandas' rolling
    kernels, as float32 Parquet to the same store with the cheapest of three codecs. Silver's
    typing and deduplication, quarantine, the gates and all decoding are left out, so the ceiling
    is generous: no implementation's end to end can reach it."""
    import io

    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import storage
    from pipelines.datasets import effective_params, parse_duration
    from pipelines.jobs import lake
    from pipelines.layers.gold import DeviceWindow, _diff_within, device_starts

    store = storage.ObjectStore()
    contract = lake._contract(DATASET)
    device, ts = contract.entity.column, contract.event_time.column
    configured = effective_params(DATASET)["gold"]["window"]  # a duration: in readings at this cadence
    window = configured if isinstance(configured, int) else max(1, int(parse_duration(configured) // 60))
    silver_columns = [*contract.silver_columns]
    kernel_s, rows = 0.0, 0
    gold_write = {codec: [0.0, 0] for codec in CEILING_CODECS}  # seconds, bytes
    silver_write = {codec: [0.0, 0] for codec in CEILING_CODECS}

    def store_each_codec(table: pa.Table, key: str, totals: dict) -> None:
        """Encode and store `table` with each codec (the lake's zstd, lz4, none): the cheapest one
        counts, so a codec choice cannot be what makes the ceiling low."""
        for codec in CEILING_CODECS:
            t = time.perf_counter()
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression=codec, use_dictionary=False, row_group_size=65_536)
            data = sink.getvalue().to_pybytes()
            store.put_bytes(store.settings.lake_bucket, f"ceiling/{codec}/{key}", data)
            totals[codec][0] += time.perf_counter() - t
            totals[codec][1] += len(data)

    for i in range(days):
        day = (START + dt.timedelta(days=i)).isoformat()
        files = storage.read_partition_files(store, "silver", DATASET, day)
        for n, bucket in enumerate(lake._device_buckets(files, device, None, "gold")):
            silver = storage.decode_rows(files, device, bucket).to_pandas()
            t = time.perf_counter()
            silver = silver.sort_values([device, ts], kind="stable", ignore_index=True)
            starts = device_starts(silver[device])
            numeric = [c for c in contract.numeric_columns if c in silver]
            values = silver[numeric].astype("float64")
            rolling = values.rolling(DeviceWindow(window, starts), min_periods=1)
            mean, std = rolling.mean(), rolling.std().fillna(0.0)
            features = {"mean": mean, "std": std, "min": rolling.min(), "max": rolling.max()}
            delta = np.nan_to_num(_diff_within(values.to_numpy(), starts), nan=0.0)
            features["delta"] = pd.DataFrame(delta, columns=numeric)
            features["zscore"] = ((values - mean) / std.where(std > 0)).fillna(0.0)
            columns = {f"{c}_{k}": f[c].to_numpy(dtype="float32") for k, f in features.items() for c in numeric}
            angle = 2 * np.pi * (silver[ts] - silver[ts].dt.floor("D")).dt.total_seconds().to_numpy() / 86_400
            columns |= {"hour_sin": np.sin(angle).astype("float32"), "hour_cos": np.cos(angle).astype("float32")}
            table = pa.table({device: silver[device].to_numpy(), ts: silver[ts].array, **columns})
            kernel_s += time.perf_counter() - t
            store_each_codec(table, f"gold/{day}/part-{n:05d}.parquet", gold_write)
            rows += table.num_rows
            del silver, values, features, columns, table
        # Silver must at least store its typed rows: the published silver's contract columns,
        # stored again (the typing, checks and deduplication that produced them are not counted).
        for n, blob in enumerate(files):
            typed = pq.read_table(io.BytesIO(blob), columns=silver_columns)
            store_each_codec(typed, f"silver/{day}/part-{n:05d}.parquet", silver_write)
    gold, silver = min(gold_write.items(), key=lambda kv: kv[1][0]), min(silver_write.items(), key=lambda kv: kv[1][0])
    return {
        "kernel_s": kernel_s,
        "write_s": gold[1][0],
        "codec": gold[0],
        "gold_mb": gold[1][1] / 1e6,
        "by_codec": {c: round(v[0], 2) for c, v in gold_write.items()},
        "silver_write_s": silver[1][0],
        "silver_mb": silver[1][1] / 1e6,
        "rows": rows,
    }


def _profiled(work, layer: str, day: str) -> dict:
    """Run one task's work under cProfile when --profile DIR is given (BENCH_PROFILE_DIR): one file per
    task process, for `python -m pstats` or snakeviz; the timings then include the profiler's overhead."""
    target = os.environ.get("BENCH_PROFILE_DIR")
    if not target:
        return work()
    import cProfile

    profiler = cProfile.Profile()
    result = profiler.runcall(work)
    tag = "-".join(json.loads(os.environ.get("BENCH_PARTITIONS", "[]"))) or "delivery"
    path = Path(target) / f"{day}-{layer}-{tag}.prof"
    profiler.dump_stats(path)
    print(f"  profile: {path}", flush=True)
    return result


class _TreeMemory:
    """Peak memory of this process and its children together, sampled every 100 ms: the sum of
    their proportional set sizes (PSS: pages shared by a forked worker and its parent are counted
    once, split between them), the memory the task really holds, which VmHWM of one process
    would understate once buckets run in forked workers."""

    def __init__(self) -> None:
        import threading

        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        # ~3 ms a sample (smaps_rollup, a /proc scan for children every 5th): ~3% of a core
        pids, n = [os.getpid()], 0
        while not self._stop.wait(0.1):
            if n % 5 == 0:
                pids = [os.getpid(), *_children(os.getpid())]
            n += 1
            total = 0
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
                except (OSError, StopIteration):
                    pass
            self.peak_kb = max(self.peak_kb, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def _children(pid: int) -> list[int]:
    import psutil  # an Airflow dependency

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(phase: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", phase, *args], capture_output=True, text=True)
    sys.stdout.write("".join(line + "\n" for line in out.stdout.splitlines() if not line.startswith("{")))
    if out.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{out.stderr[-4000:]}")
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=2, help="delivery days the rows are spread over")
    parser.add_argument("--freq-seconds", type=int, default=60)
    parser.add_argument("--profile", metavar="DIR", help="write a cProfile file per task process into DIR")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--layer", help=argparse.SUPPRESS)
    parser.add_argument("--day", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        result = {
            "land": lambda: phase_land(args.rows, args.days, args.freq_seconds),
            "floor": lambda: phase_floor(args.days),
            "pipeline": lambda: phase_pipeline(args.days),
            "ceiling": lambda: phase_ceiling(args.days),
            "task": lambda: _profiled(lambda: phase_task(args.layer, args.day), args.layer, args.day),
        }[args.phase]()
        print(json.dumps(result))
        return

    from benchmarks.throwaway import object_store

    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_PROFILE_DIR"] = str(Path(args.profile).resolve())

    with object_store("lake-bench-"):
        common = ["--rows", str(args.rows), "--days", str(args.days), "--freq-seconds", str(args.freq_seconds)]
        print("landing simulated telemetry:", flush=True)
        land = _child("land", *common)
        print("floor (pyarrow CSV -> Parquet, same store):", flush=True)
        floor = _child("floor", *common)
        print(
            "pipeline (bronze, silver, gold with their GX gates; each layer of each day in its own process, "
            "as Airflow runs tasks):",
            flush=True,
        )
        pipe = _child("pipeline", *common)
        print("ceiling (the least any implementation adds to the floor: typed silver, the issue's gold):", flush=True)
        ceiling = _child("ceiling", *common)

    rows = land["rows"]
    floor_rps = floor["rows"] / floor["seconds"]
    layer_s = {k: sum(d[k] for d in pipe["per_day"]) for k in ("bronze", "silver", "gold")}
    total_s = sum(layer_s.values())
    e2e_rps = rows / total_s
    day_cost = [d["bronze"] + d["silver"] + d["gold"] for d in pipe["per_day"]]
    print()
    print(f"rows {rows:,} over {args.days} delivery days ({land['devices']} devices, one reading a minute)")
    print(f"{'stage':<22}{'seconds':>10}{'rows/s':>14}{'of which GX gates':>20}")
    for layer, s in layer_s.items():
        g = pipe["gates"].get(layer, 0.0)
        print(f"{layer:<22}{s:>10.1f}{rows / s:>14,.0f}{g:>13.1f}s ({g / s:.0%})")
    print(f"{'end to end':<22}{total_s:>10.1f}{e2e_rps:>14,.0f}")
    print(f"{'floor (pyarrow)':<22}{floor['seconds']:>10.1f}{floor_rps:>14,.0f}")
    print(f"(not counted above: process warm-up, imports and GX context, {pipe['warmup_s']:.1f}s per task process)")
    print()
    target = "met" if e2e_rps >= floor_rps / 2 else "NOT met"
    print(f"end to end / floor: {e2e_rps / floor_rps:.2f} (target >= 0.50: {target})")
    # The ceiling: bronze does the floor's work, and gold must at least compute and store the
    # issue's features (see phase_ceiling): no implementation can beat floor + that.
    least_s = ceiling["silver_write_s"] + ceiling["kernel_s"] + ceiling["write_s"]
    best = floor["seconds"] / (floor["seconds"] + least_s)
    print(
        f"ceiling for any implementation: storing silver's typed rows takes {ceiling['silver_write_s']:.1f}s "
        f"({ceiling['silver_mb']:,.0f} MB); the issue's gold features alone take {ceiling['kernel_s']:.1f}s to "
        f"compute and {ceiling['write_s']:.1f}s to encode and store ({ceiling['gold_mb']:,.0f} MB as "
        f"{ceiling['codec']}; by codec {ceiling['by_codec']}); with bronze no cheaper than the floor, "
        f"end to end can reach at most {best:.2f} of the floor "
        f"(this lake: {e2e_rps / floor_rps:.2f}, {e2e_rps / floor_rps / best:.0%} of that ceiling)"
    )
    rss_target = "met" if pipe["peak_rss_mb"] < 1024 else "NOT met"
    print(
        f"pipeline peak memory of a task (RSS, or its workers' and its PSS summed): {pipe['peak_rss_mb']:.0f} MB "
        f"({', '.join(f'{k} {v:.0f}' for k, v in pipe['peaks'].items())}; target < 1024 MB at 10M rows: "
        f"{rss_target}); floor process {floor['peak_rss_mb']:.0f} MB"
    )
    if len(day_cost) >= 2:
        ratio = day_cost[1] / day_cost[0]
        print(f"day 2 cost / day 1 cost: {ratio:.2f} (target <= 1.20: {'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
