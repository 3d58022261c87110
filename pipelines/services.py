"""The embedded stack: start, stop and inspect the object store, MLflow and Airflow as local processes.

Everything binds to 127.0.0.1. Each process runs in its own session with its PID (and the
process's start time, so a recycled PID is not mistaken for ours) in <state>/pids/, logs in
<state>/logs/, so `platform down` stops exactly what `platform up` started and nothing else.
`platform up` writes <state>/stack.env (generated credentials, chosen ports) which
pipelines.settings reads, so any later process finds the stack.

Other users of the machine share the loopback interface, so 127.0.0.1 alone protects nothing:
* the state directory and everything in it is private (directories 0700, files 0600; the servers
  run with umask 077);
* the object store exposes one unauthenticated-looking port, its S3 endpoint, which checks the
  access keys. SeaweedFS's other listeners (master, volume, filer, admin: HTTP and gRPC) require a
  client certificate of a CA generated per start into <state>/s3/security/ (SeaweedFS's own
  security.toml: mutual TLS on every HTTP and gRPC listener, plus JWT signing keys for volume and
  filer reads and writes), so anonymous connections fail the TLS handshake;
* `platform up` never talks to a server it did not start: every port the stack will open (the
  object store's derived ports too) is checked before the start, a recorded port another process
  took is replaced by a free one, and a server is used only once the process group we started is
  the one listening on its port.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipelines.settings import MLFLOW_ROLES, REPO_ROOT, Settings, get_settings, read_env_file

VENV_BIN = Path(sys.executable).parent


def _bin(name: str) -> str:
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


# -- ports ------------------------------------------------------------------------------------
def port_is_free(port: int) -> bool:
    if not 0 < port < 65536:  # e.g. a derived port (+10000) past the end of the range
        return False
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


GRPC_OFFSET = 10000  # SeaweedFS's default gRPC port = HTTP port + 10000


def free_port_block(count: int, offset_also: int = GRPC_OFFSET, avoid: Iterable[int] = ()) -> int:
    """A base port with `count` consecutive free ports, and free at +offset too (weed's gRPC ports)."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    avoid = set(avoid)
    for _ in range(200):
        base = rng.randrange(20000, 29000)
        ports = [base + i for i in range(count)] + [base + offset_also + i for i in range(count)]
        if not avoid.intersection(ports) and all(port_is_free(p) for p in ports):
            return base
    raise RuntimeError("Could not find free loopback ports for the object store")


def _listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on TCP `port` (any local address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _process_group(pgid: int) -> list[int]:
    """The processes of group `pgid` (each of our services leads its own group and session)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            members.append(int(entry))
    return members


def pid_listens_on(pid: int, port: int) -> bool:
    """Whether the process group we started as `pid` is what listens on 127.0.0.1:`port`."""
    listening = _listening_inodes(port)
    if not listening:
        return False
    return any(_socket_inodes(member) & listening for member in _process_group(pid) or [pid])


def port_holder(port: int) -> str | None:
    """Who listens on `port`: 'pid 123 (weed ...)' when the process is visible to us, else a note."""
    listening = _listening_inodes(port)
    if not listening:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _socket_inodes(int(entry)) & listening:
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = "?"
            return f"pid {entry} ({cmd.strip()[:120]})"
    return "a process of another user (not visible to us)"


def _recorded_port(settings: Settings, key: str) -> int | None:
    from urllib.parse import urlparse

    value = read_env_file(stack_env_path(settings)).get(key, "")
    if not value:
        return None
    if value.isdigit():
        return int(value)
    return urlparse(value).port


def choose_port(settings: Settings, key: str, name: str, default: int, progress=print) -> int:
    """The port for service `name`: the one recorded under `key` in stack.env if it is free, a new free
    one (reported, and recorded by the caller) if another process took it, `default` if free otherwise.

    Only for a service that is not running: a running one of ours keeps its port (`_our_service`)."""
    recorded = _recorded_port(settings, key)
    if recorded and port_is_free(recorded):
        return recorded
    port = free_port(None if recorded else default)
    if recorded:
        progress(
            f"[up] {name}: recorded port {recorded} is taken by {port_holder(recorded) or 'another process'}; "
            f"using {port} instead (recorded in {stack_env_path(settings)})"
        )
    return port


# -- process bookkeeping -----------------------------------------------------------------------
@dataclass
class Service:
    name: str
    url: str
    health_url: str | None


PRIVATE_UMASK = 0o077  # every server we start creates files readable by our user only


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: str | bytes) -> None:
    """Write `path` as a 0600 file (created so, never world-readable even for an instant)."""
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data.encode() if isinstance(data, str) else data)


def make_state_private(state_dir: Path) -> None:
    """Directories 0700 and files 0600 under `state_dir` (our own entries; symlinks are left alone).

    The servers run with umask 077, but a state directory from an older version, or a file a server
    chmods itself (SeaweedFS writes its .vif volume metadata 0644), is tightened here."""
    uid = os.geteuid()
    private_dir(state_dir)
    for root, dirs, files in os.walk(state_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue  # removed meanwhile
            if st.st_uid != uid or os.path.islink(path):
                continue
            wanted = 0o700 if name in dirs else 0o600 if not _is_socket(st.st_mode) else 0o700
            if st.st_mode & 0o777 & ~wanted:
                try:
                    os.chmod(path, (st.st_mode & 0o777) & wanted)
                except OSError:
                    pass


def _is_socket(mode: int) -> bool:
    import stat

    return stat.S_ISSOCK(mode)


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.pid"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the PID, an identity token."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _read_pid(settings: Settings, name: str) -> int | None:
    """The PID of our `name` if that very process is still alive (PID and start time both match)."""
    path = _pid_file(settings, name)
    if not path.exists():
        return None
    try:
        fields = path.read_text().split()
        pid = int(fields[0])
    except (ValueError, IndexError):
        return None
    if not _alive(pid):
        return None
    if len(fields) > 1 and _start_time(pid) not in (None, fields[1]):
        return None  # the PID was recycled by a process that is not ours
    return pid


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
    logs = private_dir(settings.state_dir / "logs")
    private_dir(settings.state_dir / "pids")
    log_fd = os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log_fd, 0o600)
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=str(cwd or settings.state_dir),
            start_new_session=True,  # own process group: `down` stops it and its children
            umask=PRIVATE_UMASK,
        )
    write_private(_pid_file(settings, name), f"{proc.pid} {_start_time(proc.pid) or ''}".strip())
    return proc.pid


def _our_service(settings: Settings, name: str, port: int | None) -> int | None:
    """The PID of our running `name` if it (its process group) listens on `port`; a process of ours
    that is alive but not listening there is stopped, so the caller starts a fresh one."""
    pid = _read_pid(settings, name)
    if pid and port and not pid_listens_on(pid, port):
        _stop(settings, name)
        return None
    return pid


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
    """Wait until `url` answers `ok`, asking only once our `name` process group listens on its port:
    a foreign server that took the port is never talked to."""
    from urllib.parse import urlparse

    port = urlparse(url).port
    deadline = time.time() + timeout
    last: object = None
    while time.time() < deadline:
        pid = _read_pid(settings, name)
        if not pid:
            break
        if port and not pid_listens_on(pid, port):
            last = f"{name} (pid {pid}) is not listening on port {port} yet"
            holder = port_holder(port)
            if holder:
                last = f"port {port} is held by {holder}, not by {name} (pid {pid})"
            time.sleep(0.5)
            continue
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
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not become healthy at {url} ({last}).{_log_tail(settings, name)}")


def _log_tail(settings: Settings, name: str, chars: int = 3000) -> str:
    log = settings.state_dir / "logs" / f"{name}.log"
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")
    # The line that names the cause (a port another process took) is often far above the tail.
    causes = [line for line in text.splitlines() if "not available" in line or "address already in use" in line]
    cause = ("\nCause: " + causes[-1].strip()) if causes else ""
    return f"{cause}\nLast log lines ({log}):\n{text[-chars:]}"


# -- stack.env --------------------------------------------------------------------------------
def stack_env_path(settings: Settings) -> Path:
    return settings.state_dir / "stack.env"


def write_stack_env(settings: Settings, values: dict[str, str]) -> None:
    path = stack_env_path(settings)
    current = read_env_file(path)
    current.update(values)
    write_private(
        path,
        "# written by `platform up`: generated credentials and ports of the embedded stack\n"
        + "".join(f"{k}={v}\n" for k, v in sorted(current.items())),
    )


def ensure_credentials(settings: Settings) -> Settings:
    """Use the configured keys and passwords, or generate them once per state directory (never in
    the repo): the object store's key pair, MLflow's admin password (the operator's identity on this
    machine) and one password per MLflow role user."""
    stored = read_env_file(stack_env_path(settings))
    values: dict[str, str] = {}
    exported: dict[str, str] = {}
    if not (settings.s3_access_key and settings.s3_secret_key):
        exported["AWS_ACCESS_KEY_ID"] = stored.get("AWS_ACCESS_KEY_ID") or "platform-" + secrets.token_hex(4)
        exported["AWS_SECRET_ACCESS_KEY"] = stored.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24)
    admin_password = (
        settings.mlflow_admin_password.get_secret_value()
        if settings.mlflow_admin_password
        else stored.get("MLFLOW_AUTH_ADMIN_PASSWORD") or secrets.token_urlsafe(24)
    )
    if not settings.mlflow_admin_password:
        values["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin_password
    if not (settings.mlflow_username and settings.mlflow_password):
        exported["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
        exported["MLFLOW_TRACKING_PASSWORD"] = admin_password
    for role in MLFLOW_ROLES:
        key = f"PLATFORM_MLFLOW_{role.upper()}_PASSWORD"
        if not settings.mlflow_role_password(role):
            values[key] = stored.get(key) or secrets.token_urlsafe(24)
    if values or exported:
        write_stack_env(settings, {**values, **exported})
        os.environ.update(exported)
    return get_settings()


# -- the object store's own security ------------------------------------------------------------
# Components of `weed mini` and the security.toml sections that secure their listeners.
WEED_GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq")
WEED_HTTPS_SECTIONS = ("master", "volume", "filer", "admin")
WEED_JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def _issue_store_certificates(directory: Path) -> dict[str, Path]:
    """A CA and one certificate (server and client use) for every SeaweedFS component, new each start.

    Only the object store's own process holds the key, so only it passes the mutual-TLS handshake of
    its master, volume, filer and admin listeners; nobody else can connect to them."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    valid = {"not_valid_before": now - dt.timedelta(minutes=5), "not_valid_after": now + dt.timedelta(days=3650)}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "platform object store CA")])
    ca = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, public_key=ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "platform-object-store")]),
            public_key=key.public_key(),
        )
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "store.pem", "key": directory / "store.key"}
    write_private(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    write_private(paths["cert"], cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        paths["key"],
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return paths


def write_store_security(directory: Path) -> Path:
    """<directory>/security.toml for `weed` (read from its working directory): mutual TLS on every
    HTTP and gRPC listener except the S3 endpoint, JWT signing keys for volume and filer reads and
    writes, no UI or directory metadata on the filer and volume. All generated, never committed."""
    private_dir(directory)
    tls = _issue_store_certificates(directory)
    ca, cert, key = (json.dumps(str(tls[k])) for k in ("ca", "cert", "key"))
    lines = ["# written by `platform up` for the embedded object store; regenerated at every start"]
    for section in WEED_JWT_SECTIONS:
        lines += [f"[{section}]", f'key = "{secrets.token_urlsafe(32)}"', "expires_after_seconds = 10"]
    lines += ["[access]", "ui = false", "[filer.expose_directory_metadata]", "enabled = false"]
    lines += ["[grpc]", f"ca = {ca}"]
    for component in WEED_GRPC_SECTIONS:
        lines += [f"[grpc.{component}]", f"cert = {cert}", f"key = {key}"]
    lines += ["[grpc.client]", f"cert = {cert}", f"key = {key}"]
    for component in WEED_HTTPS_SECTIONS:
        # `ca` set = the listener demands a client certificate signed by it (mutual TLS).
        lines += [f"[https.{component}]", f"cert = {cert}", f"key = {key}", f"ca = {ca}"]
    lines += ["[https.client]", "enabled = true", f"cert = {cert}", f"key = {key}", f"ca = {ca}"]
    path = directory / "security.toml"
    write_private(path, "\n".join(lines) + "\n")
    return path


@dataclass
class StorePorts:
    """Every TCP port `weed mini` opens: its S3 endpoint and the internal listeners behind it."""

    s3: int
    s3_grpc: int
    base: int  # master, volume, filer, admin HTTP at base..base+3, their gRPC at +GRPC_OFFSET

    @property
    def internal(self) -> list[int]:
        http = [self.base + i for i in range(4)]
        return [self.s3_grpc, *http, *(p + GRPC_OFFSET for p in http)]

    def all(self) -> list[int]:
        return [self.s3, *self.internal]


def _store_ports(settings: Settings, progress=print) -> StorePorts:
    """Free ports for every listener of the store, checked before the start (the derived ones too)."""
    s3 = choose_port(settings, "AWS_ENDPOINT_URL", "object store", 9000, progress)
    base = free_port_block(4, avoid=(s3,))
    taken = {s3, *(base + i for i in range(4)), *(base + GRPC_OFFSET + i for i in range(4))}
    s3_grpc = s3 + GRPC_OFFSET
    if s3_grpc in taken or not port_is_free(s3_grpc):
        s3_grpc = next(p for p in iter(free_port, None) if p not in taken)
    ports = StorePorts(s3=s3, s3_grpc=s3_grpc, base=base)
    busy = [p for p in ports.all() if not port_is_free(p)]
    if busy:
        raise RuntimeError(
            "object store ports taken: "
            + ", ".join(f"{p} by {port_holder(p) or 'another process'}" for p in busy)
            + "; run `platform up` again to pick other ports"
        )
    return ports


# -- the services -----------------------------------------------------------------------------
def start_object_store(settings: Settings, progress=print) -> Service:
    name = "object-store"
    access, secret = settings.require_s3_credentials()
    recorded = _recorded_port(settings, "AWS_ENDPOINT_URL")
    if _our_service(settings, name, recorded):
        return Service(name, settings.s3_endpoint_url, settings.s3_endpoint_url + "/healthz")
    ports = _store_ports(settings, progress)
    s3_dir = private_dir(settings.state_dir / "s3")
    data_dir = private_dir(s3_dir / "data")
    make_state_private(s3_dir)  # volumes written by an older version were 0644
    cfg = s3_dir / "identities.json"
    write_private(
        cfg,
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
        ),
    )
    security_dir = s3_dir / "security"
    write_store_security(security_dir)
    logdir = private_dir(settings.state_dir / "logs" / "weed")
    cmd = [
        _bin("weed"),
        f"-logdir={logdir}",
        "mini",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data_dir}",
        f"-s3.config={cfg}",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        f"-master.port={ports.base}",
        f"-master.port.grpc={ports.base + GRPC_OFFSET}",
        f"-volume.port={ports.base + 1}",
        f"-volume.port.grpc={ports.base + 1 + GRPC_OFFSET}",
        f"-filer.port={ports.base + 2}",
        f"-filer.port.grpc={ports.base + 2 + GRPC_OFFSET}",
        f"-admin.port={ports.base + 3}",
        f"-admin.port.grpc={ports.base + 3 + GRPC_OFFSET}",
        # Listeners we don't use are switched off: Lance and Iceberg catalogs, WebDAV, the admin UI.
        "-s3.port.lance=0",
        "-s3.port.iceberg=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        f"-s3.localSocket={s3_dir / 's3.sock'}",
        f"-filer.localSocket={s3_dir / 'filer.sock'}",
        "-master.volumeSizeLimitMB=256",
    ]
    # weed reads ./security.toml first: its working directory is the private security directory.
    pid = _spawn(settings, name, cmd, env={}, cwd=security_dir)
    endpoint = f"http://127.0.0.1:{ports.s3}"
    write_stack_env(settings, {"AWS_ENDPOINT_URL": endpoint})
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    # Healthy = an authenticated bucket listing works (anonymous requests get 403 by design), asked
    # only once our process listens on the port: our keys never go to a server we did not start.
    settings = get_settings()
    deadline = time.time() + 60
    from pipelines.storage import ObjectStore

    while True:
        try:
            if not pid_listens_on(pid, ports.s3):
                raise RuntimeError(
                    f"port {ports.s3} is "
                    + (f"held by {port_holder(ports.s3)}" if port_holder(ports.s3) else "not listening yet")
                )
            ObjectStore(settings).ensure_buckets()
            break
        except Exception as e:  # noqa: BLE001
            if time.time() > deadline or not _read_pid(settings, name):
                raise RuntimeError(f"object store failed to start: {e}.{_log_tail(settings, name)}") from e
            time.sleep(0.5)
    make_state_private(s3_dir)
    return Service(name, endpoint, endpoint + "/healthz")


def start_mlflow(settings: Settings, wait: bool = True, progress=print) -> Service:
    name = "mlflow"
    port = _recorded_port(settings, "MLFLOW_TRACKING_URI")
    if not _our_service(settings, name, port):
        port = choose_port(settings, "MLFLOW_TRACKING_URI", "MLflow", 5000, progress)
    url = f"http://127.0.0.1:{port}"
    if not _read_pid(settings, name):
        private_dir(settings.state_dir / "mlflow")
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
            # MLflow's own authentication: anonymous requests get 401, users only their grants.
            "--app-name",
            "basic-auth",
        ]
        env = {k: v for k, v in settings.client_env().items() if not k.startswith("MLFLOW_TRACKING_")}
        env.update(mlflow_auth_env(settings))
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
        configure_mlflow_auth(get_settings())
    return Service(name, url, url + "/health")


# -- MLflow's users and permissions --------------------------------------------------------------
MLFLOW_ADMIN = "admin"
# What each role's user may do, as MLflow's grants (resource type, pattern "*": every experiment /
# registered model, also the ones datasets add later; permission). MLflow's levels: READ < EDIT
# (update: tags, new versions, set an alias) < MANAGE (also delete: remove an alias, the model, grants).
# * trainer (the training DAG's `train` and the lakehouse tasks): logs runs and models; reads the
#   registry, cannot create versions or touch an alias.
# * gate (`register` and `gate` tasks): creates versions and sets aliases (EDIT); MLflow asks the same
#   EDIT to create a version as to set an alias, and cannot restrict which alias. It cannot delete an
#   alias, a version or the model.
# * canary (the canary DAG): sets and deletes aliases, which MLflow allows with MANAGE only; its EDIT
#   on the version tier keeps it from deleting versions and the model itself (both need delete there).
# * scoring (`platform serve`, the stream scorer): reads models, nothing else.
MLFLOW_ROLE_GRANTS: dict[str, tuple[tuple[str, str], ...]] = {
    "trainer": (("experiment", "EDIT"), ("registered_model", "READ")),
    "gate": (("experiment", "EDIT"), ("registered_model", "EDIT"), ("registered_model_version", "EDIT")),
    "canary": (("experiment", "EDIT"), ("registered_model", "MANAGE"), ("registered_model_version", "EDIT")),
    "scoring": (("experiment", "READ"), ("registered_model", "READ")),
}
AUTH_TEMPLATE = REPO_ROOT / "mlflow" / "basic_auth.ini"


def mlflow_auth_env(settings: Settings) -> dict[str, str]:
    """The MLflow server's auth configuration: its own copy of mlflow/basic_auth.ini, with the auth
    store (users, grants) beside the tracking store in the private state directory."""
    admin_password = settings.mlflow_admin_password
    if not admin_password:
        raise RuntimeError("MLFLOW_AUTH_ADMIN_PASSWORD is not set: run `platform up`, which generates it")
    config = settings.state_dir / "mlflow" / "basic_auth.ini"
    database = f"sqlite:///{settings.state_dir / 'mlflow' / 'auth.db'}"
    text = "\n".join(
        f"database_uri = {database}" if line.startswith("database_uri") else line
        for line in AUTH_TEMPLATE.read_text().splitlines()
    )
    write_private(config, text + "\n")
    # The auth app's CSRF protection signs with this key: generated once per state directory.
    key = os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or read_env_file(stack_env_path(settings)).get(
        "MLFLOW_FLASK_SERVER_SECRET_KEY"
    )
    if not key:
        key = secrets.token_urlsafe(32)
        write_stack_env(settings, {"MLFLOW_FLASK_SERVER_SECRET_KEY": key})
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password.get_secret_value(),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key,
    }


def _mlflow_admin_request(settings: Settings, method: str, path: str, body: dict | None = None) -> dict:
    import base64

    if not settings.mlflow_admin_password:
        raise RuntimeError("MLFLOW_AUTH_ADMIN_PASSWORD is not set: the MLflow users cannot be set up")
    token = base64.b64encode(f"{MLFLOW_ADMIN}:{settings.mlflow_admin_password.get_secret_value()}".encode())
    url = settings.mlflow_tracking_uri.rstrip("/") + path
    data = None
    if body is not None and method == "GET":
        from urllib.parse import urlencode

        url += "?" + urlencode(body)
    elif body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", "Basic " + token.decode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def _mlflow_error_code(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read() or b"{}").get("error_code", ""))
    except ValueError:
        return ""


def configure_mlflow_auth(settings: Settings, model_names: Iterable[str] | None = None, progress=print) -> None:
    """Create or update the role users (MLFLOW_ROLES) with their passwords and exactly their grants,
    as the admin. Idempotent: run at every `platform up` and by docker-compose's `mlflow-init`.

    The registered models of the catalogue's datasets are created here, by the admin: MLflow makes the
    creator of a model its owner (MANAGE), so a model the gate created would let it delete aliases and
    the model. A role's own grant on a single model (left by such a creation) is revoked."""
    for role in MLFLOW_ROLES:
        password = settings.mlflow_role_password(role)
        if not password:
            progress(f"[mlflow-auth] no password for user {role} (PLATFORM_MLFLOW_{role.upper()}_PASSWORD): skipped")
            continue
        try:
            user = {"username": role, "password": password}
            _mlflow_admin_request(settings, "POST", "/api/2.0/mlflow/users/create", user)
        except urllib.error.HTTPError as exc:
            if _mlflow_error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            _mlflow_admin_request(settings, "PATCH", "/api/2.0/mlflow/users/update-password", user)
        for resource_type, permission in MLFLOW_ROLE_GRANTS[role]:
            grant = {"username": role, "resource_type": resource_type, "resource_id": "*"}
            try:
                _mlflow_admin_request(settings, "POST", "/api/3.0/mlflow/users/permissions/revoke", grant)
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    raise
            _mlflow_admin_request(
                settings, "POST", "/api/3.0/mlflow/users/permissions/grant", {**grant, "permission": permission}
            )
    if model_names is None:
        from pipelines.datasets import catalogue

        model_names = sorted({ds.model_name for ds in catalogue().values()})
    for name in model_names:
        try:
            _mlflow_admin_request(
                settings,
                "POST",
                "/api/2.0/mlflow/registered-models/create",
                {"name": name, "description": "IoT sensor anomaly detector; aliases champion/challenger/previous."},
            )
        except urllib.error.HTTPError as exc:
            if _mlflow_error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        for role in MLFLOW_ROLES:
            try:
                _mlflow_admin_request(
                    settings,
                    "POST",
                    "/api/3.0/mlflow/users/permissions/revoke",
                    {"username": role, "resource_type": "registered_model", "resource_id": name},
                )
            except urllib.error.HTTPError as exc:
                if exc.code >= 500:
                    raise


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
    # Airflow acts in MLflow as the platform's roles, never as the admin: the trainer by default, and
    # each task as its role (pipelines.settings.airflow_task_mlflow_role), so it holds those passwords.
    if settings.mlflow_role_password("trainer"):
        env["MLFLOW_TRACKING_USERNAME"] = "trainer"
        env["MLFLOW_TRACKING_PASSWORD"] = settings.mlflow_role_password("trainer") or ""
        for role in ("trainer", "gate", "canary"):
            env[f"PLATFORM_MLFLOW_{role.upper()}_PASSWORD"] = settings.mlflow_role_password(role) or ""
    if executor.endswith(CELERY_EXECUTOR):
        env.update({k: os.environ[k] for k in CELERY_ENV if os.environ.get(k)})
        for key, default in (
            ("AIRFLOW__CORE__HOSTNAME_CALLABLE", "pipelines.services.worker_hostname"),
            ("AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS", "pipelines.services.CELERY_CONFIG"),
        ):
            env[key] = os.environ.get(key, default)
    return env


def airflow_migrate(settings: Settings) -> None:
    if settings.airflow_home.resolve().is_relative_to(settings.state_dir):
        private_dir(settings.airflow_home)
    else:  # the user's own AIRFLOW_HOME: created if missing, its mode is theirs
        settings.airflow_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings.client_env(), **airflow_env(settings)}
    marker = settings.airflow_home / ".migrated"
    if marker.exists() and marker.read_text() == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]:
        return
    out = subprocess.run(
        [_bin("airflow"), "db", "migrate"], env=env, capture_output=True, text=True, umask=PRIVATE_UMASK
    )
    if out.returncode != 0:
        raise RuntimeError(f"`airflow db migrate` failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    write_private(marker, env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])


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
    recorded = _recorded_port(settings, "PLATFORM_AIRFLOW_PORT")
    if not recorded or (ui and not _our_service(settings, "airflow-api-server", recorded)):
        port = choose_port(settings, "PLATFORM_AIRFLOW_PORT", "Airflow api-server", 8080)
        if port != recorded:
            write_stack_env(settings, {"PLATFORM_AIRFLOW_PORT": str(port)})
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
    make_state_private(settings.state_dir)
    settings = ensure_credentials(settings)
    progress(f"[up] state directory {settings.state_dir}")
    progress("[up] object store (SeaweedFS S3, credentials enforced) ...")
    start_object_store(settings, progress=progress)
    progress("[up] MLflow tracking server ...")
    mlflow = start_mlflow(get_settings(), wait=False, progress=progress)  # starts while Airflow migrates its DB
    progress("[up] Airflow metadata database" + (" + UI components ..." if ui else " ..."))
    if workers:
        progress(f"[up] {workers} Celery worker(s) ({airflow_executor()}) ...")
    start_airflow(get_settings(), ui=ui, workers=workers, worker_concurrency=worker_concurrency)
    _wait_http(mlflow.health_url or mlflow.url, 120, mlflow.name, get_settings())
    progress("[up] MLflow users and permissions (admin + one user per role) ...")
    configure_mlflow_auth(get_settings(), progress=progress)
    if ui:
        progress("[up] MLflow UI ready")
    make_state_private(get_settings().state_dir)  # files the servers created meanwhile
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
    store_sockets = _store_grpc_sockets(settings)
    rest = ["mlflow", "object-store"]
    stopped += [n for n, ran in zip(rest, _stop_together(settings, rest), strict=True) if ran]
    for sock in store_sockets:  # `weed mini` leaves its gRPC sockets in /tmp behind
        try:
            if sock.is_socket() and sock.lstat().st_uid == os.geteuid():
                sock.unlink()
        except OSError:
            pass
    for name in stopped:
        progress(f"[down] stopped {name}")
    return stopped


def _store_grpc_sockets(settings: Settings) -> list[Path]:
    """The /tmp/seaweedfs-<component>-grpc-<port>.sock files of our running object store."""
    pid = _read_pid(settings, "object-store")
    if not pid:
        return []
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    sockets = []
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag.endswith(".port.grpc") and value.isdigit():
            component = flag.lstrip("-").split(".")[0]
            sockets.append(Path(f"/tmp/seaweedfs-{component}-grpc-{value}.sock"))
    return sockets


class StackNotOurs(RuntimeError):
    """The object store or MLflow the settings name is not running, or is another process."""


def verify_own_stack(settings: Settings, names: Iterable[str] = ("object-store", "mlflow")) -> None:
    """Raise StackNotOurs unless the object store and MLflow that ``settings`` name are answered by the
    processes `platform up` started in this state directory; ask nothing of them before that.

    The PID files are the stack's token: a server counts as ours only if the process we started (PID
    and start time) listens on the recorded port. An endpoint configured in the environment that
    differs from the recorded one (docker-compose, a remote stack) is the user's choice and is not
    checked; an endpoint neither recorded nor configured means the stack is not up."""
    from urllib.parse import urlparse

    recorded = read_env_file(stack_env_path(settings))
    configured = {**read_env_file(Path.cwd() / ".env"), **os.environ}
    problems = []
    for name, key, url in (
        ("object-store", "AWS_ENDPOINT_URL", settings.s3_endpoint_url),
        ("mlflow", "MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri),
    ):
        if name not in names:
            continue
        if key not in recorded and key not in configured:
            problems.append(f"no {name} recorded in {stack_env_path(settings)} and {key} is not set")
            continue
        if recorded.get(key) != url:
            continue  # configured elsewhere: not the embedded stack
        port = urlparse(url).port
        pid = _read_pid(settings, name)
        if pid and port and pid_listens_on(pid, port):
            continue
        holder = port_holder(port) if port else None
        if holder:
            problems.append(f"{url} is answered by {holder}, not by the {name} `platform up` started")
        elif pid:
            problems.append(f"{name} (pid {pid}) is not listening on {url}")
        else:
            problems.append(f"{name} is not running ({url})")
    if problems:
        raise StackNotOurs(
            "; ".join(problems)
            + f". Start the stack with `platform up` (state directory {settings.state_dir}), or set "
            "AWS_ENDPOINT_URL and MLFLOW_TRACKING_URI to a stack of your own. Nothing was sent to these ports."
        )


def status() -> dict:
    from urllib.parse import urlparse

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
        port = urlparse(url).port if url else None
        if pid and port and not pid_listens_on(pid, port):
            healthy = False  # ours is running but something else answers on its port: don't ask it
        elif pid and health:
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


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.services mlflow-auth`: docker-compose's `mlflow-init` one-shot (the MLflow
    users and grants of configure_mlflow_auth, against MLFLOW_TRACKING_URI, as the admin)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["mlflow-auth"]:
        print("usage: python -m pipelines.services mlflow-auth", file=sys.stderr)
        return 2
    settings = get_settings()
    deadline = time.time() + 120
    while True:  # the server answers /health before its auth store is ready on a first start
        try:
            configure_mlflow_auth(settings)
            break
        except (urllib.error.URLError, ConnectionError) as exc:
            if time.time() > deadline:
                raise RuntimeError(f"MLflow at {settings.mlflow_tracking_uri} did not accept the admin: {exc}") from exc
            time.sleep(2)
    print(f"[mlflow-auth] users {', '.join(MLFLOW_ROLES)} ready at {settings.mlflow_tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
