"""Another stack on the machine (issue 18, item 7): a foreign process holding the object store's recorded
port and its derived gRPC port (+10000) is never used or asked, and the CLI refuses to talk to servers
that are not the ones `platform up` started (the scoring service included: no ./mlflow.db fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pipelines import services

REPO = Path(__file__).resolve().parents[2]

FOREIGN_SERVER = textwrap.dedent(
    """
    import http.server, sys, threading

    class Recorder(http.server.BaseHTTPRequestHandler):
        def _any(self):
            with open(sys.argv[3], "a") as f:
                f.write(f"{self.server.server_address[1]} {self.command} {self.path}\\n")
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        def log_message(self, *args):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", int(p)), Recorder) for p in sys.argv[1:3]]
    threading.Thread(target=servers[1].serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()
    """
)


@pytest.fixture
def foreign(tmp_path):
    """Another process listening on a port P and on P + 10000, recording every request it gets."""
    port = next(
        p
        for p in iter(services.free_port, None)
        if p + services.GRPC_OFFSET < 65536 and services.port_is_free(p + services.GRPC_OFFSET)
    )
    requests = tmp_path / "foreign-requests.txt"
    requests.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", FOREIGN_SERVER, str(port), str(port + services.GRPC_OFFSET), str(requests)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    try:
        yield {"port": port, "pid": proc.pid, "requests": requests}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_foreign_process_on_the_recorded_port_and_its_grpc_port_is_never_used(own_state, foreign):
    from pipelines.settings import get_settings
    from pipelines.storage import ObjectStore

    taken, grpc = foreign["port"], foreign["port"] + services.GRPC_OFFSET
    recorded = f"http://127.0.0.1:{taken}"
    services.write_stack_env(get_settings(), {"AWS_ENDPOINT_URL": recorded})
    messages: list[str] = []
    services.start_object_store(get_settings(), progress=messages.append)

    settings = get_settings()
    port = urlparse(settings.s3_endpoint_url).port
    pid = services._read_pid(settings, "object-store")
    assert port not in (taken, grpc) and services.pid_listens_on(pid, port)
    assert not services.pid_listens_on(pid, taken) and not services.pid_listens_on(pid, grpc)
    assert any(str(taken) in m and f"pid {foreign['pid']}" in m for m in messages), messages
    store = ObjectStore(settings)
    store.put_bytes(settings.lake_bucket, "k", b"v")
    assert store.get_bytes(settings.lake_bucket, "k") == b"v"
    services.verify_own_stack(settings, names=("object-store",))  # ours: no complaint

    # The stack goes down and the foreign process is what answers on the recorded ports: the CLI
    # refuses, naming the holder, before anything is sent there.
    services._stop(settings, "object-store")
    services.write_stack_env(
        settings, {"AWS_ENDPOINT_URL": recorded, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{grpc}"}
    )
    with pytest.raises(services.StackNotOurs, match=f"answered by pid {foreign['pid']}") as refused:
        services.verify_own_stack(get_settings())
    assert "platform up" in str(refused.value) and str(grpc) in str(refused.value)
    assert foreign["requests"].read_text() == "", "our keys went to a server we did not start"


def serve(state: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m pipelines.serving` (what `platform serve` runs) with only the state directory set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PLATFORM_"))}
    env["PLATFORM_STATE_DIR"] = str(state)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.serving", "--port", str(services.free_port())],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_refuses_a_stack_that_is_not_up_or_not_ours(tmp_path, foreign, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    down = serve(tmp_path / "never-up", work)
    assert down.returncode != 0 and "platform up" in down.stderr, down.stderr[-2000:]
    assert "no object-store recorded" in down.stderr and "Traceback" not in down.stderr

    state = tmp_path / "other"
    state.mkdir()
    (state / "stack.env").write_text(
        f"AWS_ENDPOINT_URL=http://127.0.0.1:{foreign['port']}\n"
        f"MLFLOW_TRACKING_URI=http://127.0.0.1:{foreign['port'] + services.GRPC_OFFSET}\n"
        "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n"
    )
    foreign_stack = serve(state, work)
    assert foreign_stack.returncode != 0 and f"answered by pid {foreign['pid']}" in foreign_stack.stderr
    assert time.monotonic() - started < 60  # an error at once, not 503 for ever
    assert list(work.iterdir()) == [], "the service left files behind (./mlflow.db)"

    # every command that reads or writes the stack checks the same before it sends anything
    from pipelines.cli import main

    for var in [v for v in os.environ if v.startswith(("AWS_", "MLFLOW_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PLATFORM_STATE_DIR", str(state))
    assert main(["summary"]) == 1
    assert f"answered by pid {foreign['pid']}" in capsys.readouterr().err
    assert foreign["requests"].read_text() == ""
