"""Run the platform's Airflow DAGs for given dates with `airflow dags test` (no scheduler needed)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines.services import _bin, airflow_env
from pipelines.settings import get_settings

LAKEHOUSE_DAG = "iot_lakehouse"
TRAINING_DAG = "iot_training"

# Lines worth echoing from a DAG run's log: task boundaries and the platform's own progress.
_ECHO = re.compile(
    r"\[DAG TEST\] (starting|end task) task_id|^\[(land|bronze|silver|gold|train|register|gate)\]"
    r"|GX \w+ gate|QualityGateError|DagRun Finished|Task failed"
)


class DagRunFailed(RuntimeError):
    pass


@dataclass
class DagRunResult:
    dag_id: str
    logical_date: str
    succeeded: bool
    seconds: float
    log_file: str


def logical_date_for_partition(partition: str) -> str:
    """A daily data-interval run for event date D is the one whose interval is [D, D+1): logical date D+1."""
    return (dt.date.fromisoformat(partition) + dt.timedelta(days=1)).isoformat()


def run_dag(
    dag_id: str,
    logical_date: str | None = None,
    conf: dict | None = None,
    progress: Callable[[str], None] = print,
    check: bool = True,
) -> DagRunResult:
    settings = get_settings()
    env = {**os.environ, **settings.client_env(), **airflow_env(settings)}
    log_dir = settings.state_dir / "logs" / "dag-runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    log_file = log_dir / f"{dag_id}-{(logical_date or 'now').replace(':', '')}-{stamp}.log"
    cmd = [_bin("airflow"), "dags", "test", dag_id]
    if logical_date:
        cmd.append(logical_date)
    if conf:
        cmd += ["--conf", json.dumps(conf)]
    progress(f"[airflow] dags test {dag_id} {logical_date or ''} (log: {log_file})")
    start = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            cwd=str(settings.state_dir),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if _ECHO.search(line) and "great_expectations" not in line:
                progress("    " + _tidy(line))
        proc.wait()
    result = DagRunResult(
        dag_id, logical_date or "", proc.returncode == 0, time.time() - start, str(log_file)
    )
    if check and not result.succeeded:
        raise DagRunFailed(
            f"DAG {dag_id} failed for {logical_date}; the task log is in {log_file}:\n"
            + _failure_excerpt(Path(log_file))
        )
    return result


def _tidy(line: str) -> str:
    line = line.rstrip()
    m = re.search(r"\[DAG TEST\] (starting|end task) task_id=(\S+)", line)
    if m:
        return f"task {m.group(2)}: {'started' if m.group(1) == 'starting' else 'finished'}"
    m = re.search(r"DagRun Finished: dag_id=(\S+), .*state=(\w+)", line)
    if m:
        return f"DAG run {m.group(1).rstrip(',')}: {m.group(2)}"
    return re.sub(r"^\S+Z \[\w+\s*\] ", "", line)[:300]


def _failure_excerpt(log_file: Path, lines: int = 40) -> str:
    text = log_file.read_text(errors="replace").splitlines()
    interesting = [
        i
        for i, line in enumerate(text)
        if "Task failed" in line or "Traceback" in line or "QualityGateError" in line or "Error:" in line
    ]
    if interesting:
        start = max(0, interesting[0] - 5)
        return "\n".join(text[start : start + lines])
    return "\n".join(text[-lines:])
