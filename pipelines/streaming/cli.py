"""`platform stream` and `platform simulate --mqtt`: registered on the `platform` parser."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
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
    import sys

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
        server = serve_in_thread(state_app(_NoState(), ingester.status), cfg.http_host, cfg.http_port)
    print(
        f"[stream] {dataset}: mqtt://{cfg.mqtt_host}:{cfg.mqtt_port} sensors/{dataset}/+ -> bronze "
        f"(batches of {cfg.batch_max_readings} readings or {cfg.batch_max_seconds}s)"
        + ("; scoring in a child process" if scoring else "")
        + (f"; device state on http://{cfg.http_host}:{cfg.http_port}/devices" if cfg.http_port else ""),
        flush=True,
    )
    while not stop.wait(2.0):
        if child is not None and child.poll() is not None:
            print(f"[stream] the scorer exited ({child.returncode}); restarting it", flush=True)
            child = start_scorer()
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
    return 0


def _share_metrics_between_processes() -> None:
    """The ingester and its scorer process (a child: it inherits the environment) count into one
    prometheus_client multiprocess directory, so the process serving HTTP reports both on /metrics."""
    import sys

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
