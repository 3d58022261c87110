"""The stream's settings: environment variables PLATFORM_STREAM_* (the only reader of them).

Endpoints of the object store and MLflow come from pipelines.settings, as for every other job.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class StreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PLATFORM_STREAM_", extra="ignore")

    # -- the broker ---------------------------------------------------------------------------
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    # Secrets may come as files instead (docker-compose mounts them under /run/secrets): a password
    # in a variable shows in `docker inspect`, one on a command line in `ps`.
    mqtt_password_file: Path | None = None
    # The session the broker keeps for us while we are away (QoS 1 messages queue under it): one
    # ingester per dataset, and a stable id, or a restart starts a new, empty session.
    client_id: str | None = None  # default: platform-ingester-<dataset>
    keepalive_seconds: int = 30

    # -- micro-batches to bronze -----------------------------------------------------------------
    batch_max_readings: int = 10_000  # a batch closes at this many messages ...
    batch_max_seconds: float = 1.0  # ... or this long after its first one, whichever comes first
    # Devices allowed to report (comma-separated); empty: any device the broker lets publish.
    known_devices: str = ""

    # -- online scoring and alerts ---------------------------------------------------------------
    scoring: bool = True  # off: ingest only (no model needed)
    model_poll_seconds: float = 30.0
    alerts_topic: str = "alerts"  # alerts/<dataset>/<device>
    commits_topic: str = "ingest"  # ingest/<dataset>/commits: one event per bronze commit

    # -- device state -------------------------------------------------------------------------------
    redis_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; none: kept in memory
    redis_password: SecretStr | None = None
    redis_password_file: Path | None = None
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # serve the device state over HTTP when set

    # -- telling Airflow ----------------------------------------------------------------------------
    airflow_api_url: str | None = None  # e.g. http://127.0.0.1:8080; none: no asset events
    airflow_username: str | None = None
    airflow_password: SecretStr | None = None
    airflow_password_file: Path | None = None
    notify_interval_seconds: float = 60.0  # touched partitions are coalesced into one event per interval

    def secret(self, name: str) -> str | None:
        """`<name>` (mqtt_password, redis_password, airflow_password) from its variable or its file."""
        value = getattr(self, name, None)
        if value is not None:
            return value.get_secret_value()
        path = getattr(self, f"{name}_file", None)
        if path is None:
            return None
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{name}_file={path}: cannot read it ({exc.strerror}); mount the secret there") from exc

    def device_allow_list(self) -> frozenset[str]:
        return frozenset(d.strip() for d in self.known_devices.split(",") if d.strip())

    def session_id(self, dataset: str) -> str:
        return self.client_id or f"platform-ingester-{dataset}"
