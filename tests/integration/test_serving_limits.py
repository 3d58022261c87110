"""The scoring service's limits as a hostile but fair client meets them (issue 18): bodies refused as
they arrive past the limit, bodies never finished closed after the timeout, the documented record
maximum reachable with full-precision floats, absurd features refused naming field and rule, and
feedback only for predictions the service made, once each."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.integration.test_serving import FEATURES, ServiceProcess, register_model, set_alias

BODY_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def svc(settings):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    name = "serving-tests"  # test_serving's model when it ran first in this session: not registered twice
    try:
        MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, "champion")
    except MlflowException:
        set_alias(uri, name, "champion", register_model(uri, name, "good", seed=0))
    with ServiceProcess(name, {"PLATFORM_SERVING_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)}) as service:
        yield service


def raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes, bool]:
    """(status, body, whether the server then closed the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int({k.lower(): v for k, v in headers.items()}[b"content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    sock.settimeout(5)
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread upload in its buffer: a reset
        closed = True
    except TimeoutError:
        closed = False
    return int(head.split()[1]), body, closed


def full_precision_record(i: int) -> dict:
    # the longest float reprs and the longest device id the service accepts
    return {"device": f"d{i:04d}".ljust(200, "x"), **{c: -1.2345678901234567e-300 * (i + 1) for c in FEATURES}}


def test_a_chunked_body_is_refused_as_it_arrives_and_its_connection_closed(svc):
    limit = int(httpx.get(svc.url + "/status").json()["body_limit_bytes"])
    head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock = raw_request(svc.port, head)
    sent = [0]
    stop = threading.Event()

    def upload():  # a 200 MB body, unless the service stops it
        chunk = b" " * 65536
        try:
            while sent[0] < 200 * 1024 * 1024 and not stop.is_set():
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent[0] += len(chunk)
        except OSError:
            pass

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        status, body, closed = read_response(sock)
    finally:
        stop.set()
        sock.close()
        uploader.join(timeout=10)
    assert status == 413 and b"limit" in body, body
    assert closed, "the connection stays open for the rest of the upload"
    # refused as the bytes passed the limit, not after the whole body was buffered
    assert sent[0] < limit + 8 * 1024 * 1024, (sent[0], limit)


def test_a_body_never_finished_is_timed_out_and_closed(svc):
    started = time.monotonic()
    sock = raw_request(svc.port, b'POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"records": [')
    try:
        status, body, closed = read_response(sock)
    finally:
        sock.close()
    assert status == 408 and b"body_timeout_seconds" in body, body
    assert closed and BODY_TIMEOUT <= time.monotonic() - started < BODY_TIMEOUT + 5
    assert httpx.get(svc.url + "/health").status_code == 200  # and the service is none the worse


def test_the_record_maximum_fits_with_full_precision_floats(svc):
    body = json.dumps({"records": [full_precision_record(i) for i in range(1000)]}, indent=4).encode()
    r = httpx.post(svc.url + "/score", content=body, timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert len(r.json()["predictions"]) == 1000
    more = json.dumps({"records": [full_precision_record(i) for i in range(1001)]}).encode()
    r = httpx.post(svc.url + "/score", content=more, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "too_long"


def test_absurd_or_empty_features_are_refused_naming_field_and_rule(svc):
    absurd = {"device": "d", "temp": 1e308, "temp_roll_std": -1e308}
    empty = {"device": "d", "temp": None, "temp_roll_std": None}
    ok = {"device": "d", "temp": 22.0, "temp_roll_std": None}
    r = httpx.post(svc.url + "/score", json={"records": [ok, absurd, empty]})
    assert r.status_code == 422, r.text
    errors = {(tuple(e["loc"]), e["type"]): e["msg"] for e in r.json()["detail"]}
    assert "max_abs_feature" in errors[(("body", "records", 1, "temp"), "out_of_range")]
    assert (("body", "records", 1, "temp_roll_std"), "out_of_range") in errors
    assert "every feature is null" in errors[(("body", "records", 2), "all_null")]
    assert not any(loc[2] == 0 for loc, _ in errors)  # the good record is not blamed
    r = httpx.post(svc.url + "/score", content=b'{"records": [{"device": "d", "temp": 1e999, "temp_roll_std": 1}]}')
    assert r.status_code == 422 and "infinity" in r.text  # JSON that overflows a double
    r = httpx.post(svc.url + "/score", content=b'{"records": [{"device": "d", "temp": NaN, "temp_roll_std": 1}]}')
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_feedback_only_for_predictions_made_and_once_each(svc):
    rid = f"fb-{time.time_ns()}"
    records = [{"device": f"d{i}", "temp": 22.0 + i, "temp_roll_std": 0.3} for i in range(3)]
    assert httpx.post(svc.url + "/score", json={"records": records, "request_id": rid}).status_code == 200

    def feedback(*labels):
        return httpx.post(svc.url + "/feedback", json={"labels": list(labels)})

    def label(request_id, index, is_anomaly):
        return {"request_id": request_id, "record_index": index, "is_anomaly": is_anomaly}

    never = feedback({"request_id": "never-scored", "is_anomaly": 1})
    assert never.status_code == 404 and never.json()["labels"][0]["request_id"] == "never-scored"
    beyond = feedback(label(rid, 3, 1))
    assert beyond.status_code == 404
    # a batch with one unknown id is refused whole: nothing of it is recorded
    mixed = feedback(label(rid, 0, 1), label("nope", 0, 0))
    assert mixed.status_code == 404
    first = feedback(label(rid, 0, 1), label(rid, 2, 0))
    assert first.status_code == 200 and first.json() == {"accepted": 2}
    again = feedback(label(rid, 2, 1))
    assert again.status_code == 409 and again.json()["labels"][0]["record_index"] == 2
    twice_in_one = feedback(label(rid, 1, 1), label(rid, 1, 0))
    assert twice_in_one.status_code == 409
    assert feedback(label(rid, 1, 0)).json() == {"accepted": 1}
