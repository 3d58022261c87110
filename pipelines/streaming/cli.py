"""`platform stream`, `platform simulate --mqtt` and `platform publish`: registered on the `platform` parser."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def register_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "stream", help="ingest MQTT readings into bronze exactly once, score them online, publish alerts"
    )
    p.add_argument("--dataset", help="the dataset (default: PLATFORM_DATASET)")
    _broker_arguments(p)
    p.add_argument("--batch-readings", type=int, help="a micro-batch closes at this many messages")
    p.add_argument("--batch-seconds", type=float, help="... or this long after its first message")
    p.add_argument("--known-devices", help="comma-separated devices allowed to report (default: any)")
    p.add_argument("--no-scoring", action="store_true", help="ingest only")
    p.add_argument(
        "--role",
        choices=("all", "ingest", "scorer"),
        default="all",
        help="all (default): ingest here and score in a child process fed by this one; ingest: no scoring "
        "(scorer: that child, reading the ingester's readings on stdin)",
    )
    p.add_argument("--redis-url", help="keep the device state in Redis (default: in memory)")
    p.add_argument("--redis-password-file", type=Path)
    p.add_argument("--http-host", help="where the device state is served (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="serve the device state over HTTP on this port")
    p.add_argument("--airflow-api-url", help="send asset events for touched bronze partitions to this api-server")
    p.add_argument("--airflow-username")
    p.add_argument("--airflow-password-file", type=Path)
    p.set_defaults(func=cmd_stream)

    p = subparsers.add_parser("simulate", help="publish the simulated fleet to the MQTT broker in real time")
    p.add_argument("--mqtt", action="store_true", required=True, help="publish over MQTT (the only output)")
    p.add_argument("--dataset", help="the dataset whose topics to publish to (default: PLATFORM_DATASET)")
    p.add_argument("--rate", type=float, default=100.0, help="readings per second (default 100)")
    p.add_argument("--devices", type=int, help="fleet size (default: params.yaml simulate.devices)")
    p.add_argument("--freq-seconds", type=int, help="event time between two readings of a device")
    p.add_argument("--start-date", help="first event date (default: today minus --days)")
    p.add_argument("--days", type=int, default=1)
    p.add_argument("--limit", type=int, help="stop after this many readings")
    _broker_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = subparsers.add_parser(
        "publish",
        help="publish your own file's rows to the MQTT broker, as `platform stream` expects them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Publish each row of a file (CSV or JSON lines, gzipped or not: what `platform land --file` takes) as
one QoS 1 message on sensors/<dataset>/<device>: the file's own columns, values as delivered text,
plus seq, the device's row counter. The device is the row's entity column (the contract's), or the
contract's constant entity when the file has none.

Event times are published as they are in the file, not shifted to now: history is fine (silver
refuses only future times), and each reading is filed under its own event date.

The whole file is checked before anything is sent: a row that cannot become a message (malformed,
no device, too large) is reported with file, line and reason, and nothing is published unless
--skip-bad-rows. The command returns when the broker has acknowledged every message. Publishing the
same file again with the same --start-seq is harmless: the ingester drops (device, seq) pairs bronze
already holds; a later file for the same devices needs --start-seq past the last one printed.
Broker and credentials: PLATFORM_STREAM_MQTT_HOST/_PORT/_USERNAME/_PASSWORD(_FILE), or the flags.

exit status: 0 every row published and acknowledged; 1 rows not publishable (nothing sent), the
file unreadable, the broker unreachable or refusing messages; 2 a wrong argument.""",
    )
    p.add_argument("--dataset", help="the dataset whose contract the file follows (default: PLATFORM_DATASET)")
    p.add_argument("--file", type=Path, required=True, help="the file: .csv, .jsonl/.ndjson, optionally .gz")
    p.add_argument(
        "--rate", type=float, help="rows per second (default: as fast as the broker acknowledges, see --window)"
    )
    p.add_argument("--limit", type=int, help="publish the first N rows only")
    p.add_argument("--start-seq", type=int, default=0, help="each device's first seq (default 0)")
    p.add_argument(
        "--window", type=int, default=1000, help="messages awaiting the broker's acknowledgement at most (1000)"
    )
    p.add_argument("--skip-bad-rows", action="store_true", help="publish the other rows when some cannot be sent")
    p.add_argument("--client-id", help="MQTT client id (default: platform-publish-<dataset>-<pid>)")
    p.add_argument("--progress-seconds", type=float, default=5.0, help="a progress line this often (default 5)")
    _broker_arguments(p)
    p.set_defaults(func=cmd_publish)


def _broker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mqtt-host")
    p.add_argument("--mqtt-port", type=int)
    p.add_argument("--mqtt-username")
    p.add_argument("--mqtt-password-file", type=Path, help="a file holding the password (e.g. a mounted secret)")


def _stream_settings(args):
    from pipelines.settings import get_settings

    cfg = get_settings().stream
    names = {  # CLI flag -> StreamSettings field; a flag given wins over the environment
        "mqtt_host": "mqtt_host",
        "mqtt_port": "mqtt_port",
        "mqtt_username": "mqtt_username",
        "mqtt_password_file": "mqtt_password_file",
        "batch_readings": "batch_max_readings",
        "batch_seconds": "batch_max_seconds",
        "known_devices": "known_devices",
        "redis_url": "redis_url",
        "redis_password_file": "redis_password_file",
        "http_host": "http_host",
        "http_port": "http_port",
        "airflow_api_url": "airflow_api_url",
        "airflow_username": "airflow_username",
        "airflow_password_file": "airflow_password_file",
    }
    overrides = {field: getattr(args, flag, None) for flag, field in names.items()}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if getattr(args, "no_scoring", False):
        cfg.scoring = False
    return cfg


def cmd_stream(args: argparse.Namespace) -> int:
    """Ingest in this process; score in a child process (its own interpreter: pandas' work there
    never holds the lock the ingester's commits need). The child is restarted if it dies."""
    import subprocess

    _share_metrics_between_processes()
    from pipelines.settings import get_settings
    from pipelines.streaming.http import serve_in_thread, state_app
    from pipelines.streaming.ingester import build_ingester, build_scorer_process

    logging.basicConfig(level=os.environ.get("PLATFORM_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    dataset = args.dataset or get_settings().dataset
    cfg = _stream_settings(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = None
    if args.role == "scorer":  # the child of `platform stream`: readings arrive on stdin
        service = build_scorer_process(dataset, cfg, source=sys.stdin.buffer).start()
        # As in the ingester: while a pass holds the interpreter lock, the pipe's reader and the
        # alerts' network thread get it after 1 ms instead of 5.
        sys.setswitchinterval(0.001)
        from pipelines.runtime import settle_heap

        settle_heap()  # the libraries, model and warmed windows frozen out of the collector's walks
        if cfg.http_port:
            server = serve_in_thread(state_app(service.worker.state, service.status), cfg.http_host, cfg.http_port)
        print(f"[stream] {dataset}: scoring the ingester's readings -> alerts/{dataset}/<device>", flush=True)
        while not stop.wait(0.5) and not service.ended.is_set():
            pass
        service.stop()
        if server is not None:
            server.should_exit = True
        return 0

    from pipelines.streaming.live import ScoringPipe

    scoring = args.role == "all" and (cfg.scoring or cfg.http_port)
    pipe = ScoringPipe().start() if scoring else None
    ingester = build_ingester(dataset, cfg, score_in_process=False, scoring=pipe)
    from pipelines.runtime import settle_heap

    settle_heap()  # this process's heap: a second of readings in flight must not set off the collector
    # The interpreter lock changes hands every 1 ms instead of 5 when a thread waits for it: while
    # the committer builds a second's bronze table, the receive and intake threads (a reading's way
    # to its alert) get their turn sooner.
    sys.setswitchinterval(0.001)
    ingester.start()
    child: subprocess.Popen | None = None

    def start_scorer() -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pipelines.cli", *sys.argv[1:], "--role", "scorer"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, preexec_fn=_die_with_parent)
        pipe.attach(proc.stdin)
        return proc

    if scoring:
        child = start_scorer()  # it serves the device state (it writes it)
        _yield_to_scorer(cfg.ingest_nice)
    elif cfg.http_port:
        server = serve_in_thread(state_app(_NoState(), ingester.status, ingester.failure), cfg.http_host, cfg.http_port)
    print(
        f"[stream] {dataset}: mqtt://{cfg.mqtt_host}:{cfg.mqtt_port} sensors/{dataset}/+ -> bronze "
        f"(batches of {cfg.batch_max_readings} readings or {cfg.batch_max_seconds}s)"
        + ("; scoring in a child process" if scoring else "")
        + (f"; device state on http://{cfg.http_host}:{cfg.http_port}/devices" if cfg.http_port else ""),
        flush=True,
    )
    print(_airflow_text(dataset, cfg), flush=True)
    ingester.on_failure = stop.set  # a worker thread died: wake this loop now, stop as on SIGTERM, exit 1
    while not stop.wait(2.0) and ingester.failure() is None:
        if child is not None and child.poll() is not None:
            print(f"[stream] the scorer exited ({child.returncode}); restarting it", flush=True)
            child = start_scorer()
    failure = ingester.failure()
    if failure is not None:
        print(
            f"[stream] failed: {failure}; stopping and exiting with status 1 (a supervisor restarts the "
            "ingester; the broker redelivers what was not acknowledged)",
            file=sys.stderr,
            flush=True,
        )
    print("[stream] stopping: committing and acknowledging what was received", flush=True)
    ingester.stop()  # the last readings go to the scorer, then its pipe closes: it scores them and ends
    if child is not None:
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.terminate()
            child.wait(10)
    if server is not None:
        server.should_exit = True
    return 0 if failure is None else 1


def _airflow_text(dataset: str, cfg) -> str:
    """Whether bronze commits reach Airflow: without an api-server to tell, streamed readings stay in
    bronze (and are scored live) but no run rebuilds silver and gold for them; said at start, not
    left for the user to find in an empty silver partition."""
    from pipelines.datasets import get_dataset

    dag = get_dataset(dataset).stream_dag_id
    if cfg.airflow_api_url:
        return (
            f"[stream] {dataset}: touched bronze partitions -> Airflow asset events at {cfg.airflow_api_url} "
            f"(at most every {cfg.notify_interval_seconds:g}s), which schedule {dag} (silver and gold)"
        )
    return (
        f"[stream] {dataset}: no Airflow api-server to tell (--airflow-api-url, PLATFORM_STREAM_AIRFLOW_API_URL): "
        f"streamed readings are committed to bronze{' and scored' if cfg.scoring else ''}, but {dag} will not "
        "rebuild silver and gold for them"
    )


def _share_metrics_between_processes() -> None:
    """The ingester and its scorer process (a child: it inherits the environment) count into one
    prometheus_client multiprocess directory, so the process serving HTTP reports both on /metrics."""

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or "prometheus_client" in sys.modules:
        return  # set by the parent (or the operator); or too late: this process counts alone
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="platform-stream-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, True)


def _yield_to_scorer(nice: int) -> None:
    """The ingester's threads (and those they start) at nice +`nice`: Linux keeps a priority per
    thread, and raising one's own never needs privileges. The scorer child started before keeps 0."""
    if not nice or not hasattr(os, "setpriority"):
        return
    for task in Path("/proc/self/task").iterdir() if Path("/proc/self/task").exists() else ():
        try:
            tid = int(task.name)
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
        except (OSError, ValueError):
            pass


def _die_with_parent() -> None:
    """The scorer ends when the ingester does, even by SIGKILL (Linux: PR_SET_PDEATHSIG): a leftover
    scorer would hold the MQTT session the next one needs."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


class _NoState:
    """The state endpoint of an ingest-only process: no devices, always healthy."""

    def devices(self) -> list[str]:
        return []

    def get(self, device: str) -> None:
        return None

    def ping(self) -> bool:
        return True


def cmd_simulate(args: argparse.Namespace) -> int:
    from pipelines.settings import get_settings, load_params
    from pipelines.simulator import stream_readings
    from pipelines.streaming.publisher import FleetPublisher, publish_at_rate

    cfg = _stream_settings(args)
    params = load_params()["simulate"]
    dataset = args.dataset or get_settings().dataset
    days = args.days
    start = dt.date.fromisoformat(args.start_date) if args.start_date else dt.date.today() - dt.timedelta(days=days)
    username, password = cfg.mqtt_username, cfg.secret("mqtt_password")
    publisher = FleetPublisher(
        cfg.mqtt_host, cfg.mqtt_port, client_id=f"platform-simulator-{dataset}", username=username, password=password
    )
    readings = stream_readings(
        start,
        days,
        devices=args.devices or params["devices"],
        freq_seconds=args.freq_seconds or params["freq_seconds"],
        seed=params["seed"],
    )
    print(
        f"[simulate] publishing to mqtt://{cfg.mqtt_host}:{cfg.mqtt_port} sensors/{dataset}/<device> "
        f"at {args.rate:g} readings/s from {start}",
        flush=True,
    )
    try:
        sent = publish_at_rate(publisher, dataset, readings, args.rate, limit=args.limit)
    except KeyboardInterrupt:
        sent = -1
    finally:
        try:
            publisher.flush(timeout=60)  # what paho still queues reaches the broker before we go
        finally:
            publisher.close()
    print(f"[simulate] published {sent} readings", flush=True)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """`platform publish`: check the file, then publish it row by row and wait for every PUBACK."""
    import time

    from pipelines.contracts import load_contract
    from pipelines.datasets import DatasetError, get_dataset
    from pipelines.settings import get_settings
    from pipelines.streaming.publisher import FleetPublisher, check_file, file_messages, publish_file

    def usage(problem: str) -> int:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    path: Path = args.file
    if not path.is_file():
        return usage(f"--file {path} does not exist or is not a file")
    for flag, value, least in (("--rate", args.rate, 0), ("--limit", args.limit, 1), ("--window", args.window, 1)):
        if value is not None and (value < least or (flag == "--rate" and value == 0)):
            return usage(f"{flag} {value:g} must be {'> 0' if flag == '--rate' else f'>= {least}'}")
    if args.start_seq < 0:
        return usage(f"--start-seq {args.start_seq} must be >= 0")
    try:
        dataset = get_dataset(args.dataset or get_settings().dataset).name
    except DatasetError as exc:
        return usage(str(exc))
    contract = load_contract(get_dataset(dataset).contract_path)
    cfg = _stream_settings(args)

    def messages():
        return file_messages(path, dataset, contract, start_seq=args.start_seq)

    # The whole file first: a bad row found after half the file was sent would leave the user a
    # half-published file whose fix shifts every later seq.
    check = check_file(messages(), str(path), limit=args.limit)
    if check.skipped:
        print(f"[publish] {check.skipped} row(s) of {path} cannot become messages:", file=sys.stderr)
        for row in check.first_skipped:
            print(f"  {row}", file=sys.stderr)
        if check.skipped > len(check.first_skipped):
            print(f"  ... and {check.skipped - len(check.first_skipped)} more", file=sys.stderr)
        if not args.skip_bad_rows:
            print(
                "[publish] nothing was published: fix those rows, or pass --skip-bad-rows to publish the others",
                file=sys.stderr,
            )
            return 1
    if not check.messages:
        print(f"error: {path} has no row to publish", file=sys.stderr)
        return 1
    print(
        f"[publish] {path}: {check.messages} rows for {_devices_text(check.last_seq, args.start_seq)} -> "
        f"mqtt://{cfg.mqtt_host}:{cfg.mqtt_port} sensors/{dataset}/<device>"
        + (f" at {args.rate:g} rows/s" if args.rate else f" (at most {args.window} unacknowledged)"),
        flush=True,
    )
    publisher = FleetPublisher(
        cfg.mqtt_host,
        cfg.mqtt_port,
        client_id=args.client_id or f"platform-publish-{dataset}-{os.getpid()}",
        username=cfg.mqtt_username,
        password=cfg.secret("mqtt_password"),
        max_inflight=args.window,
        mqtt_v5=True,  # a PUBACK that says whether the broker's ACL let the message through
    )
    total = check.messages

    def progress(r) -> None:
        print(
            f"[publish] {r.published}/{total} published, {r.acknowledged} acknowledged, "
            f"{r.rate:,.0f} rows/s" + ("" if publisher.client.is_connected() else " (broker not connected)"),
            flush=True,
        )

    started = time.perf_counter()
    try:
        publisher.wait_connected(30)
        report = publish_file(
            publisher,
            messages(),
            rate=args.rate,
            window=args.window,
            limit=args.limit,
            progress=progress,
            progress_seconds=args.progress_seconds,
        )
    except (ConnectionError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if publisher.published:
            print(f"[publish] {_rerun_hint(publisher)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"[publish] interrupted: {_rerun_hint(publisher)}", file=sys.stderr)
        raise
    finally:
        publisher.close()
    if report.refused:
        print(f"[publish] the broker refused {report.refused} of {report.published} messages:", file=sys.stderr)
        for topic, reason in list(publisher.refusals.items())[:10]:
            print(f"  {topic}: {reason}", file=sys.stderr)
        print(
            "  check the broker's ACL for this user (a device's own user may publish only to its own topic)",
            file=sys.stderr,
        )
        return 1
    seconds = time.perf_counter() - started
    print(
        f"[publish] done: {report.published} rows of {path} for {_devices_text(report.last_seq, args.start_seq)}, "
        f"every one acknowledged by the broker, in {seconds:.1f}s ({report.published / seconds:,.0f} rows/s)"
        + (f"; {check.skipped} row(s) skipped" if check.skipped else "")
        + f"; a next file for these devices: --start-seq {max(report.last_seq.values()) + 1}",
        flush=True,
    )
    return 0


def _devices_text(last_seq: dict[str, int], start_seq: int) -> str:
    """'device-01 (seq 0..99)' for a few devices; a count and the widest range for a fleet."""
    if len(last_seq) <= 3:
        return ", ".join(f"{d} (seq {start_seq}..{s})" for d, s in last_seq.items())
    return f"{len(last_seq)} devices (seq {start_seq}..{max(last_seq.values())} at most)"


def _rerun_hint(publisher) -> str:
    return (
        f"{publisher.published} published, {publisher.acknowledged} acknowledged; the same command again sends "
        "the whole file, and the ingester drops the (device, seq) pairs bronze already holds"
    )
