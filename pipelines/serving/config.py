"""The service's own settings: env vars with prefix PLATFORM_SERVING_ over params.yaml ``serving``.

Endpoints and credentials of the stack (MLflow, the object store) come from pipelines.settings.
"""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLATFORM_SERVING_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8700
    model_name: str | None = None  # default: params.yaml registry.model_name
    # Admin endpoints (weights, reload) refuse every call until a token is configured.
    admin_token: SecretStr | None = None
    # When set, /score and /feedback also need `Authorization: Bearer <token>`.
    scoring_token: SecretStr | None = None
    max_records_per_request: int = 1000
    # None: sized from max_records_per_request and the model's features (body_limit in app.py), so
    # the documented record maximum fits with full-precision floats. Refused as the bytes arrive.
    max_body_bytes: int | None = None
    # A body not complete this long after its headers: 408 and the connection closed (slow clients
    # would otherwise hold a connection and its buffer for ever).
    body_timeout_seconds: float = 10.0
    # A feature beyond +-this is not a reading (1e308, an overflowed sensor): 422 naming the field.
    max_abs_feature: float = 1e9
    # /feedback labels only request ids this service scored: the last this many are remembered.
    feedback_known_requests: int = 500_000
    max_batch_rows: int = 1024
    batch_wait_ms: float = 0.0  # extra wait to fill a batch; 0 = take what queued during the last predict
    poll_seconds: float = 10.0  # registry aliases and rollout state
    log_flush_seconds: float = 5.0
    log_flush_rows: int = 20_000
    log_buffer_max_rows: int = 2_000_000  # kept while the object store is down; oldest dropped beyond
    s3_timeout_seconds: float = 5.0


def serving_settings(params: dict | None = None) -> ServingSettings:
    """Env (PLATFORM_SERVING_*) wins over params.yaml ``serving``, which wins over the defaults."""
    settings = ServingSettings()
    for key, value in ((params or {}).get("serving", {}) or {}).items():
        if key in ServingSettings.model_fields and key not in settings.model_fields_set:
            setattr(settings, key, value)
    if settings.model_name is None:
        # the dataset the service scores (PLATFORM_DATASET): its own registered model
        from pipelines.datasets import get_dataset
        from pipelines.settings import get_settings

        settings.model_name = get_dataset(get_settings().dataset).model_name
    return settings
