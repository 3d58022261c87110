"""`[wait]` lines: a service that stops answering is said while the client retries (issue 18)."""

from __future__ import annotations

import socket

import pytest

from pipelines.waits import announce_waits, describe_retry


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_mlflow_retrying_a_refused_connection_prints_one_wait_line_per_retry(monkeypatch, capsys):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    port = _closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    announce_waits()
    announce_waits()  # installed once, however often it is called
    with pytest.raises(MlflowException):
        http_request(
            get_default_host_creds(f"http://127.0.0.1:{port}"),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            max_retries=2,
            backoff_factor=0.01,
            timeout=2,
        )
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("[wait]")]
    assert lines == [
        f"[wait] MLflow (http://127.0.0.1:{port}) is not answering (connection refused); retrying, 1 try left",
        f"[wait] MLflow (http://127.0.0.1:{port}) is not answering (connection refused); retrying, last try",
    ], out
    assert "Retrying (Retry(" not in out.err + out.out, "the raw urllib3 warning is replaced, not repeated"


def test_other_messages_are_left_alone_and_unknown_services_are_named_by_address():
    assert describe_retry("Connection pool is full, discarding connection: 127.0.0.1") is None
    line = describe_retry(
        "Retrying (Retry(total=3, connect=None, read=None, redirect=None, status=None)) after connection broken by "
        "'ReadTimeoutError(\"HTTPConnectionPool(host='10.0.0.7', port=9000): Read timed out. (read timeout=5)\")': "
        "/lake/bronze",
        endpoints={},
    )
    assert line == "[wait] 10.0.0.7:9000 is not answering (timed out); retrying, 3 tries left"
