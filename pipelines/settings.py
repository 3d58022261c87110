"""The one reader of the environment: every endpoint, bucket and secret of the platform.

Variable names are the ones the S3 ecosystem already reads (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), so boto3, MLflow's artifact client, DVC and
pyarrow all talk to MinIO / the embedded store with no extra configuration, and
docker-compose.yml passes the same names to every container.

Precedence: process environment > `.env` in the working directory > the state directory's
`stack.env`, which `platform up` writes (generated credentials and chosen ports), so any
process started with PLATFORM_STATE_DIR pointing at a running stack finds it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_state_dir() -> Path:
    return Path(os.environ.get("PLATFORM_STATE_DIR", REPO_ROOT / ".platform")).resolve()


class StreamSettings(BaseModel):
    """The live path's settings: variables PLATFORM_STREAM_<FIELD> (read by `load_settings` with the
    same precedence as every other setting: environment > ./.env > the stack's stack.env)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

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
    # CPU priority follows the latency budgets: a reading has 5 s to reach bronze but 250 ms to its
    # alert, so the ingester's threads yield to the scorer process when both want a core (nice +N;
    # any core the scorer leaves idle the ingester still gets). 0: equal.
    ingest_nice: int = Field(5, ge=0, le=19)
    # Devices allowed to report (comma-separated); empty: any device the broker lets publish.
    known_devices: str = ""

    # -- online scoring and alerts ---------------------------------------------------------------
    scoring: bool = True  # off: ingest only (no model needed)
    # A scoring pass starts at most this often. A pass has a fixed cost (silver's and the model's
    # calls, ~10-20 ms) besides its per-reading one, so a scorer that started a pass whenever a
    # reading waited would keep a core busy at any rate and starve the ingester on a small machine;
    # waiting collects the readings of the interval into one pass. 0: a pass whenever readings wait.
    score_interval_seconds: float = Field(0.03, ge=0, le=5)
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


STREAM_PREFIX = "PLATFORM_STREAM_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    state_dir: Path = Field(default_factory=default_state_dir, validation_alias="PLATFORM_STATE_DIR")

    # Object store (MinIO in docker-compose, SeaweedFS `weed mini` embedded).
    s3_endpoint_url: str = Field(
        "http://127.0.0.1:9000",
        validation_alias=AliasChoices("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"),
    )
    s3_access_key: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    s3_secret_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    s3_region: str = Field("us-east-1", validation_alias="AWS_DEFAULT_REGION")
    landing_bucket: str = Field("landing", validation_alias="PLATFORM_LANDING_BUCKET")
    lake_bucket: str = Field("lake", validation_alias="PLATFORM_LAKE_BUCKET")
    mlflow_bucket: str = Field("mlflow", validation_alias="PLATFORM_MLFLOW_BUCKET")

    # MLflow: the tracking server URI for clients; the backend store for the server we run.
    mlflow_tracking_uri: str = Field("http://127.0.0.1:5000", validation_alias="MLFLOW_TRACKING_URI")
    mlflow_backend_store_uri: str | None = Field(None, validation_alias="MLFLOW_BACKEND_STORE_URI")
    mlflow_experiment: str = Field("iot-anomaly", validation_alias="PLATFORM_MLFLOW_EXPERIMENT")
    # MLflow's basic-auth: this process's own identity, in the names MLflow's client reads. The
    # embedded stack's operator is the server's admin; each service of docker-compose has its own.
    mlflow_username: str | None = Field(None, validation_alias="MLFLOW_TRACKING_USERNAME")
    mlflow_password: SecretStr | None = Field(None, validation_alias="MLFLOW_TRACKING_PASSWORD")
    # The admin the server creates on its first start (MLflow's own variable); `platform up` only.
    mlflow_admin_password: SecretStr | None = Field(None, validation_alias="MLFLOW_AUTH_ADMIN_PASSWORD")
    # One MLflow user per role (MLFLOW_ROLES), each with only the permissions its job needs. An
    # Airflow process holds the trainer's, gate's and canary's: a task acts as the role of its task.
    mlflow_trainer_password: SecretStr | None = Field(None, validation_alias="PLATFORM_MLFLOW_TRAINER_PASSWORD")
    mlflow_gate_password: SecretStr | None = Field(None, validation_alias="PLATFORM_MLFLOW_GATE_PASSWORD")
    mlflow_canary_password: SecretStr | None = Field(None, validation_alias="PLATFORM_MLFLOW_CANARY_PASSWORD")
    mlflow_scoring_password: SecretStr | None = Field(None, validation_alias="PLATFORM_MLFLOW_SCORING_PASSWORD")

    # Airflow: metadata DB (SQLite by default, Postgres when configured) and its UI port.
    airflow_db_uri: str | None = Field(None, validation_alias="AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    airflow_port: int = Field(8080, validation_alias="PLATFORM_AIRFLOW_PORT")

    # Embedded object store's own ports (weed mini opens several; all loopback).
    s3_base_port: int = Field(0, validation_alias="PLATFORM_S3_BASE_PORT")

    dataset: str = Field("iot_telemetry", validation_alias="PLATFORM_DATASET")
    # A folder of the user's own contracts: each file is a dataset beside the packaged ones.
    contracts_dir: Path | None = Field(None, validation_alias="PLATFORM_CONTRACTS_DIR")
    params_file: Path = Field(REPO_ROOT / "params.yaml", validation_alias="PLATFORM_PARAMS_FILE")

    # The live path (MQTT broker, micro-batches, alerts, device state): PLATFORM_STREAM_<FIELD>.
    stream: StreamSettings = Field(default_factory=StreamSettings)

    # --- derived -------------------------------------------------------------------------
    @property
    def airflow_home(self) -> Path:
        return Path(os.environ.get("AIRFLOW_HOME", self.state_dir / "airflow"))

    @property
    def airflow_sql_alchemy_conn(self) -> str:
        return self.airflow_db_uri or f"sqlite:///{self.state_dir / 'airflow' / 'airflow.db'}"

    @property
    def mlflow_backend_uri(self) -> str:
        return self.mlflow_backend_store_uri or f"sqlite:///{self.state_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> str:
        return f"s3://{self.mlflow_bucket}/artifacts"

    def require_s3_credentials(self) -> tuple[str, str]:
        if not self.s3_access_key or not self.s3_secret_key:
            raise RuntimeError(
                "No object-store credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                f"(or run `platform up`, which writes them to {self.state_dir / 'stack.env'}). "
                "Anonymous access to the object store is refused by design."
            )
        return self.s3_access_key, self.s3_secret_key.get_secret_value()

    def mlflow_role_password(self, role: str) -> str | None:
        """The password of MLflow user `role` (one of MLFLOW_ROLES) if this process holds it."""
        secret = getattr(self, f"mlflow_{role}_password", None)
        return secret.get_secret_value() if secret else None

    def client_env(self) -> dict[str, str]:
        """Environment for child processes (MLflow, Airflow, DVC) so they reach the same stack."""
        access, secret = self.require_s3_credentials()
        env = {
            "PLATFORM_STATE_DIR": str(self.state_dir),
            "AWS_ENDPOINT_URL": self.s3_endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": self.s3_region,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
        }
        if self.mlflow_username and self.mlflow_password:
            env["MLFLOW_TRACKING_USERNAME"] = self.mlflow_username
            env["MLFLOW_TRACKING_PASSWORD"] = self.mlflow_password.get_secret_value()
        return env


# The MLflow users of the platform, one per role (pipelines.services.MLFLOW_ROLE_GRANTS says what each
# may do); the user name is the role's name. `admin` is the server's admin: the operator.
MLFLOW_ROLES = ("trainer", "gate", "canary", "scoring")


# Tasks of the training DAG that act as the gate. MLflow asks the same permission (EDIT on the
# registered model) to create a version as to move an alias, so registering is the gate's part too:
# the task that runs training code cannot touch a registered model.
GATE_TASKS = ("register", "gate")


def airflow_task_mlflow_role(dag_id: str, task_id: str) -> str:
    """The MLflow role an Airflow task acts as: the canary DAG's tasks as `canary`, the training DAG's
    register and offline-gate tasks as `gate` (the only ones that move aliases), all others as `trainer`."""
    if dag_id.endswith("_canary"):
        return "canary"
    if task_id.rsplit(".", 1)[-1] in GATE_TASKS:
        return "gate"
    return "trainer"


def _apply_mlflow_identity(settings: Settings, merged: dict[str, str]) -> Settings:
    """MLflow's client reads its credentials from the environment only, at every request, so the
    process's identity is exported there (never overriding one set explicitly).

    Inside an Airflow task of a process that acts as a platform role (not as the admin), the identity
    is the task's role (`airflow_task_mlflow_role`), re-chosen at each task: one `airflow dags test`
    process runs the trainer's, the gate's and the canary's tasks in turn."""
    dag_id, task_id = merged.get("AIRFLOW_CTX_DAG_ID"), merged.get("AIRFLOW_CTX_TASK_ID")
    if dag_id and task_id and settings.mlflow_username in MLFLOW_ROLES:
        role = airflow_task_mlflow_role(dag_id, task_id)
        password = settings.mlflow_role_password(role)
        if password:
            os.environ["MLFLOW_TRACKING_USERNAME"] = role
            os.environ["MLFLOW_TRACKING_PASSWORD"] = password
            return settings.model_copy(update={"mlflow_username": role, "mlflow_password": SecretStr(password)})
    if settings.mlflow_username and settings.mlflow_password and "MLFLOW_TRACKING_USERNAME" not in os.environ:
        os.environ["MLFLOW_TRACKING_USERNAME"] = settings.mlflow_username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = settings.mlflow_password.get_secret_value()
    return settings


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def load_settings() -> Settings:
    """Settings from env > ./.env > <state_dir>/stack.env (no caching)."""
    state_dir = default_state_dir()
    merged: dict[str, str] = {}
    merged.update(read_env_file(state_dir / "stack.env"))
    merged.update(read_env_file(Path.cwd() / ".env"))
    merged.update({k: v for k, v in os.environ.items()})
    fields = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else [name]
        for n in names:
            if n in merged:
                fields[n] = merged[n]
                break
    stream = {k[len(STREAM_PREFIX) :].lower(): v for k, v in merged.items() if k.startswith(STREAM_PREFIX)}
    unknown = sorted(set(stream) - set(StreamSettings.model_fields))
    if unknown:
        raise ValueError(
            f"unknown stream setting(s) {', '.join(STREAM_PREFIX + u.upper() for u in unknown)}: "
            f"known are {', '.join(STREAM_PREFIX + f.upper() for f in StreamSettings.model_fields)}"
        )
    fields["stream"] = StreamSettings.model_validate(stream)
    return _apply_mlflow_identity(Settings.model_validate(fields), merged)


def get_settings() -> Settings:
    """Fresh settings each call: cheap, and a test or CLI that changes the environment is honoured."""
    return load_settings()


_params_cache: dict[str, tuple[tuple[int, int, int], dict]] = {}


def load_params(path: Path | None = None) -> dict:
    """params.yaml: the one parameter file shared by Airflow, the CLI and DVC.

    Parsed once per file version (path, mtime, size): a lake task asks for it once per device
    bucket, and YAML parsing was ~45 ms a call. Each caller gets its own copy to change."""
    import copy

    import yaml

    path = Path(path or get_settings().params_file)
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    cached = _params_cache.get(str(path))
    if cached is None or cached[0] != version:
        with open(path) as f:
            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            cached = (version, yaml.load(f, Loader=loader) or {})  # noqa: S506 - a safe loader
        _params_cache[str(path)] = cached
    return copy.deepcopy(cached[1])
