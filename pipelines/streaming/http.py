"""The latest state per device over HTTP (Starlette on uvicorn, like the scoring service).

GET /devices            the dataset's devices with a state
GET /devices/{device}   its last reading, score, threshold, model version, anomaly flag
GET /health             ok | degraded (state store unreachable: 503) | failed: <why> (503: a worker
                        thread died, e.g. "failed: stream-intake died: ValueError: ...")
GET /status             the ingester's counters (received, committed, refused, alerts, ...) and
                        `failed`: why it stopped ingesting, or null
GET /metrics            the same for Prometheus (pipelines.metrics), with the champion's version
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status, media_type="application/json")


def state_app(
    state, status: Callable[[], dict] | None = None, failure: Callable[[], str | None] | None = None
) -> Starlette:
    """`failure`: why the process no longer does its work (`Ingester.failure`), or None."""

    async def devices(request: Request) -> Response:
        return _json({"devices": state.devices()})

    async def device(request: Request) -> Response:
        name = request.path_params["device"]
        found = state.get(name)
        if found is None:
            return _json({"detail": f"no state for device {name!r}: it has not reported a scored reading yet"}, 404)
        return _json(found)

    async def health(request: Request) -> Response:
        ok = state.ping()
        problem = failure() if failure is not None else None
        if problem:
            return _json({"status": f"failed: {problem}", "state_store": ok}, 503)
        return _json({"status": "ok" if ok else "degraded", "state_store": ok}, 200 if ok else 503)

    async def status_route(request: Request) -> Response:
        return _json(status() if status else {})

    async def metrics_route(request: Request) -> Response:
        from pipelines.metrics import metrics_endpoint  # imported late: `platform stream` sets it up first

        return await metrics_endpoint(request)

    return Starlette(
        routes=[
            Route("/devices", devices),
            Route("/devices/{device}", device),
            Route("/health", health),
            Route("/status", status_route),
            Route("/metrics", metrics_route),
        ]
    )


def serve_in_thread(app: Starlette, host: str, port: int):
    """Run uvicorn beside the ingester (a daemon thread); returns the server (`should_exit` stops it).

    The port is bound here, in the caller's thread: one that cannot be bound (in use, not allowed)
    raises OSError naming it. Bound by uvicorn in its thread, the error was logged and the thread
    ended while the process went on without its HTTP endpoints."""
    import socket

    import uvicorn

    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from exc
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stream-http", daemon=True)
    thread.start()
    return server
