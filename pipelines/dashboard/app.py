"""The dashboard's HTTP app (FastAPI on uvicorn).

GET /                         the page (pipelines/dashboard/page.py): it polls /api/snapshot
GET /api/datasets             the datasets it shows
GET /api/snapshot?dataset=&column=&device=
                              readings per device with each point's anomaly flag, recent alerts,
                              model versions and aliases, canary stage, drift per feature, lake and
                              device state (pipelines/dashboard/data.py)
GET /health                   ok
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response

from pipelines.dashboard.data import Dashboard, DashboardConfig
from pipelines.dashboard.page import PAGE

log = logging.getLogger("pipelines.dashboard")


def create_app(dashboard: Dashboard) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            dashboard.stop()

    app = FastAPI(title="platform dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        # the page is static; what it shows comes from /api/snapshot (no value is ever put in HTML)
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP})

    @app.get("/api/datasets")
    def datasets() -> dict:
        return {"datasets": dashboard.datasets, "refresh_seconds": dashboard.cfg.refresh_seconds}

    @app.get("/api/snapshot")
    def snapshot(
        dataset: str = Query(...), column: str | None = Query(None), device: str | None = Query(None)
    ) -> Response:
        try:
            view = dashboard.view(dataset)
        except KeyError as exc:
            raise HTTPException(404, str(exc).strip("'\"")) from None
        body = orjson.dumps(view.snapshot(column, device), default=str, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    return app


# Only this origin's own script and styles: the page loads nothing from elsewhere.
_CSP = "default-src 'self'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline' 'self'; img-src 'self' data:"


def run(
    datasets: list[str],
    host: str = "127.0.0.1",
    port: int = 8720,
    cfg: DashboardConfig | None = None,
    model_names: dict[str, str] | None = None,
) -> None:
    """Serve until interrupted (`platform dashboard`)."""
    import os

    import uvicorn

    # the registry client must fail fast when MLflow is down (its default retries take minutes): the
    # page then says so beside the model part instead of going stale
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    dashboard = Dashboard(datasets, cfg=cfg, model_names=model_names)
    if len(datasets) <= 3:
        for name in datasets:
            dashboard.view(name)  # warm (models loaded, lake read) before the page is first opened
    print(f"[dashboard] {', '.join(datasets)} on http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    uvicorn.run(create_app(dashboard), host=host, port=port, log_level="warning", access_log=False)
