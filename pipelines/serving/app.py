"""HTTP endpoints of the scoring service (Starlette on uvicorn; orjson; one process, micro-batched).

POST /score            {"records": [{"device": "...", <feature>: number|null, ...}], "request_id"?: str}
POST /feedback         {"labels": [{"request_id": str, "record_index"?: int, "is_anomaly": 0|1}]}
GET  /health           ok | degraded (still serving) | unavailable (no champion loaded: 503)
GET  /status           loaded versions, rollout state, batching and log counters
POST /admin/weight     {"weight": 0..100, "shadow"?: "none|challenger|champion", "reason": str}  (token)
POST /admin/reload     poll the registry and the rollout state now                            (token)
POST /admin/flush      write the buffered prediction log now                                  (token)
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipelines import metrics
from pipelines.runtime import GC_PAUSES, settle_heap
from pipelines.serving.batching import MicroBatcher
from pipelines.serving.config import ServingSettings
from pipelines.serving.models import ModelManager
from pipelines.serving.predlog import (
    FEEDBACK,
    FEEDBACK_SCHEMA,
    PREDICTION_SCHEMA,
    PREDICTIONS,
    LakeTableWriter,
)
from pipelines.serving.routing import route

log = logging.getLogger("pipelines.serving")
MAX_REPORTED_ERRORS = 50
# Body size per record: braces, a device id of 200 characters, each JSON-escaped (up to 6 bytes);
# per feature its name, quotes, colon, a float at full precision (-1.2345678901234567e-308: 24) and
# room for pretty-printing. A label: {"request_id": <64>, "record_index": n, "is_anomaly": 1}.
RECORD_BYTES, FIELD_BYTES, LABEL_BYTES, DEFAULT_FEATURES = 1400, 48, 160, 32


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")


def _error(status: int, message: str, close: bool = False, **extra: Any) -> Response:
    response = _json({"detail": message, **extra}, status)
    if close:  # the client is still sending: end the connection rather than read the rest
        response.headers["connection"] = "close"
    return response


async def read_limited_body(
    request: Request, limit: int, timeout_seconds: float, what: str = "body"
) -> tuple[bytes, Response | None]:
    """The body, refused with 413 as soon as it passes `limit` (a chunked body is never held in full
    first) and with 408 when it is not complete within `timeout_seconds`; both close the connection,
    so the rest of the upload is never read. /score's and /classify's one reader."""
    length = request.headers.get("content-length")
    if length and (not length.isdigit() or int(length) > limit):
        return b"", _error(413, f"{what} of {length} bytes > the limit of {limit}; split the request", close=True)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return b"", _error(413, f"{what} passed the limit of {limit} bytes; split the request", close=True)
                chunks.append(chunk)
    except TimeoutError:
        return b"", _error(
            408,
            f"{what} not complete after {timeout_seconds:g} s (serving.body_timeout_seconds); connection closed",
            close=True,
        )
    return b"".join(chunks), None


def _validation_error(errors: list[dict]) -> Response:
    return _json({"detail": errors[:MAX_REPORTED_ERRORS], "error_count": len(errors)}, 422)


def validate_records(
    body: Any, columns: list[str], max_records: int, max_abs: float = 1e9
) -> tuple[list[dict], list[dict]]:
    """(records, errors) with errors in FastAPI's shape: loc, msg, type. Features are finite numbers
    within +-``max_abs`` or null, and a record has at least one that is not null: a model answers
    anything, and 1e308 or a record of nulls scored "no anomaly" (issue 18)."""
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        return [], [{"loc": ["body", "records"], "msg": "expected an object with a list 'records'", "type": "missing"}]
    records = body["records"]
    if not records:
        return [], [{"loc": ["body", "records"], "msg": "at least one record is required", "type": "too_short"}]
    if len(records) > max_records:
        return [], [
            {
                "loc": ["body", "records"],
                "type": "too_long",
                "msg": f"{len(records)} records > the limit of {max_records}; split the request",
            }
        ]
    errors: list[dict] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            errors.append({"loc": ["body", "records", i], "msg": "expected an object", "type": "dict_type"})
            continue
        device = rec.get("device")
        if not isinstance(device, str) or not device or len(device) > 200:
            errors.append(
                {
                    "loc": ["body", "records", i, "device"],
                    "type": "string_type",
                    "msg": "device must be a non-empty string (routing is sticky per device)",
                }
            )
        readings = 0
        for col in columns:
            if col not in rec:
                errors.append({"loc": ["body", "records", i, col], "msg": "field required", "type": "missing"})
                continue
            v = rec[col]
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                errors.append(
                    {
                        "loc": ["body", "records", i, col],
                        "type": "float_type",
                        "msg": f"expected a finite number or null, got {v!r}"[:200],
                    }
                )
            elif abs(v) > max_abs:
                errors.append(
                    {
                        "loc": ["body", "records", i, col],
                        "type": "out_of_range",
                        "msg": f"{col} = {v!r} is beyond +-{max_abs:g} (serving.max_abs_feature): not a reading",
                    }
                )
            else:
                readings += 1
        if columns and readings == 0 and all(rec.get(c) is None for c in columns):
            errors.append(
                {
                    "loc": ["body", "records", i],
                    "type": "all_null",
                    "msg": f"every feature is null ({', '.join(columns)}): nothing to score; send at least one",
                }
            )
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    return records, errors


class ScoredRequests:
    """The request ids this service answered (the newest ``capacity``: a str and an int each, ~100
    bytes) and which of their records have a label, so /feedback takes labels only for predictions
    that were made, and one label per record: invented or repeated ids would skew the canary's
    comparison. A restart forgets them: labels for earlier requests are then refused with 404."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._records: OrderedDict[str, int] = OrderedDict()
        self._labelled: dict[str, set[int]] = {}

    def add(self, request_id: str, records: int) -> None:
        self._records[request_id] = records
        self._records.move_to_end(request_id)
        self._labelled.pop(request_id, None)  # a request id sent again is a new prediction
        while len(self._records) > self.capacity:
            old, _ = self._records.popitem(last=False)
            self._labelled.pop(old, None)

    def records(self, request_id: str) -> int | None:
        return self._records.get(request_id)

    def labelled(self, request_id: str, index: int) -> bool:
        return index in self._labelled.get(request_id, ())

    def mark(self, request_id: str, index: int) -> None:
        self._labelled.setdefault(request_id, set()).add(index)


class ScoringService:
    def __init__(self, settings, cfg: ServingSettings, store):
        self.settings = settings
        self.cfg = cfg
        self.store = store
        self.manager = ModelManager(settings, cfg.model_name or "", cfg.poll_seconds, store)
        self.batchers = {
            role: MicroBatcher(
                lambda r=role: self.manager.get(r),
                name=role,
                max_rows=cfg.max_batch_rows,
                wait_ms=cfg.batch_wait_ms,
            )
            for role in ("champion", "challenger")
        }
        self.prediction_log = LakeTableWriter(
            store,
            PREDICTIONS,
            PREDICTION_SCHEMA,
            cfg.log_flush_seconds,
            cfg.log_flush_rows,
            cfg.log_buffer_max_rows,
        )
        self.feedback_log = LakeTableWriter(
            store,
            FEEDBACK,
            FEEDBACK_SCHEMA,
            cfg.log_flush_seconds,
            cfg.log_flush_rows,
            cfg.log_buffer_max_rows,
        )
        self._background: set[asyncio.Task] = set()
        self.scored = ScoredRequests(cfg.feedback_known_requests)
        self._body_limit: tuple[list[str] | None, int] = (None, 0)
        # request ids: a random prefix per process and a counter (uuid4 per request read /dev/urandom)
        self._id_prefix = uuid.uuid4().hex[:20]
        self._ids = itertools.count()
        self.requests = 0
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        for b in self.batchers.values():
            b.start()
        await asyncio.get_running_loop().run_in_executor(None, self.manager.start)
        self.prediction_log.start()
        self.feedback_log.start()
        settle_heap()  # the loaded libraries frozen out of the collector's walks (pipelines.runtime)

    async def shutdown(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=10)
        for b in self.batchers.values():
            await b.stop()
        self.manager.stop()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.prediction_log.stop)
        await loop.run_in_executor(None, self.feedback_log.stop)

    # -- auth -------------------------------------------------------------------------------------
    @staticmethod
    def _token_ok(request: Request, token) -> bool:
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:], token.get_secret_value())

    def _admin_denied(self, request: Request) -> Response | None:
        if self.cfg.admin_token is None:
            return _error(503, "admin endpoints are disabled: set PLATFORM_SERVING_ADMIN_TOKEN")
        if not self._token_ok(request, self.cfg.admin_token):
            return _error(401, "missing or wrong admin token (Authorization: Bearer <token>)")
        return None

    def body_limit(self) -> int:
        """Bytes a body may have: configured, or room for ``max_records_per_request`` records of the
        loaded model's features written with full-precision floats (and for as many feedback labels)."""
        if self.cfg.max_body_bytes:
            return self.cfg.max_body_bytes
        columns = self.manager.feature_columns()
        if self._body_limit[0] is not columns:  # computed once per set of loaded models
            names = columns or [""] * DEFAULT_FEATURES
            record = RECORD_BYTES + sum(len(c) + FIELD_BYTES for c in names)
            self._body_limit = (columns, max(record, LABEL_BYTES * 10) * self.cfg.max_records_per_request + 4096)
        return self._body_limit[1]

    async def _read_body(self, request: Request) -> tuple[bytes, Response | None]:
        return await read_limited_body(request, self.body_limit(), self.cfg.body_timeout_seconds)

    async def _read_json(self, request: Request) -> tuple[Any, Response | None]:
        if self.cfg.scoring_token is not None and not self._token_ok(request, self.cfg.scoring_token):
            return None, _error(401, "missing or wrong token (Authorization: Bearer <token>)")
        body, err = await self._read_body(request)
        if err:
            return None, err
        try:
            return orjson.loads(body), None
        except orjson.JSONDecodeError as exc:
            return None, _validation_error([{"loc": ["body"], "msg": f"invalid JSON: {exc}", "type": "json_invalid"}])

    # -- scoring ----------------------------------------------------------------------------------
    async def score(self, request: Request) -> Response:
        t0 = time.perf_counter()
        now = time.time()
        body, err = await self._read_json(request)
        if err:
            return err
        champion = self.manager.get("champion")
        if champion is None:
            return _error(503, "no champion model loaded yet; see /health")
        records, errors = validate_records(
            body, self.manager.feature_columns(), self.cfg.max_records_per_request, self.cfg.max_abs_feature
        )
        if errors:
            return _validation_error(errors)
        request_id = body.get("request_id") if isinstance(body.get("request_id"), str) else None
        request_id = request_id or f"{self._id_prefix}{next(self._ids):012x}"
        self.requests += 1

        rollout = self.manager.rollout
        active = (
            rollout is not None
            and rollout.active
            and rollout.model_name == self.manager.model_name
            and self.manager.get("challenger") is not None
        )
        weight, shadow, rid, step = (
            (rollout.weight, rollout.shadow, rollout.rollout_id, rollout.step_name) if active else (0, "none", "", "")
        )
        roles = [route(r["device"], weight, rid) for r in records] if weight else ["champion"] * len(records)
        groups: dict[str, list[int]] = {}
        for i, role in enumerate(roles):
            groups.setdefault(role, []).append(i)

        log_rows: list[dict] = []
        answers: list[dict | None] = [None] * len(records)
        model_name = self.manager.model_name

        def add_rows(role, idx, result, served, error, elapsed, into=log_rows):
            for j, i in enumerate(idx):
                score = None if result is None else float(result.scores[j])
                into.append(
                    {
                        "request_id": request_id,
                        "record_index": i,
                        "ts": now,
                        "device": records[i]["device"],
                        "role": role,
                        "served": served,
                        "model_version": result.version if result else None,
                        "score": score,
                        "flagged": None if score is None else bool(score >= result.threshold),
                        "latency_ms": elapsed * 1000,
                        "compute_ms": None if result is None else result.compute_ms,
                        "error": error,
                        "rollout_id": rid,
                        "step": step,
                        "model_name": model_name,
                    }
                )

        async def run(role: str, idx: list[int]):
            try:
                res = await self.batchers[role].score([records[i] for i in idx])
                return role, idx, res, None, time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - logged as this model's error
                return role, idx, None, f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - t0

        if len(groups) == 1:  # the usual case: no task and gather per request
            outcomes = [await run(*next(iter(groups.items())))]
        else:
            outcomes = await asyncio.gather(*(run(role, idx) for role, idx in groups.items()))
        fallback: list[int] = []
        for role, idx, res, error, elapsed in outcomes:
            add_rows(role, idx, res, res is not None, error, elapsed)
            if res is None:
                if role == "champion":
                    return _error(503, f"champion failed to score: {error}", request_id=request_id)
                fallback = idx  # the challenger failed: the champion answers, the error is on record
                continue
            for j, i in enumerate(idx):
                s = float(res.scores[j])
                answers[i] = {
                    "score": s,
                    "anomaly": s >= res.threshold,
                    "model_version": res.version,
                    "role": role,
                }
        if fallback:
            _, idx, res, error, elapsed = await run("champion", fallback)
            if res is None:
                return _error(503, f"champion failed to score: {error}", request_id=request_id)
            add_rows("champion", idx, res, True, None, elapsed)
            for j, i in enumerate(idx):
                s = float(res.scores[j])
                answers[i] = {
                    "score": s,
                    "anomaly": s >= res.threshold,
                    "model_version": res.version,
                    "role": "champion",
                }

        # Shadow: a copy scored off the response path; its rows are logged with served=False.
        if shadow == "challenger":
            self._shadow("challenger", list(range(len(records))), records, add_rows)
        elif shadow == "champion":
            idx = groups.get("challenger", [])
            if idx:
                self._shadow("champion", idx, records, add_rows)
        self.prediction_log.append(log_rows)
        self.scored.add(request_id, len(records))
        return _json({"request_id": request_id, "predictions": answers})

    def _shadow(self, role, idx, records, add_rows) -> None:
        async def shadow_task():
            # timed from the shadow's own start: timed from the request's, the copy would be charged
            # for the served answer it waited behind, and a good shadowed model would look slow
            started = time.perf_counter()
            try:
                res, error = await self.batchers[role].score([records[i] for i in idx]), None
            except Exception as exc:  # noqa: BLE001 - this model's error, on record
                res, error = None, f"{type(exc).__name__}: {exc}"[:300]
            rows: list[dict] = []
            add_rows(role, idx, res, False, error, time.perf_counter() - started, into=rows)
            self.prediction_log.append(rows)

        task = asyncio.get_running_loop().create_task(shadow_task())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- feedback ---------------------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        body, err = await self._read_json(request)
        if err:
            return err
        labels = body.get("labels") if isinstance(body, dict) else None
        if not isinstance(labels, list) or not labels:
            return _validation_error(
                [{"loc": ["body", "labels"], "msg": "expected a non-empty list", "type": "missing"}]
            )
        if len(labels) > self.cfg.max_records_per_request * 10:
            return _validation_error([{"loc": ["body", "labels"], "msg": "too many labels; split", "type": "too_long"}])
        rows, errors = [], []
        now = time.time()
        for i, lab in enumerate(labels):
            ok = (
                isinstance(lab, dict)
                and isinstance(lab.get("request_id"), str)
                and lab.get("is_anomaly") in (0, 1, True, False)
                and isinstance(lab.get("record_index", 0), int)
            )
            if not ok:
                errors.append(
                    {
                        "loc": ["body", "labels", i],
                        "type": "value_error",
                        "msg": "expected {request_id: str, record_index: int (default 0), is_anomaly: 0|1}",
                    }
                )
                continue
            rows.append(
                {
                    "request_id": lab["request_id"],
                    "record_index": int(lab.get("record_index", 0)),
                    "is_anomaly": int(lab["is_anomaly"]),
                    "ts": now,
                }
            )
        if errors:
            return _validation_error(errors)
        unknown, repeated, seen = [], [], set()
        for i, row in enumerate(rows):
            rid, index = row["request_id"], row["record_index"]
            count = self.scored.records(rid)
            if count is None or not 0 <= index < count:
                unknown.append({"loc": ["body", "labels", i], "request_id": rid, "record_index": index})
            elif self.scored.labelled(rid, index) or (rid, index) in seen:
                repeated.append({"loc": ["body", "labels", i], "request_id": rid, "record_index": index})
            seen.add((rid, index))
        if unknown:
            return _error(
                404,
                f"{len(unknown)} label(s) name a prediction this service did not make (unknown request id or "
                f"record index; it remembers the last {self.scored.capacity} requests): nothing accepted",
                labels=unknown[:MAX_REPORTED_ERRORS],
            )
        if repeated:
            return _error(
                409,
                f"{len(repeated)} label(s) for records already labelled (one label per record): nothing accepted",
                labels=repeated[:MAX_REPORTED_ERRORS],
            )
        for row in rows:
            self.scored.mark(row["request_id"], row["record_index"])
        self.feedback_log.append(rows)
        return _json({"accepted": len(rows)})

    # -- health and admin ---------------------------------------------------------------------------
    def health_body(self) -> dict:
        problems = dict(self.manager.problems)
        for writer in (self.prediction_log, self.feedback_log):
            if writer.last_error:
                problems[f"{writer.table}_log"] = f"{writer.last_error} ({writer.pending} rows buffered)"
        champion = self.manager.get("champion")
        status = "unavailable" if champion is None else ("degraded" if problems else "ok")
        return {
            "status": status,
            "models": {r: (m.version if m else None) for r, m in self.manager.models.items()},
            "problems": problems,
        }

    async def health(self, request: Request) -> Response:
        body = self.health_body()
        return _json(body, 503 if body["status"] == "unavailable" else 200)

    async def status(self, request: Request) -> Response:
        rollout = self.manager.rollout
        return _json(
            {
                **self.health_body(),
                "model_name": self.manager.model_name,
                "rollout": None
                if rollout is None
                else {
                    k: getattr(rollout, k)
                    for k in (
                        "status",
                        "rollout_id",
                        "step_name",
                        "weight",
                        "shadow",
                        "champion_version",
                        "challenger_version",
                    )
                },
                "requests": self.requests,
                "body_limit_bytes": self.body_limit(),
                "batches": {r: {"batches": b.batches, "rows": b.rows} for r, b in self.batchers.items()},
                "prediction_log": {
                    "written": self.prediction_log.written_rows,
                    "pending": self.prediction_log.pending,
                    "dropped": self.prediction_log.dropped_rows,
                },
                "last_poll": self.manager.last_poll,
                "gc": GC_PAUSES.summary(),
            }
        )

    async def admin_weight(self, request: Request) -> Response:
        if denied := self._admin_denied(request):
            return denied
        try:
            body = orjson.loads(await request.body())
            weight = int(body["weight"])
            shadow = body.get("shadow")
            reason = str(body.get("reason") or "set by admin endpoint")
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
            return _validation_error(
                [
                    {
                        "loc": ["body"],
                        "type": "value_error",
                        "msg": "expected {weight: 0..100, shadow?: none|challenger|champion, reason}",
                    }
                ]
            )
        from pipelines.canary import controller

        try:
            state = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: controller.set_weight(
                    weight,
                    shadow,
                    actor=f"serving-admin@{request.client.host if request.client else '?'}",
                    reason=reason,
                    store=self.store,
                ),
            )
        except ValueError as exc:
            return _error(409, str(exc))
        self.manager.rollout = state
        return _json({"weight": state.weight, "shadow": state.shadow, "rollout_id": state.rollout_id})

    async def admin_reload(self, request: Request) -> Response:
        if denied := self._admin_denied(request):
            return denied
        await asyncio.get_running_loop().run_in_executor(None, self.manager.poll_once)
        return _json(self.health_body())

    async def admin_flush(self, request: Request) -> Response:
        if denied := self._admin_denied(request):
            return denied
        loop = asyncio.get_running_loop()
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
        written = await loop.run_in_executor(None, self.prediction_log.flush)
        written += await loop.run_in_executor(None, self.feedback_log.flush)
        return _json({"written": written, "pending": self.prediction_log.pending + self.feedback_log.pending})


def create_app(settings=None, cfg: ServingSettings | None = None, store=None) -> Starlette:
    from pipelines.serving.config import serving_settings
    from pipelines.serving.predlog import lake_store
    from pipelines.settings import get_settings, load_params

    # The registry client must fail fast when MLflow is down (its default retries take minutes).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    settings = settings or get_settings()
    cfg = cfg or serving_settings(load_params(settings.params_file))
    store = store or lake_store(settings, cfg.s3_timeout_seconds)
    service = ScoringService(settings, cfg, store)
    metrics.watch_models(service.manager)  # versions and canary stage, read at scrape time
    from pipelines.images.serving import ImageClassifyService

    images = ImageClassifyService(settings, cfg, store)  # POST /classify: the image model, same aliases/canary

    @asynccontextmanager
    async def lifespan(app):
        await service.startup()
        await images.startup()
        try:
            yield
        finally:
            await images.shutdown()
            await service.shutdown()

    app = Starlette(
        routes=[
            # counted by status and timed outside the handlers (pipelines.metrics.instrumented)
            Route("/score", metrics.instrumented(service.score, "score"), methods=["POST"]),
            Route("/feedback", metrics.instrumented(service.feedback, "feedback"), methods=["POST"]),
            Route("/health", service.health, methods=["GET"]),
            Route("/status", service.status, methods=["GET"]),
            Route("/metrics", metrics.metrics_endpoint, methods=["GET"]),
            Route("/admin/weight", service.admin_weight, methods=["POST"]),
            Route("/admin/reload", service.admin_reload, methods=["POST"]),
            Route("/admin/flush", service.admin_flush, methods=["POST"]),
            *images.routes(),
        ],
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.images = images
    return app


def run(host: str | None = None, port: int | None = None) -> None:
    """Serve until interrupted (``platform serve``)."""
    import uvicorn

    from pipelines.services import verify_own_stack
    from pipelines.serving.config import serving_settings
    from pipelines.settings import get_settings, load_params

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    # The stack's endpoints come from the settings, as for every other command: checked to be the
    # stack `platform up` started, and exported, so no library falls back to a default of its own
    # (MLflow's client would create ./mlflow.db and the service would answer 503 for ever).
    verify_own_stack(settings)
    os.environ.update(settings.client_env())
    cfg = serving_settings(load_params(settings.params_file))
    app = create_app(settings, cfg)
    uvicorn.run(
        app,
        host=host or cfg.host,
        port=port or cfg.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
