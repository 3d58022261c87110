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

from pipelines.services import _bin, airflow_env, private_dir
from pipelines.settings import get_settings

LAKEHOUSE_DAG = "iot_lakehouse"
TRAINING_DAG = "iot_training"

# Lines worth echoing from a DAG run's log: task boundaries and the platform's own progress.
_ECHO = re.compile(
    r"\[DAG TEST\] (starting|end task) task_id|^\[(land|bronze|silver|gold|train|register|gate)\]"
    r"|GX \w+ gate|QualityGateError|DagRun Finished|Task failed|\[wait\] |UP_FOR_RETRY|up_for_retry"
)


class DagRunFailed(RuntimeError):
    pass


class DagRunRefused(DagRunFailed):
    """Another run of the same DAG and delivery is in progress (its lease is in the lake)."""


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


@dataclass(frozen=True)
class DagRunRequest:
    dag_id: str
    logical_date: str | None = None
    conf: dict | None = None


_MARK = "##platform-dag-run"  # the batch process's line between two runs' output


def run_dag(
    dag_id: str,
    logical_date: str | None = None,
    conf: dict | None = None,
    progress: Callable[[str], None] = print,
    check: bool = True,
) -> DagRunResult:
    """One `airflow dags test` run."""
    return run_dags([DagRunRequest(dag_id, logical_date, conf)], progress=progress, check=check)[0]


def run_dags(
    runs: list[DagRunRequest], progress: Callable[[str], None] = print, check: bool = True
) -> list[DagRunResult]:
    """DAG runs one after another, each exactly as `airflow dags test` runs it, in one process: Airflow,
    GX, pandas and scikit-learn are imported once, not once per run (GX alone takes 6-8 s on 2 cores).
    Each run has its own log file. The first failed run ends the batch (and raises, with ``check``)."""
    settings = get_settings()
    env = {**os.environ, **settings.client_env(), **airflow_env(settings)}
    log_dir = settings.state_dir / "logs" / "dag-runs"
    private_dir(log_dir)

    def log_path(run: DagRunRequest) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
        return log_dir / f"{run.dag_id}-{(run.logical_date or 'now').replace(':', '')}-{stamp}.log"

    leases = _hold_run_leases(runs, progress)
    try:
        return _run_batch_process(runs, settings, env, log_dir, log_path, progress, check)
    finally:
        from pipelines.storage import release_all

        release_all(leases)


def _run_lease_name(run: DagRunRequest) -> str:
    conf = run.conf or {}
    which = conf.get("delivery_date") or conf.get("partition_date") or run.logical_date or "any"
    return f"runs/{run.dag_id}/{which}"


def _hold_run_leases(runs: list[DagRunRequest], progress: Callable[[str], None]) -> list:
    """One lease per DAG and delivery in the lake (not in this process's memory): the same run
    started twice at once, from two terminals or two machines, is refused at once with who holds
    it, instead of two `airflow dags test` processes racing on one DAG run in Airflow's database
    ("FOREIGN KEY constraint failed"). Runs of other deliveries go ahead; those that write the
    same event-date partition are serialised by the partitions' own leases."""
    import socket

    from pipelines.storage import Lease, LockHeld, ObjectStore, lock_settings, release_all

    store = ObjectStore()
    ttl, _ = lock_settings()
    owner = f"platform run (pid {os.getpid()} on {socket.gethostname()})"
    held: list = []
    try:
        for run in runs:
            name = _run_lease_name(run)
            if any(lease.name == name for lease in held):
                continue  # the same run twice in one batch: it runs one after the other anyway
            which = (run.conf or {}).get("delivery_date") or run.logical_date
            purpose = f"DAG {run.dag_id}" + (f" for delivery {which}" if which else "")
            try:
                held.append(Lease(store, name, owner, purpose, ttl).acquire(wait=0))
            except LockHeld as exc:
                raise DagRunRefused(str(exc)) from None
    except BaseException:
        release_all(held)
        raise
    return held


def _run_batch_process(runs, settings, env, log_dir, log_path, progress, check) -> list[DagRunResult]:
    def finished(run: DagRunRequest, path: Path, started: float, ok: bool) -> None:
        results.append(DagRunResult(run.dag_id, run.logical_date or "", ok, time.time() - started, str(path)))

    batch = [{"dag_id": r.dag_id, "logical_date": r.logical_date, "conf": r.conf} for r in runs]
    cmd = [_bin("python"), "-m", "pipelines.orchestration", json.dumps(batch)]
    results: list[DagRunResult] = []
    current: tuple[DagRunRequest, Path, float] | None = None
    log = None
    preamble: list[str] = []  # Airflow's start-up output, before the first run begins
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=str(settings.state_dir)
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith(_MARK):
                _, what, index, *outcome = line.split()
                run = runs[int(index)]
                if what == "start":
                    path = log_path(run)
                    # one file per run, closed at its end; private like every file of the state directory
                    log = os.fdopen(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "w")
                    log.writelines(preamble)  # what Airflow printed before this run began
                    preamble = []
                    current = (run, path, time.time())
                    progress(f"[airflow] dags test {run.dag_id} {run.logical_date or ''} (log: {path})")
                elif current is not None and log is not None:
                    log.close()
                    log = None
                    finished(*current, ok=outcome == ["success"])
                    current = None
                continue
            if log is None:
                preamble.append(line)
            else:
                log.write(line)
            if _ECHO.search(line) and "great_expectations" not in line:
                progress("    " + _tidy(line))
        proc.wait()
    finally:
        if log is not None:
            log.close()
    if current is not None:  # the process died inside a run
        finished(*current, ok=False)
    elif proc.returncode != 0 and len(results) < len(runs) and (not results or results[-1].succeeded):
        # it died before its next run began: what it printed is the reason
        run = runs[len(results)]
        path = log_path(run)
        path.write_text("".join(preamble))
        finished(run, path, time.time(), ok=False)
    failed = [r for r in results if not r.succeeded]
    if check and failed:
        r = failed[0]
        run = runs[results.index(r)]
        which = r.logical_date or ", ".join(f"{k} {v}" for k, v in (run.conf or {}).items()) or "a manual run"
        raise DagRunFailed(
            f"DAG {r.dag_id} failed ({which}):\n{_failure_excerpt(Path(r.log_file))}\n  task log: {r.log_file}"
        )
    return results


def _run_batch(batch: list[dict]) -> int:
    """The batch process: `airflow dags test` for each run, through Airflow's own CLI parser."""
    import sys
    import traceback

    from airflow.cli import cli_parser

    parser = cli_parser.get_parser()
    for i, run in enumerate(batch):
        argv = ["dags", "test", run["dag_id"]]
        if run.get("logical_date"):
            argv.append(run["logical_date"])
        if run.get("conf"):
            argv += ["--conf", json.dumps(run["conf"])]
        print(f"{_MARK} start {i}", flush=True)
        ok = True
        try:
            args = parser.parse_args(argv)
            args.func(args)
        except SystemExit as exc:  # the CLI's "DagRun failed"
            ok = exc.code in (0, None)
            print(f"dags test {run['dag_id']} ended: {exc}", flush=True)
        except Exception:  # noqa: BLE001 - reported in this run's log, the batch stops
            traceback.print_exc(file=sys.stdout)
            ok = False
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"{_MARK} end {i} {'success' if ok else 'failed'}", flush=True)
        if not ok:
            return 1
    return 0


def _tidy(line: str) -> str:
    line = line.rstrip()
    m = re.search(r"\[DAG TEST\] (starting|end task) task_id=(\S+)(?: map_index=(-?\d+))?", line)
    if m:
        # mapped tasks (one per partition) show their index: the run's progress through the partitions
        index = f"[{m.group(3)}]" if m.group(3) not in (None, "-1") else ""
        return f"task {m.group(2)}{index}: {'started' if m.group(1) == 'starting' else 'finished'}"
    m = re.search(r"\[wait\] .*", line)
    if m:
        return m.group(0)
    m = re.search(r"DagRun Finished: dag_id=(\S+), .*state=(\w+)", line)
    if m:
        return f"DAG run {m.group(1).rstrip(',')}: {m.group(2)}"
    return re.sub(r"^\S+Z \[\w+\s*\] ", "", line)[:300]


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Failed|Mismatch)): (.+)$")


def _failure_excerpt(log_file: Path, lines: int = 40) -> str:
    """The failed task's own error, one line: a deterministic failure carries the job's message in
    Airflow's AirflowFailException; otherwise the first exception line that is not Airflow's own
    wrapper. Falls back to the log's lines around the first traceback."""
    text = log_file.read_text(errors="replace").splitlines()
    errors = [m for line in text if (m := _EXCEPTION_LINE.match(line.strip()))]
    own = [m for m in errors if m.group(1) == "AirflowFailException"] or [
        m for m in errors if m.group(1) not in ("DagRunFailed", "AirflowException", "SystemExit")
    ]
    if own:
        message = own[0].group(2) if own[0].group(1) == "AirflowFailException" else own[0].group(0)
        return f"  {message.removesuffix(' (deterministic: not retried)')}"
    interesting = [
        i
        for i, line in enumerate(text)
        if "Task failed" in line or "Traceback" in line or "QualityGateError" in line or "Error:" in line
    ]
    if interesting:
        start = max(0, interesting[0] - 5)
        return "\n".join(text[start : start + lines])
    return "\n".join(text[-lines:])


if __name__ == "__main__":
    import sys

    sys.exit(_run_batch(json.loads(sys.argv[1])))
