"""A year of history as a new user brings it: one file, one delivery, every layer and training.

Generates a year of hourly readings of one sensor (seeded: daily and weekly cycles, noise, a few
anomalies), writes its contract into a throw-away contracts folder (no code change), starts the
embedded stack in a throw-away state directory, lands the file as ONE delivery with `platform land`
and runs `platform run --dataset` (the real DAGs through `airflow dags test`, then training).

Prints the wall time of each phase, the number of DAG tasks, and, with ``--compare-grain day``, the
same run with day partitions measured in the same process (the baseline: one silver and one gold
task per day of history). Target (issue "any dataset"): under 60 s for the month-partitioned year.

    .venv/bin/python benchmarks/history_year.py [--days 365] [--compare-grain day]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def year_csv(path: Path, days: int, seed: int = 7) -> int:
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2023-01-01", periods=days * 24, freq="h")
    hours = np.arange(len(ts))
    values = 20 + 4 * np.sin(2 * np.pi * hours / 24) + 1.5 * np.sin(2 * np.pi * hours / (24 * 7))
    values += rng.normal(0, 0.4, len(ts))
    for start in rng.choice(len(ts) - 12, size=6, replace=False):
        values[start : start + 6] += rng.choice([-8.0, 9.0])
    pd.DataFrame({"timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"), "value": values.round(3)}).to_csv(path, index=False)
    return len(ts)


def run_once(grain: str, csv: Path, folder: Path) -> dict:
    from pipelines.cli import main as platform

    name = f"year_{grain}"
    contract = {
        "name": name,
        "description": "a year of hourly office temperature (benchmark)",
        "cadence": "1h",
        "event_time": {"source": "timestamp", "source_format": "%Y-%m-%d %H:%M:%S"},
        "entity": {"constant": "office"},
        "columns": [{"name": "temp", "source": "value", "type": "float64", "unit": "celsius", "required": True}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(contract, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault("datasets", {})[name] = {"grain": grain}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    started = time.perf_counter()
    assert platform(["land", "--file", str(csv), "--dataset", name, "--date", "2026-02-01"]) == 0
    landed = time.perf_counter()
    code = platform(["run", "--dataset", name, "2026-02-01"])
    done = time.perf_counter()
    if code != 0:
        raise SystemExit(f"platform run failed for grain {grain}")
    logs = sorted((Path(os.environ["PLATFORM_STATE_DIR"]) / "logs" / "dag-runs").glob(f"{name}_*.log"))
    tasks = sum(log.read_text().count("[DAG TEST] starting task_id=") for log in logs)
    return {"grain": grain, "land_s": landed - started, "run_s": done - landed, "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--compare-grain", choices=["day"], help="also run with day partitions (slow)")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="history-bench-"))
    folder = state / "contracts"
    folder.mkdir()
    os.environ.update(
        {
            "PLATFORM_STATE_DIR": str(state),
            "PLATFORM_CONTRACTS_DIR": str(folder),
            "PLATFORM_PARAMS_FILE": str(folder / "params.yaml"),
            "AIRFLOW_HOME": str(state / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{state / 'airflow' / 'airflow.db'}",
        }
    )
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        os.environ.pop(var, None)
    from pipelines import services
    from pipelines.settings import get_settings

    services.write_stack_env(
        services.ensure_credentials(get_settings()),
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{services.free_port()}",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{services.free_port()}",
            "PLATFORM_AIRFLOW_PORT": str(services.free_port()),
        },
    )
    csv = state / "office-temperature.csv"
    rows = year_csv(csv, args.days)
    print(f"{rows:,} hourly readings over {args.days} days in one file; starting the stack in {state}", flush=True)
    results = []
    try:
        services.up(ui=False)
        os.environ.update(get_settings().client_env())
        for grain in ["month"] + ([args.compare_grain] if args.compare_grain else []):
            results.append(run_once(grain, csv, folder))
    finally:
        services.down(progress=lambda _m: None)
        shutil.rmtree(state, ignore_errors=True)
    print()
    print(
        f"{'partitions by':<16}{'land s':>8}{'DAGs s':>9}{'tasks':>7}   (land -> bronze -> silver -> gold -> training)"
    )
    for r in results:
        print(f"{r['grain']:<16}{r['land_s']:>8.1f}{r['run_s']:>9.1f}{r['tasks']:>7}")
    month = results[0]
    total = month["land_s"] + month["run_s"]
    verdict = "met" if total < 60 else "NOT met"
    print(f"\na year through every layer and training: {total:.1f} s (target < 60 s: {verdict})")


if __name__ == "__main__":
    main()
