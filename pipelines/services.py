"""The embedded stack: start, stop and inspect the object store, MLflow and Airflow as local processes.

Everything binds to 127.0.0.1. Each process runs in its own session with its PID in
<state>/pids/, logs in <state>/logs/, so `platform down` stops exactly what `platform up`
started and nothing else. `platform up` writes <state>/stack.env (generated credentials,
chosen ports) which pipelines.settings reads, so any later process finds the stack.

With AIRFLOW__CORE__EXECUTOR=CeleryExecutor (broker and result backend in the standard
AIRFLOW__CELERY__BROKER_URL / AIRFLOW__CELERY__RESULT_BACKEND), `platform up --workers N` also
starts N Celery workers, `airflow-celery-worker-<i>`, the same way: the scale-out shape of
docker-compose.yml on one machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipelines.settings import REPO_ROOT, Settings, get_settings, read_env_file

VENV_BIN = Path(sys.executable).parent


def _bin(name: str) -> str:
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


# -- ports ------------------------------------------------------------------------------------
def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(preferred: int | None = None) -> int:
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int, offset_also: int = 10000) -> int:
    """A base port with `count` consecutive free ports, and free at +offset too (weed's gRPC ports)."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(20000, 29000)
        ports = [base + i for i in range(count)] + [base + offset_also + i for i in range(count)]
        if all(port_is_free(p) for p in ports):
            return base
    raise RuntimeError("Could not find free loopback ports for the object store")


# -- process bookkeeping -----------------------------------------------------------------------
@dataclass
class Service:
    name: str
    url: str
    health_url: str | None


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.pid"


def _read_pid(settings: Settings, name: str) -> int | None:
    path = _pid_file(settings, name)
    if not path.exists():
        return None
    try:
        pid = int(path.read_text().strip())
    except ValueError:
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _spawn(settings: Settings, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    existing = _read_pid(settings, name)
    if existing:
        return existing
    (settings.state_dir / "logs").mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "pids").mkdir(parents=True, exist_ok=True)
    log = open(settings.state_dir / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        cwd=str(cwd or settings.state_dir),
        start_new_session=True,  # own process group: `down` stops it and its children
    )
    _pid_file(settings, name).write_text(str(proc.pid))
    return proc.pid


def _stop(settings: Settings, name: str, timeout: float = 20) -> bool:
    pid = _read_pid(settings, name)
    _pid_file(settings, name).unlink(missing_ok=True)
    if not pid:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                return True
            time.sleep(0.2)
    return True


def _wait_http(url: str, timeout: float, name: str, settings: Settings, ok=(200,)) -> None:
    deadline = time.time() + timeout
    last: object = None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
            last = e
        except Exception as e:  # noqa: BLE001 - still starting
            last = e
        if not _read_pid(settings, name):
            break
        time.sleep(0.5)
    log = settings.state_dir / "logs" / f"{name}.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{name} did not become healthy at {url} ({last}). Last log lines ({log}):\n{tail}")


# -- stack.env --------------------------------------------------------------------------------
def stack_env_path(settings: Settings) -> Path:
    return settings.state_dir / "stack.env"


def write_stack_env(settings: Settings, values: dict[str, str]) -> None:
    path = stack_env_path(settings)
    current = read_env_file(path)
    current.update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# written by `platform up`: generated credentials and ports of the embedded stack\n"
        + "".join(f"{k}={v}\n" for k, v in sorted(current.items()))
    )
    path.chmod(0o600)


def ensure_credentials(settings: Settings) -> Settings:
    """Use the configured keys, or generate a pair once per state directory (never in the repo)."""
    if settings.s3_access_key and settings.s3_secret_key:
        return settings
    stored = read_env_file(stack_env_path(settings))
    values = {
        "AWS_ACCESS_KEY_ID": stored.get("AWS_ACCESS_KEY_ID") or "platform-" + secrets.token_hex(4),
        "AWS_SECRET_ACCESS_KEY": stored.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24),
    }
    write_stack_env(settings, values)
    os.environ.update(values)
    return get_settings()


# -- the services -----------------------------------------------------------------------------
def start_object_store(settings: Settings) -> Service:
    name = "object-store"
    access, secret = settings.require_s3_credentials()
    if _read_pid(settings, name):
        return Service(name, settings.s3_endpoint_url, settings.s3_endpoint_url + "/healthz")
    stored = read_env_file(stack_env_path(settings))
    from urllib.parse import urlparse

    s3_port = urlparse(stored.get("AWS_ENDPOINT_URL", "")).port or free_port(9000)
    base = free_port_block(6)
    data_dir = settings.state_dir / "s3" / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    cfg = settings.state_dir / "s3" / "identities.json"
    cfg.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "platform",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    cfg.chmod(0o600)
    logdir = settings.state_dir / "logs" / "weed"
    logdir.mkdir(parents=True, exist_ok=True)
    sock = settings.state_dir / "s3"
    cmd = [
        _bin("weed"),
        f"-logdir={logdir}",
        "mini",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-s3.config={cfg}",
        f"-s3.port={s3_port}",
        f"-master.port={base}",
        f"-volume.port={base + 1}",
        f"-filer.port={base + 2}",
        f"-admin.port={base + 3}",
        f"-s3.port.lance={base + 4}",
        f"-webdav.port={base + 5}",
        "-admin.ui=false",
        "-webdav=false",
        f"-s3.localSocket={sock / 's3.sock'}",
        f"-filer.localSocket={sock / 'filer.sock'}",
        "-master.volumeSizeLimitMB=256",
    ]
    _spawn(settings, name, cmd, env={})
    endpoint = f"http://127.0.0.1:{s3_port}"
    write_stack_env(settings, {"AWS_ENDPOINT_URL": endpoint})
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    # Healthy = an authenticated bucket listing works (anonymous requests get 403 by design).
    settings = get_settings()
    deadline = time.time() + 60
    from pipelines.storage import ObjectStore

    while True:
        try:
            ObjectStore(settings).ensure_buckets()
            break
        except Exception as e:  # noqa: BLE001
            if time.time() > deadline or not _read_pid(settings, name):
                raise RuntimeError(f"object store failed to start: {e}; see {settings.state_dir / 'logs'}") from e
            time.sleep(0.5)
    return Service(name, endpoint, endpoint + "/healthz")


def start_mlflow(settings: Settings, wait: bool = True) -> Service:
    name = "mlflow"
    stored = read_env_file(stack_env_path(settings))
    from urllib.parse import urlparse

    port = urlparse(stored.get("MLFLOW_TRACKING_URI", "")).port or free_port(5000)
    url = f"http://127.0.0.1:{port}"
    if not _read_pid(settings, name):
        (settings.state_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        cmd = [
            _bin("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            settings.mlflow_backend_uri,
            # Proxied artifacts: clients only need the tracking URI; the server writes to S3.
            "--artifacts-destination",
            settings.mlflow_artifact_root,
            "--workers",
            "1",
        ]
        env = {k: v for k, v in settings.client_env().items() if k != "MLFLOW_TRACKING_URI"}
        # MLflow 3's job runner spawns ~7 worker processes we don't use: too much for a laptop.
        env.setdefault(
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
            os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        )
        _spawn(settings, name, cmd, env=env)
    write_stack_env(settings, {"MLFLOW_TRACKING_URI": url})
    os.environ["MLFLOW_TRACKING_URI"] = url
    if wait:
        _wait_http(url + "/health", 120, name, settings)
    return Service(name, url, url + "/health")


CELERY_EXECUTOR = "CeleryExecutor"
# Passed through to every Airflow process when set: the Celery executor (scheduler) and the workers
# must agree on them. The same names as docker-compose.yml.
CELERY_ENV = (
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY",
)
WORKER_NAME_ENV = "PLATFORM_WORKER_NAME"
# Third-party libraries that lake and training tasks import, GX alone for seconds: an embedded Celery
# worker imports them once, before forking its pool, and Airflow forks each task from a pool process,
# so tasks start warm. The platform's own modules are not preloaded: edits to them apply to the next
# task without restarting the workers.
WORKER_PRELOAD = ("pandas", "pyarrow.parquet", "great_expectations", "sklearn.ensemble", "mlflow")


def __getattr__(name: str):
    """`pipelines.services.CELERY_CONFIG`, the embedded workers' [celery] celery_config_options:
    Airflow's default Celery configuration plus WORKER_PRELOAD as Celery `imports`. Built on first
    access (PEP 562) because it reads Airflow's configuration; only Airflow processes ask for it."""
    if name == "CELERY_CONFIG":
        from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

        return {**DEFAULT_CELERY_CONFIG, "imports": WORKER_PRELOAD}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def worker_hostname() -> str:
    """Airflow's [core] hostname_callable under the CeleryExecutor: a task instance records which
    embedded worker ran it (PLATFORM_WORKER_NAME, e.g. `worker1@host`); elsewhere the usual FQDN.

    Several workers on one host would otherwise all report the same hostname."""
    name = os.environ.get(WORKER_NAME_ENV, "").strip()
    if name:
        return name
    from airflow.utils.net import getfqdn  # Airflow's default, with its getfqdn fix

    return getfqdn()


def airflow_executor() -> str:
    return os.environ.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")


def airflow_env(settings: Settings) -> dict[str, str]:
    """The Airflow configuration of the embedded stack, as AIRFLOW__* variables."""
    stored = read_env_file(stack_env_path(settings))
    home = settings.airflow_home
    port = settings.airflow_port
    jwt = stored.get("AIRFLOW__API_AUTH__JWT_SECRET") or os.environ.get("AIRFLOW__API_AUTH__JWT_SECRET")
    executor = airflow_executor()
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": executor,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.airflow_sql_alchemy_conn,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "PYTHONPATH": str(REPO_ROOT),
        "NO_PROXY": "*",
    }
    if jwt:
        env["AIRFLOW__API_AUTH__JWT_SECRET"] = jwt
    if executor.endswith(CELERY_EXECUTOR):
        env.update({k: os.environ[k] for k in CELERY_ENV if os.environ.get(k)})
        for key, default in (
            ("AIRFLOW__CORE__HOSTNAME_CALLABLE", "pipelines.services.worker_hostname"),
            ("AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS", "pipelines.services.CELERY_CONFIG"),
        ):
            env[key] = os.environ.get(key, default)
    return env


def airflow_migrate(settings: Settings) -> None:
    if not (settings.airflow_db_uri or "").strip():
        (settings.airflow_home).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.client_env(), **airflow_env(settings)}
    marker = settings.airflow_home / ".migrated"
    if marker.exists() and marker.read_text() == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]:
        return
    out = subprocess.run([_bin("airflow"), "db", "migrate"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`airflow db migrate` failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    marker.write_text(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])


AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
WORKER_PREFIX = "airflow-celery-worker-"
DEFAULT_WORKER_CONCURRENCY = 2  # task slots per embedded worker: a laptop has few cores


def worker_names(settings: Settings) -> list[str]:
    """The Celery workers `up` started in this state directory (from their PID files)."""
    pids = settings.state_dir / "pids"
    found = [p.name.removesuffix(".pid") for p in pids.glob(f"{WORKER_PREFIX}*.pid")] if pids.exists() else []
    return sorted(found, key=lambda n: int(n.removeprefix(WORKER_PREFIX) or 0))


def start_celery_workers(settings: Settings, workers: int, concurrency: int | None = None) -> list[str]:
    """`airflow celery worker` processes 1..workers, each with its own Celery node name
    `worker<i>@<host>`, PID file and log; their tasks record that name as hostname."""
    if not airflow_executor().endswith(CELERY_EXECUTOR):
        raise RuntimeError(
            f"{workers} Celery worker(s) requested but AIRFLOW__CORE__EXECUTOR is {airflow_executor()!r}: "
            "set AIRFLOW__CORE__EXECUTOR=CeleryExecutor and AIRFLOW__CELERY__BROKER_URL (e.g. "
            "redis://127.0.0.1:6379/0) for `platform up --workers N`."
        )
    if not os.environ.get("AIRFLOW__CELERY__BROKER_URL"):
        raise RuntimeError(
            "AIRFLOW__CELERY__BROKER_URL is not set: the workers need a broker (e.g. redis://127.0.0.1:6379/0)."
        )
    env = {**settings.client_env(), **airflow_env(settings)}
    slots = concurrency or int(os.environ.get("AIRFLOW__CELERY__WORKER_CONCURRENCY") or DEFAULT_WORKER_CONCURRENCY)
    host = socket.gethostname()
    names = []
    for i in range(1, workers + 1):
        name = f"{WORKER_PREFIX}{i}"
        cmd = [
            _bin("airflow"),
            "celery",
            "worker",
            "--celery-hostname",
            f"worker{i}@%h",
            "--concurrency",
            str(slots),
            # One host, one log folder: the api-server reads task logs from the shared disk. The log
            # server would also bind the same port (8793) in every worker.
            "--skip-serve-logs",
        ]
        _spawn(settings, name, cmd, env={**env, WORKER_NAME_ENV: f"worker{i}@{host}"})
        names.append(name)
    return names


def start_airflow(
    settings: Settings, ui: bool = True, workers: int = 0, worker_concurrency: int | None = None
) -> Service | None:
    stored = read_env_file(stack_env_path(settings))
    if "AIRFLOW__API_AUTH__JWT_SECRET" not in stored:
        write_stack_env(settings, {"AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32)})
    if "PLATFORM_AIRFLOW_PORT" not in stored:
        write_stack_env(settings, {"PLATFORM_AIRFLOW_PORT": str(free_port(8080))})
    settings = get_settings()
    airflow_migrate(settings)
    if not ui:
        return None
    env = {**settings.client_env(), **airflow_env(settings)}
    for component in AIRFLOW_COMPONENTS:
        cmd = [_bin("airflow"), component]
        if component == "api-server":
            cmd += ["--port", str(settings.airflow_port), "--host", "127.0.0.1"]
        _spawn(settings, f"airflow-{component}", cmd, env=env)
    if workers:
        start_celery_workers(settings, workers, worker_concurrency)
    url = f"http://127.0.0.1:{settings.airflow_port}"
    _wait_http(url + "/api/v2/monitor/health", 180, "airflow-api-server", settings)
    return Service("airflow", url, url + "/api/v2/monitor/health")


def up(ui: bool = True, progress=print, workers: int = 0, worker_concurrency: int | None = None) -> dict:
    if workers and not ui:
        raise RuntimeError("Celery workers need the scheduler and api-server: drop --no-ui to use --workers")
    settings = get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings = ensure_credentials(settings)
    progress(f"[up] state directory {settings.state_dir}")
    progress("[up] object store (SeaweedFS S3, credentials enforced) ...")
    start_object_store(settings)
    progress("[up] MLflow tracking server ...")
    mlflow = start_mlflow(get_settings(), wait=False)  # starts while Airflow migrates its DB
    progress("[up] Airflow metadata database" + (" + UI components ..." if ui else " ..."))
    if workers:
        progress(f"[up] {workers} Celery worker(s) ({airflow_executor()}) ...")
    start_airflow(get_settings(), ui=ui, workers=workers, worker_concurrency=worker_concurrency)
    _wait_http(mlflow.health_url or mlflow.url, 120, mlflow.name, get_settings())
    if ui:
        progress("[up] MLflow UI ready")
    return status()


def _stop_together(settings: Settings, names: list[str]) -> list[bool]:
    """Stop these processes at once: each one's graceful shutdown overlaps the others'."""
    from concurrent.futures import ThreadPoolExecutor

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return list(pool.map(lambda name: _stop(settings, name), names))


def stop_airflow(settings: Settings) -> list[str]:
    """Stop the Airflow components `start_airflow` started (workers first: their warm shutdown lets
    running tasks report to the api-server, still up). Returns the ones that were running."""
    stopped = []
    for wave in (worker_names(settings), [f"airflow-{c}" for c in AIRFLOW_COMPONENTS]):
        stopped += [n for n, ran in zip(wave, _stop_together(settings, wave), strict=True) if ran]
    return stopped


def down(progress=print) -> list[str]:
    """Stop what `up` started, in three waves, each wave's processes at once: Celery workers first
    (their warm shutdown lets running tasks report to the api-server, still up), then Airflow's
    other components, then MLflow and the object store."""
    settings = get_settings()
    stopped = stop_airflow(settings)
    rest = ["mlflow", "object-store"]
    stopped += [n for n, ran in zip(rest, _stop_together(settings, rest), strict=True) if ran]
    for name in stopped:
        progress(f"[down] stopped {name}")
    return stopped


def status() -> dict:
    settings = get_settings()
    services = {}
    airflow_url = f"http://127.0.0.1:{settings.airflow_port}"
    for name, url, health in (
        ("object-store", settings.s3_endpoint_url, None),
        ("mlflow", settings.mlflow_tracking_uri, settings.mlflow_tracking_uri + "/health"),
        ("airflow-api-server", airflow_url, airflow_url + "/api/v2/monitor/health"),
        ("airflow-scheduler", None, None),
        ("airflow-dag-processor", None, None),
        ("airflow-triggerer", None, None),
        *((name, None, None) for name in worker_names(settings)),
    ):
        pid = _read_pid(settings, name)
        healthy = None
        if pid and health:
            try:
                with urllib.request.urlopen(health, timeout=2) as r:
                    healthy = r.status == 200
            except Exception:  # noqa: BLE001
                healthy = False
        services[name] = {"running": bool(pid), "pid": pid, "url": url, "healthy": healthy}
    pw_file = settings.airflow_home / "simple_auth_manager_passwords.json.generated"
    return {
        "state_dir": str(settings.state_dir),
        "services": services,
        "endpoints": {
            "s3": settings.s3_endpoint_url,
            "mlflow": settings.mlflow_tracking_uri,
            "airflow": airflow_url,
        },
        "buckets": {
            "landing": settings.landing_bucket,
            "lake": settings.lake_bucket,
            "mlflow": settings.mlflow_bucket,
        },
        "airflow_admin_password_file": str(pw_file),
        "env_file": str(stack_env_path(settings)),
    }
