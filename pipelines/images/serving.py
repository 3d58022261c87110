"""``POST /classify``: an uploaded photo classified by the image model's champion (or challenger).

Mounted in the scoring service (``pipelines/serving/app.py``) beside ``/score`` and served through
the same machinery: the registry's aliases loaded and hot-swapped by ``ModelManager`` (skops with
trusted types only), the same rollout state (``platform canary``'s weight and shadow, per registered
model), sticky routing by a client key (``X-Client-Id`` header or ``client`` form field; the image's
content hash if neither: the same photo always meets the same model), a shadow copy scored off the
response path, and a prediction log in the lake (``image_predictions/date=<d>/``).

The upload is decoded by silver's own function (EXIF orientation, RGB, centre-fit to the size the
model's input names, ``rgb_<w>x<h>``), so a served photo is preprocessed exactly as training's were.
Send it as the raw body (``Content-Type: image/jpeg``...) or as a multipart form field ``image``.

Settings: ``PLATFORM_SERVING_IMAGE_MODEL`` (the registered classifier; unset: /classify answers 503
saying so), ``PLATFORM_SERVING_IMAGE_MAX_BYTES`` (default 10 MB).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipelines.images.contract import parse_input_name
from pipelines.images.decode import Decoded, decode_image

log = logging.getLogger("pipelines.serving")
IMAGE_PREDICTIONS = "image_predictions"
IMAGE_PREDICTION_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("client", pa.string()),
        ("content_sha256", pa.string()),
        ("model_name", pa.string()),
        ("role", pa.string()),
        ("served", pa.bool_()),
        ("model_version", pa.string()),
        ("label", pa.string()),
        ("confidence", pa.float64()),
        ("latency_ms", pa.float64()),
        ("compute_ms", pa.float64()),
        ("error", pa.string()),
        ("rollout_id", pa.string()),
        ("step", pa.string()),
    ]
)
TOP_K = 3


class ImageServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLATFORM_SERVING_IMAGE_", extra="ignore")

    model: str | None = None  # the registered image classifier served by /classify
    max_bytes: int = 10_000_000


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json")


def _error(status: int, message: str, **extra: Any) -> Response:
    return _json({"detail": message, **extra}, status)


def classify_pixels(estimator: Any, decoded: Decoded) -> tuple[str, float, list[dict], float]:
    """(label, confidence, top-k, CPU ms) of one decoded image with a loaded classifier Pipeline."""
    started = time.thread_time()
    row = np.frombuffer(decoded.pixels, dtype=np.uint8).reshape(1, -1)
    proba = np.asarray(estimator.predict_proba(row))[0]
    classes = [str(c) for c in estimator.classes_]
    order = np.argsort(-proba)[:TOP_K]
    top = [{"label": classes[i], "p": float(proba[i])} for i in order]
    return top[0]["label"], top[0]["p"], top, (time.thread_time() - started) * 1000.0


class ImageClassifyService:
    """The /classify endpoint; started and stopped with the scoring service's lifespan."""

    def __init__(self, settings, cfg, store, image_cfg: ImageServingSettings | None = None):
        from pipelines.serving.models import ModelManager
        from pipelines.serving.predlog import LakeTableWriter

        self.cfg = cfg
        self.image_cfg = image_cfg or ImageServingSettings()
        self.model_name = self.image_cfg.model
        self.manager = ModelManager(settings, self.model_name, cfg.poll_seconds, store) if self.model_name else None
        self.prediction_log = LakeTableWriter(
            store,
            IMAGE_PREDICTIONS,
            IMAGE_PREDICTION_SCHEMA,
            cfg.log_flush_seconds,
            cfg.log_flush_rows,
            cfg.log_buffer_max_rows,
        )
        # one predict at a time, off the event loop (a PCA projection of one image: ~1 ms)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict-images")
        self._background: set[asyncio.Task] = set()
        self.requests = 0

    async def startup(self) -> None:
        if self.manager is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, self.manager.start)
        self.prediction_log.start()

    async def shutdown(self) -> None:
        if self.manager is None:
            return
        if self._background:
            await asyncio.wait(self._background, timeout=10)
        self.manager.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.prediction_log.stop)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def routes(self) -> list[Route]:
        return [
            Route("/classify", self.classify, methods=["POST"]),
            Route("/classify/status", self.status, methods=["GET"]),
        ]

    # -- request ------------------------------------------------------------------------------------
    def _denied(self, request: Request) -> Response | None:
        token = self.cfg.scoring_token
        if token is None:
            return None
        got = request.headers.get("authorization", "")
        if got.startswith("Bearer ") and hmac.compare_digest(got[7:], token.get_secret_value()):
            return None
        return _error(401, "missing or wrong token (Authorization: Bearer <token>)")

    async def _read_upload(self, request: Request) -> tuple[bytes | None, str | None, Response | None]:
        limit = self.image_cfg.max_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return (
                None,
                None,
                _error(413, f"upload of {length} bytes > the limit of {limit} (PLATFORM_SERVING_IMAGE_MAX_BYTES)"),
            )
        ctype = request.headers.get("content-type", "")
        client = request.headers.get("x-client-id")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=5, max_part_size=limit)
            upload = form.get("image") or form.get("file")
            if upload is None or isinstance(upload, str):
                return None, None, _error(422, "multipart upload without a file field 'image'")
            data = await upload.read()
            field = form.get("client")
            client = client or (field if isinstance(field, str) else None)
        else:  # refused as it arrives past the limit, never held in full first (/score's own reader)
            from pipelines.serving.app import read_limited_body

            data, refused = await read_limited_body(request, limit, self.cfg.body_timeout_seconds, what="upload")
            if refused is not None:
                return None, None, refused
        if not data:
            return None, None, _error(422, "empty upload: send an image as the body or as the form field 'image'")
        if len(data) > limit:
            return None, None, _error(413, f"upload of {len(data)} bytes > the limit of {limit}")
        return data, client, None

    async def _predict(self, model, data: bytes) -> tuple[dict | None, str | None]:
        """One model's answer for the upload, or the error (a model's failure is logged, not raised)."""
        try:
            width, height = parse_input_name(model.columns[0])
            decoded = decode_image(data, width, height)
            if not isinstance(decoded, Decoded):
                return None, f"rejected:{decoded.rule}:{decoded.reason}:{decoded.fix}"
            label, confidence, top, compute_ms = await asyncio.get_running_loop().run_in_executor(
                self._executor, classify_pixels, model.estimator, decoded
            )
            return {"label": label, "confidence": confidence, "top": top, "compute_ms": compute_ms}, None
        except Exception as exc:  # noqa: BLE001 - this model's error, on record
            return None, f"{type(exc).__name__}: {exc}"[:300]

    async def classify(self, request: Request) -> Response:
        t0 = time.perf_counter()
        now = time.time()
        if denied := self._denied(request):
            return denied
        if self.manager is None:
            return _error(
                503, "no image model is served: set PLATFORM_SERVING_IMAGE_MODEL to a registered image classifier"
            )
        champion = self.manager.get("champion")
        if champion is None:
            return _error(503, f"no champion of {self.model_name} loaded yet; see /health")
        data, client, err = await self._read_upload(request)
        if err:
            return err
        assert data is not None
        digest = hashlib.sha256(data).hexdigest()
        key = client or digest
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.requests += 1

        from pipelines.serving.routing import route

        rollout = self.manager.rollout
        active = (
            rollout is not None
            and rollout.active
            and rollout.model_name == self.model_name
            and self.manager.get("challenger") is not None
        )
        weight, shadow, rid, step = (
            (rollout.weight, rollout.shadow, rollout.rollout_id, rollout.step_name) if active else (0, "none", "", "")
        )
        role = route(key, weight, rid) if weight else "champion"

        def log_row(role_: str, model, answer: dict | None, error: str | None, served: bool, elapsed: float) -> dict:
            return {
                "request_id": request_id,
                "ts": now,
                "client": key[:200],
                "content_sha256": digest,
                "model_name": self.model_name,
                "role": role_,
                "served": served,
                "model_version": model.version if model else None,
                "label": answer["label"] if answer else None,
                "confidence": answer["confidence"] if answer else None,
                "latency_ms": elapsed * 1000,
                "compute_ms": answer["compute_ms"] if answer else None,
                "error": error,
                "rollout_id": rid,
                "step": step,
            }

        rows: list[dict] = []
        model = self.manager.get(role) or champion
        answer, error = await self._predict(model, data)
        rows.append(log_row(role, model, answer, error, answer is not None, time.perf_counter() - t0))
        if answer is None and error and error.startswith("rejected:"):
            self.prediction_log.append(rows)
            _, rule, reason, fix = error.split(":", 3)
            return _error(422, f"not a usable image ({rule}): {reason}; {fix}", rule=rule, request_id=request_id)
        if answer is None and role == "challenger":  # the champion answers; the challenger's error is on record
            role, model = "champion", champion
            answer, error = await self._predict(model, data)
            rows.append(log_row(role, model, answer, error, answer is not None, time.perf_counter() - t0))
        if answer is None:
            self.prediction_log.append(rows)
            return _error(503, f"{role} failed to classify: {error}", request_id=request_id)
        self.prediction_log.append(rows)

        other = (
            "challenger"
            if shadow == "challenger"
            else ("champion" if shadow == "champion" and role == "challenger" else None)
        )
        if other is not None and self.manager.get(other) is not None:
            self._shadow(other, data, log_row)
        return _json(
            {
                "request_id": request_id,
                "label": answer["label"],
                "confidence": answer["confidence"],
                "top": answer["top"],
                "model_name": self.model_name,
                "model_version": model.version,
                "role": role,
            }
        )

    def _shadow(self, role: str, data: bytes, log_row) -> None:
        async def shadow_task():
            started = time.perf_counter()
            model = self.manager.get(role)
            answer, error = await self._predict(model, data)
            self.prediction_log.append([log_row(role, model, answer, error, False, time.perf_counter() - started)])

        task = asyncio.get_running_loop().create_task(shadow_task())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def status(self, request: Request) -> Response:
        if self.manager is None:
            return _json({"model_name": None, "detail": "PLATFORM_SERVING_IMAGE_MODEL is not set"})
        rollout = self.manager.rollout
        return _json(
            {
                "model_name": self.model_name,
                "models": {r: (m.version if m else None) for r, m in self.manager.models.items()},
                "problems": dict(self.manager.problems),
                "rollout": None
                if rollout is None
                else {"status": rollout.status, "weight": rollout.weight, "shadow": rollout.shadow},
                "requests": self.requests,
                "prediction_log": {"written": self.prediction_log.written_rows, "pending": self.prediction_log.pending},
            }
        )

    async def flush(self) -> int:
        if self._background:
            await asyncio.wait(set(self._background), timeout=10)
        return await asyncio.get_running_loop().run_in_executor(None, self.prediction_log.flush)


def read_image_predictions(store, since, until=None):
    """Rows of ``image_predictions`` written for the days from ``since`` to ``until`` (the canary's
    reader; a part written by an older service reads its missing columns as nulls)."""
    from datetime import UTC, datetime

    import pandas as pd

    from pipelines.serving.predlog import _conform, _days

    until = until or datetime.now(UTC)
    bucket = store.settings.lake_bucket
    parts = [
        _conform(store.get_parquet(bucket, key), IMAGE_PREDICTION_SCHEMA)
        for day in _days(since, until)
        for key in store.list_keys(bucket, f"{IMAGE_PREDICTIONS}/date={day}/")
        if key.endswith(".parquet")
    ]
    if not parts:
        return IMAGE_PREDICTION_SCHEMA.empty_table().to_pandas()
    frame = pa.concat_tables(parts).to_pandas()
    return frame[frame["ts"] >= pd.Timestamp(since).tz_convert("UTC")].reset_index(drop=True)
