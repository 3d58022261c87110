"""docker-compose.yml, checked without a Docker engine: the Compose specification's JSON schema,
then that every command and variable is one the platform, Airflow, MLflow or the image reads.

The schema is vendored from the compose-spec repository (schema/compose-spec.json, Apache-2.0,
licence beside it) as shipped in check-jsonschema 0.39.0.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
POLICIES = REPO / "compose" / "minio" / "policies"
MINIO_INIT = REPO / "compose" / "minio" / "init.sh"
PG_INIT = REPO / "compose" / "postgres" / "init-databases.sh"

BUCKETS = {"landing", "lake", "mlflow", "dvc"}
AIRFLOW_COMPONENTS = {"api-server", "scheduler", "dag-processor", "triggerer"}
# Variables a third-party image or one of our init scripts reads (not the platform): name -> reader.
IMAGE_VARS = {
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    "redis": set(),
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MINIO_KMS_SECRET_KEY"},
    "grafana": {  # Grafana reads GF_<SECTION>_<KEY> (and <VAR>__FILE for secrets)
        "GF_SECURITY_ADMIN_USER",
        "GF_SECURITY_ADMIN_PASSWORD__FILE",
        "GF_AUTH_ANONYMOUS_ENABLED",
        "GF_USERS_ALLOW_SIGN_UP",
        "GF_ANALYTICS_REPORTING_ENABLED",
        "GF_ANALYTICS_CHECK_FOR_UPDATES",
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
    },
}
PROMETHEUS_CONFIG = REPO / "compose" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "compose" / "grafana"
SCRIPT_VARS = {  # service -> (script it runs, variables only that script reads)
    "postgres": (PG_INIT, {"PG_AIRFLOW_PASSWORD", "PG_MLFLOW_PASSWORD"}),
    "minio-init": (
        MINIO_INIT,
        {
            "MINIO_ROOT_USER",
            "MINIO_ROOT_PASSWORD",
            "S3_AIRFLOW_ACCESS_KEY",
            "S3_AIRFLOW_SECRET_KEY",
            "S3_MLFLOW_ACCESS_KEY",
            "S3_MLFLOW_SECRET_KEY",
            "S3_SCORING_ACCESS_KEY",
            "S3_SCORING_SECRET_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        },
    ),
    "airflow-init": (COMPOSE_FILE, {"AIRFLOW_ADMIN_PASSWORD"}),  # read by its own command
    "redis": (COMPOSE_FILE, {"REDIS_PASSWORD", "REDISCLI_AUTH"}),  # command and redis-cli
}


@pytest.fixture(scope="module")
def raw() -> str:
    return COMPOSE_FILE.read_text()


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return yaml.safe_load(raw)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _image_name(service: dict) -> str:
    return str(service.get("image", "")).split(":")[0].split("/")[-1]


def _platform_services(services: dict) -> dict:
    return {n: s for n, s in services.items() if s.get("image", "").startswith("iot-mlops-platform")}


# -- the Compose specification ---------------------------------------------------------------
def test_compose_file_matches_the_compose_specification(compose):
    schema = json.loads((HERE / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_every_reference_between_services_and_volumes_resolves(compose, services):
    volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repo"
            else:
                assert source in volumes, f"{name} uses volume {source!r}; declare it under volumes:"
    # every declared named volume is used by something
    used = {
        (m.split(":")[0] if isinstance(m, str) else m["source"])
        for s in services.values()
        for m in s.get("volumes") or []
    }
    assert volumes <= used, f"declared but unused volumes: {volumes - used}"


def test_dependency_conditions_are_ones_the_dependency_can_meet(services):
    one_shot = {n for n, s in services.items() if s.get("restart") == "no"}
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: give it a healthcheck"
            if condition == "service_completed_successfully":
                assert dep in one_shot, f"{name} waits for {dep} to complete, but {dep} is not a one-shot"
    # no cycles
    graph = {n: set((s.get("depends_on") or {}).keys()) for n, s in services.items()}
    seen: set[str] = set()

    def visit(n: str, path: tuple[str, ...]) -> None:
        assert n not in path, f"dependency cycle: {' -> '.join(path + (n,))}"
        if n in seen:
            return
        for d in graph[n]:
            visit(d, path + (n,))
        seen.add(n)

    for n in graph:
        visit(n, ())


def test_long_running_services_have_healthchecks_and_restart_policies(services):
    for name, svc in services.items():
        if svc.get("restart") == "no":
            continue
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        assert svc.get("restart") == "unless-stopped", f"{name} should restart unless stopped"


def test_images_are_pinned(services):
    for name, svc in services.items():
        image = svc.get("image", "")
        if image.startswith("iot-mlops-platform"):
            assert svc.get("build") == ".", f"{name} uses the platform image and must build it from the Dockerfile"
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


# -- the production topology the issue asks for ----------------------------------------------
def test_the_stack_has_every_production_component(services):
    commands = {n: _command(s) for n, s in services.items()}
    assert {"minio", "minio-init", "postgres", "redis", "mlflow", "scoring"} <= set(services)
    airflow = {tuple(c[1:]) for c in commands.values() if c[:1] == ["airflow"]}
    for component in AIRFLOW_COMPONENTS:
        assert any(c[0] == component for c in airflow if c), f"no Airflow {component} service"
    assert ("celery", "worker") in {c[:2] for c in airflow}, "no Celery worker"
    assert any("airflow db migrate" in " ".join(c) for c in commands.values()), "no Airflow init (db migrate)"
    for name, svc in services.items():
        if _command(svc)[:1] == ["airflow"] or "airflow db migrate" in " ".join(_command(svc)):
            assert _env(svc)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def test_airflow_talks_to_postgres_redis_and_its_own_execution_api(services):
    for name, svc in services.items():
        env = _env(svc)
        if "AIRFLOW__CORE__EXECUTOR" not in env:
            continue
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:"), name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow"), name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://airflow:"), name
        assert (
            env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
            and "@redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"]
        ), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/platform/dags"
        # every Airflow process signs and checks the same tokens
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET")
    api = services["airflow-api-server"]
    assert "${PLATFORM_PUBLISH_ADDRESS:-127.0.0.1}:8080:8080" in api["ports"]


def test_mlflow_runs_the_repo_server_script_on_postgres(services):
    mlflow = services["mlflow"]
    cmd = _command(mlflow)
    script = next(c for c in cmd if c.endswith("server.sh"))
    assert script == "/opt/platform/mlflow/server.sh"
    assert (REPO / "mlflow" / "server.sh").exists()
    env = _env(mlflow)
    # psycopg2 named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which the image lacks
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    # clients in other containers reach it as http://mlflow:5000: MLflow must accept that Host header
    import fnmatch

    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert any(fnmatch.fnmatch("mlflow:5000", h) for h in hosts)
    # every variable server.sh requires is set
    for var in re.findall(r"\$\{(\w+):\?", (REPO / "mlflow" / "server.sh").read_text()):
        assert var in env, f"mlflow/server.sh requires {var}"


def test_scoring_service_runs_platform_serve_with_flags_the_cli_accepts(services):
    from pipelines.cli import build_parser

    cmd = _command(services["scoring"])
    assert cmd[:2] == ["platform", "serve"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^platform\s*=\s*"pipelines\.cli:main"', pyproject, re.M), "no `platform` entry point"
    args = build_parser().parse_args(cmd[1:])
    assert args.func.__name__ == "cmd_serve"
    assert args.host == "0.0.0.0" and args.port == 8700  # inside its container; published on 127.0.0.1
    assert f"${{PLATFORM_PUBLISH_ADDRESS:-127.0.0.1}}:{args.port}:{args.port}" in services["scoring"]["ports"]
    health = " ".join(services["scoring"]["healthcheck"]["test"])
    assert f"localhost:{args.port}/health" in health


def _fab_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("airflow.providers.fab") is not None


def test_airflow_commands_are_real_airflow_cli_commands(services):
    from airflow.cli import cli_parser

    parser = cli_parser.get_parser()
    for name, svc in services.items():
        cmd = _command(svc)
        lines = [cmd] if cmd[:1] == ["airflow"] else []
        if cmd[:2] == ["sh", "-c"]:
            parts = re.split(r"&&|;|\|\|", cmd[2])
            lines = [
                shlex.split(part.strip().strip("()")) for part in parts if part.strip().strip("(").startswith("airflow")
            ]
        for argv in lines:
            if argv[1:2] == ["users"] and not _fab_installed():
                continue  # the FAB provider's command: checked by test_airflow_uses_the_fab_auth_manager
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{name}: `{' '.join(argv)}` is not a valid Airflow command")
        test = (svc.get("healthcheck") or {}).get("test") or []
        joined = test[1] if len(test) == 2 and test[0] == "CMD-SHELL" else " ".join(test[1:])
        if joined.startswith("airflow "):
            argv = shlex.split(joined.replace("$${HOSTNAME}", "host"))
            try:
                parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{name}: healthcheck `{joined}` is not a valid Airflow command")


def test_celery_worker_healthcheck_names_the_real_celery_app(services):
    import importlib

    test = " ".join(services["airflow-worker"]["healthcheck"]["test"])
    app = re.search(r"--app (\S+)", test).group(1)
    module, _, attr = app.rpartition(".")
    assert hasattr(importlib.import_module(module), attr), f"{app} is not importable"


# -- variables -------------------------------------------------------------------------------
def _settings_aliases() -> set[str]:
    from pydantic import AliasChoices

    from pipelines.settings import Settings

    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else [])
    return {n for n in names if isinstance(n, str)}


def _serving_vars() -> set[str]:
    from pipelines.serving.config import ServingSettings

    prefix = ServingSettings.model_config["env_prefix"]
    return {prefix + name.upper() for name in ServingSettings.model_fields}


def _airflow_options() -> dict[str, set[str]]:
    from airflow.configuration import retrieve_configuration_description

    desc = retrieve_configuration_description(include_airflow=True, include_providers=True)
    return {section: set(body["options"]) for section, body in desc.items()}


def _mlflow_vars() -> set[str]:
    import mlflow.environment_variables as ev

    return {v.name for v in vars(ev).values() if hasattr(v, "name") and isinstance(v.name, str)}


def test_every_variable_in_compose_is_one_something_reads(services):
    settings_vars = _settings_aliases() | {"AIRFLOW_HOME"}  # Settings.airflow_home reads AIRFLOW_HOME
    serving_vars = _serving_vars()
    airflow_options = _airflow_options()
    mlflow_vars = _mlflow_vars()
    server_sh = (REPO / "mlflow" / "server.sh").read_text()
    problems = []
    for name, svc in services.items():
        script, script_vars = SCRIPT_VARS.get(name, (None, set()))
        for var in _env(svc):
            if var.startswith("AIRFLOW__"):
                section, _, option = var[len("AIRFLOW__") :].lower().partition("__")
                if option not in airflow_options.get(section, set()):
                    problems.append(f"{name}: {var} is not an Airflow option [{section}] {option}")
            elif var.startswith("PLATFORM_SERVING_"):
                if var not in serving_vars:
                    problems.append(f"{name}: {var} is not a field of ServingSettings")
            elif var.startswith("PLATFORM_"):
                if var not in settings_vars:
                    problems.append(f"{name}: {var} is not read by pipelines/settings.py")
            elif var.startswith("MLFLOW_"):
                if var not in settings_vars | mlflow_vars and f"${{{var}" not in server_sh:
                    problems.append(f"{name}: {var} is read neither by the platform nor by MLflow")
            elif var in settings_vars:
                pass
            elif var in IMAGE_VARS.get(_image_name(svc), set()):
                pass
            elif var in script_vars:
                assert script is not None
                if var not in script.read_text():
                    problems.append(f"{name}: {var} is not used by {script.name}")
            else:
                problems.append(f"{name}: nothing reads {var}")
    assert not problems, "\n".join(problems)


def test_platform_containers_get_a_complete_platform_configuration(services):
    from pipelines.settings import Settings

    for name, svc in _platform_services(services).items():
        env = _env(svc)
        if name == "mlflow-init":  # talks to MLflow's auth API only: no object-store key at all
            assert not any(k.startswith("AWS_") for k in env), name
            continue
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env.get(var), f"{name} lacks {var}"
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        if name != "mlflow":
            assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        # the bucket names match the buckets minio-init creates and the policies grant
        for var, default in (
            ("PLATFORM_LANDING_BUCKET", "landing"),
            ("PLATFORM_LAKE_BUCKET", "lake"),
            ("PLATFORM_MLFLOW_BUCKET", "mlflow"),
        ):
            assert env.get(var, default) in BUCKETS
        # pydantic accepts the values that are literal (not ${...} placeholders)
        literal = {k: v for k, v in env.items() if "${" not in v}
        Settings.model_validate(literal)


def test_every_interpolated_variable_is_documented_in_env_example_without_a_secret(raw):
    example = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    used = set(re.findall(r"(?<!\$)\$\{(\w+)", raw))
    missing = used - set(example)
    assert not missing, f"add to .env.example: {sorted(missing)}"
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|FERNET", key):
            assert value == "", f".env.example must not carry a value for {key}"


def test_secrets_are_required_not_defaulted(raw):
    # a secret either fails fast when unset (${X:?...}) or repeats a variable required elsewhere
    required = set(re.findall(r"\$\{(\w+):\?", raw))
    for var, modifier in re.findall(r"(?<!\$)\$\{(\w+)(:[-?][^}]*)?\}", raw):
        if re.search(r"PASSWORD|SECRET_KEY|JWT|FERNET|ADMIN_TOKEN", var):
            assert not modifier.startswith(":-"), f"{var} must not have a default"
            assert var in required, f"{var} is never required with ${{{var}:?...}}"


# -- MinIO and Postgres init -----------------------------------------------------------------
def test_minio_policies_grant_each_service_what_it_needs_and_no_more():
    def grants(policy: str) -> dict[str, set[str]]:
        doc = json.loads((POLICIES / f"{policy}.json").read_text())
        assert doc["Version"] == "2012-10-17"
        out: dict[str, set[str]] = {}
        for st in doc["Statement"]:
            assert st["Effect"] == "Allow" and "*" not in "".join(st["Action"])
            for res in st["Resource"]:
                assert res.startswith("arn:aws:s3:::")
                out.setdefault(res.removeprefix("arn:aws:s3:::"), set()).update(st["Action"])
        return out

    rw = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    airflow = grants("airflow")
    assert rw <= airflow["lake/*"]
    assert {"landing/*", "lake/*", "landing", "lake"} == set(airflow)
    # deliveries are read, never changed or deleted by the pipelines: only the operator deletes in landing
    assert airflow["landing/*"] == {"s3:GetObject"}

    mlflow = grants("mlflow")
    assert set(mlflow) == {"mlflow", "mlflow/*"} and rw <= mlflow["mlflow/*"]

    def allows(policy: dict[str, set[str]], action: str, key: str) -> bool:
        return any(action in a and re.fullmatch(r.replace("*", ".*"), key) for r, a in policy.items())

    from pipelines.canary.history import ALIAS_SNAPSHOT_PREFIX, HISTORY_PREFIX
    from pipelines.canary.state import rollout_key
    from pipelines.serving.predlog import FEEDBACK, PREDICTIONS

    scoring = grants("scoring")
    # it reads the models and the rollout state (the weights it routes by), and nothing else of the lake
    assert scoring["mlflow/*"] == {"s3:GetObject"}
    assert allows(scoring, "s3:GetObject", f"lake/{rollout_key('any-model')}")
    for key in ("lake/gold/x", "lake/silver/x", f"lake/{PREDICTIONS}/x", "landing/x"):
        assert not allows(scoring, "s3:GetObject", key), key
    # it appends its prediction log and feedback (pipelines/serving), nothing else; it deletes nothing
    writes = {r for r, a in scoring.items() if a & {"s3:PutObject", "s3:DeleteObject"}}
    assert writes == {"lake/predictions/*", "lake/feedback/*"}
    for key in (f"{PREDICTIONS}/x", f"{FEEDBACK}/x"):
        assert allows(scoring, "s3:PutObject", f"lake/{key}"), key
    assert not any("s3:DeleteObject" in a for a in scoring.values())
    # the rollout state and the history are written by the canary (Airflow's user) and the operator only
    for key in (rollout_key("any-model"), f"{HISTORY_PREFIX}x.json", f"{ALIAS_SNAPSHOT_PREFIX}m.json"):
        writers = {p.stem for p in POLICIES.glob("*.json") if allows(grants(p.stem), "s3:PutObject", f"lake/{key}")}
        assert writers == {"airflow", "operator"}, (key, writers)

    operator = grants("operator")
    assert rw <= operator["landing/*"] and rw <= operator["dvc/*"]
    assert operator["lake/*"] == {"s3:GetObject"}
    # nobody but the operator deletes a delivery
    deleters = {p.stem for p in POLICIES.glob("*.json") if allows(grants(p.stem), "s3:DeleteObject", "landing/x")}
    assert deleters == {"operator"}


def test_minio_init_creates_every_bucket_and_one_user_per_policy():
    script = MINIO_INIT.read_text()
    created = set(re.search(r"for bucket in ([\w ]+); do", script).group(1).split())
    assert created == BUCKETS
    users = re.findall(r"^user (\w+)\s+\"\$(\w+)\"\s+\"\$(\w+)\"", script, re.M)
    assert {u[0] for u in users} == {p.stem for p in POLICIES.glob("*.json")}
    from pipelines.reproduce import DVC_BUCKET

    assert DVC_BUCKET in created


def test_postgres_init_creates_the_databases_the_uris_name(services):
    sql = PG_INIT.read_text()
    for db in ("airflow", "mlflow"):
        assert re.search(rf"CREATE ROLE {db} LOGIN PASSWORD :'{db}_password'", sql)
        assert f"CREATE DATABASE {db} OWNER {db};" in sql
    mounts = services["postgres"]["volumes"]
    assert any("docker-entrypoint-initdb.d" in m and "init-databases.sh" in m for m in mounts)


def test_postgres_init_script_runs_against_a_real_postgres(tmp_path):
    """The script's SQL, with role and database names made unique, on this machine's Postgres."""
    import shutil
    import subprocess
    import uuid

    if not shutil.which("psql"):
        pytest.skip("psql not installed")
    probe = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc", "select 1"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no Postgres on 127.0.0.1:5432")
    suffix = "t" + uuid.uuid4().hex[:8]
    script = PG_INIT.read_text()
    script = script.replace("DATABASE mlflow_auth", f"DATABASE mlflow_auth_{suffix}")
    for name in ("airflow", "mlflow"):
        script = re.sub(rf"\b(ROLE|DATABASE|OWNER) {name}\b", rf"\1 {name}_{suffix}", script)
        script = script.replace(f"DATABASE {name} FROM", f"DATABASE {name}_{suffix} FROM")
    path = tmp_path / "init.sh"
    path.write_text(script)
    env = {
        "PATH": "/usr/bin:/bin",
        "POSTGRES_USER": "postgres",
        "PGHOST": "127.0.0.1",
        "PG_AIRFLOW_PASSWORD": "pw-a'quote",
        "PG_MLFLOW_PASSWORD": "pw-m",
    }
    try:
        out = subprocess.run(["sh", str(path)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        dbs = subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-Atc",
                f"select datname, pg_get_userbyid(datdba) from pg_database where datname like '%_{suffix}'",
            ],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert sorted(dbs) == sorted(
            [
                f"airflow_{suffix}|airflow_{suffix}",
                f"mlflow_{suffix}|mlflow_{suffix}",
                f"mlflow_auth_{suffix}|mlflow_{suffix}",
            ]
        )
    finally:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"DROP DATABASE IF EXISTS mlflow_auth_{suffix}"],
            capture_output=True,
        )
        for name in ("airflow", "mlflow"):
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"DROP DATABASE IF EXISTS {name}_{suffix}"],
                capture_output=True,
            )
            subprocess.run(
                ["psql", "-h", "127.0.0.1", "-U", "postgres", "-c", f"DROP ROLE IF EXISTS {name}_{suffix}"],
                capture_output=True,
            )


# -- the image -------------------------------------------------------------------------------
def test_image_installs_the_lock_with_what_postgres_and_celery_need():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "-r requirements.lock" in dockerfile
    lock = (REPO / "requirements.lock").read_text().lower()
    for package in ("psycopg2-binary", "apache-airflow-providers-celery", "redis"):
        assert re.search(rf"^{package}==", lock, re.M), (
            f"{package} is not in requirements.lock: the image's Airflow/MLflow need it for Postgres/Celery"
        )
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", ".platform/", ".git/", ".env"} <= set(ignored)


# -- locking the doors: logins, published ports, encryption ------------------------------------------
def _published(port_spec: str) -> tuple[str, str]:
    """(host address, container port) of a short-syntax port; the address with compose's default."""
    parts = port_spec.rsplit(":", 2)
    assert len(parts) == 3, f"{port_spec}: publish on an explicit address, e.g. 127.0.0.1:{port_spec}"
    address = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", parts[0])
    return address, parts[2]


def test_nothing_is_published_beyond_this_host_by_default(services):
    open_to_network = {"mosquitto"}  # devices connect to MQTT from the field, each with its own login
    for name, svc in services.items():
        for spec in svc.get("ports") or []:
            address, _ = _published(str(spec)) if name not in open_to_network else ("127.0.0.1", "")
            assert address == "127.0.0.1", f"{name} publishes {spec} beyond this host by default"
    # consoles are never opened by the variable: the MinIO console stays on the host
    assert "127.0.0.1:9001:9001" in services["minio"]["ports"]
    assert "127.0.0.1:8710:8710" in services["ingester"]["ports"]


def test_scoring_requires_its_tokens_by_default(services):
    env = _env(services["scoring"])
    assert env["PLATFORM_SERVING_SCORING_TOKEN"].startswith("${SCORING_TOKEN:?")
    assert env["PLATFORM_SERVING_ADMIN_TOKEN"].startswith("${SCORING_ADMIN_TOKEN:?")


def test_mlflow_requires_a_login_and_each_service_has_its_own_user(services):
    from pipelines.services import MLFLOW_ROLE_GRANTS
    from pipelines.settings import MLFLOW_ROLES

    server_sh = (REPO / "mlflow" / "server.sh").read_text()
    assert "--app-name basic-auth" in server_sh
    ini = (REPO / "mlflow" / "basic_auth.ini").read_text()
    assert re.search(r"^default_permission = NO_PERMISSIONS$", ini, re.M)
    assert not re.search(r"^admin_password", ini, re.M), "the admin password comes from the environment"
    mlflow = _env(services["mlflow"])
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"):
        assert mlflow.get(var), f"mlflow lacks {var}"
    assert mlflow["MLFLOW_AUTH_DATABASE_URI"].endswith("@postgres:5432/mlflow_auth")
    assert "CREATE DATABASE mlflow_auth OWNER mlflow;" in PG_INIT.read_text()
    # the users are created by a one-shot every MLflow client waits for
    init = services["mlflow-init"]
    assert _command(init) == ["python", "-m", "pipelines.services", "mlflow-auth"]
    assert set(MLFLOW_ROLES) == set(MLFLOW_ROLE_GRANTS)
    for role in MLFLOW_ROLES:
        assert f"PLATFORM_MLFLOW_{role.upper()}_PASSWORD" in _env(init)
    identities = {}
    for name, svc in _platform_services(services).items():
        env = _env(svc)
        if "MLFLOW_TRACKING_URI" in env and name != "mlflow-init":
            identities[name] = env.get("MLFLOW_TRACKING_USERNAME")
            assert identities[name] and env.get("MLFLOW_TRACKING_PASSWORD"), f"{name} has no MLflow login"
            if name != "airflow-init":  # it only migrates Airflow's database
                assert "mlflow-init" in (svc.get("depends_on") or {}), f"{name} must wait for the MLflow users"
    assert identities.pop("scoring") == "scoring" and identities.pop("ingester") == "scoring"
    assert set(identities.values()) == {"trainer"}, identities  # Airflow; its tasks switch to gate / canary
    assert not any(_env(s).get("MLFLOW_TRACKING_USERNAME") == "admin" for s in services.values())
    # only the gate and the canary may move aliases: EDIT (set) or MANAGE (delete) on registered models
    movers = {r for r, g in MLFLOW_ROLE_GRANTS.items() if dict(g).get("registered_model") in ("EDIT", "MANAGE")}
    assert movers == {"gate", "canary"}


def test_airflow_uses_the_fab_auth_manager_with_its_admin_from_the_environment(services, raw):
    for name, svc in services.items():
        env = _env(svc)
        if "AIRFLOW__CORE__EXECUTOR" in env:
            assert env["AIRFLOW__CORE__AUTH_MANAGER"] == (
                "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
            ), name
            assert not any(k.startswith("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER") for k in env), name
    init = " ".join(_command(services["airflow-init"]))
    assert "airflow users create --username admin --role Admin" in init
    assert '"$$AIRFLOW_ADMIN_PASSWORD"' in init  # from the environment, never written in the file
    config = (REPO / "compose" / "airflow" / "webserver_config.py").read_text()
    assert "AUTH_RATE_LIMITED = True" in config and "AUTH_RATE_LIMIT" in config
    lock = (REPO / "requirements.lock").read_text()
    assert re.search(r"^apache-airflow-providers-fab==", lock, re.M), "the image installs the lock: FAB must be in it"


def test_minio_encrypts_every_bucket_at_rest(services):
    assert _env(services["minio"])["MINIO_KMS_SECRET_KEY"].startswith("${MINIO_KMS_SECRET_KEY:?")
    script = MINIO_INIT.read_text()
    loop = re.search(r"for bucket in [\w ]+; do\n(.*?)\ndone", script, re.S).group(1)
    assert 'mc encrypt set sse-s3 "platform/$bucket"' in loop


# -- metrics: Prometheus and Grafana -----------------------------------------------------------------
def _mount(service: dict, target: str) -> Path:
    """The repo path `service` mounts at `target`."""
    for mount in service.get("volumes") or []:
        source, _, rest = mount.partition(":")
        if rest.split(":")[0] == target:
            return REPO / source
    raise AssertionError(f"nothing is mounted at {target}")


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_prometheus_scrapes_the_metrics_endpoints_of_the_scoring_service_and_the_ingester(services, tmp_path):
    from pipelines.serving.app import create_app
    from pipelines.serving.config import ServingSettings
    from pipelines.settings import get_settings
    from pipelines.storage import LocalStore
    from pipelines.streaming.http import state_app
    from pipelines.streaming.state import MemoryStateStore

    prometheus = services["prometheus"]
    assert _mount(prometheus, "/etc/prometheus/prometheus.yml") == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    # the targets are the services' own ports, as their commands set them
    scoring_port = _arg(_command(services["scoring"]), "--port")
    ingester_port = _arg(_command(services["ingester"]), "--http-port")
    assert jobs["scoring"]["static_configs"][0]["targets"] == [f"scoring:{scoring_port}"]
    assert jobs["ingester"]["static_configs"][0]["targets"] == [f"ingester:{ingester_port}"]
    assert {jobs["scoring"]["metrics_path"], jobs["ingester"]["metrics_path"]} == {"/metrics"}
    assert _arg(_command(services["ingester"]), "--http-host") == "0.0.0.0"  # reachable from prometheus
    # ... and both apps answer that path
    settings = get_settings()
    serving = create_app(settings, ServingSettings(model_name="any"), LocalStore(tmp_path))
    stream = state_app(MemoryStateStore())
    for app in (serving, stream):
        assert "/metrics" in {r.path for r in app.routes}
    assert "127.0.0.1:9090:9090" in prometheus["ports"]  # no login of its own: never beyond this host


def test_grafana_has_no_default_password_and_a_provisioned_dashboard_of_the_platform_metrics(services, compose):
    from pipelines.metrics import metric_names

    grafana = services["grafana"]
    env = _env(grafana)
    # the admin password is a file secret from .env; no anonymous access, no sign-up
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "grafana_admin_password" in grafana["secrets"]
    assert compose["secrets"]["grafana_admin_password"] == {"environment": "GRAFANA_ADMIN_PASSWORD"}
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "GRAFANA_ADMIN_PASSWORD=" in ENV_EXAMPLE.read_text().splitlines()

    provisioning = _mount(grafana, "/etc/grafana/provisioning")
    dashboards_dir = _mount(grafana, "/etc/grafana/dashboards")
    assert provisioning == GRAFANA / "provisioning" and dashboards_dir == GRAFANA / "dashboards"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"][0]
    provider = yaml.safe_load((provisioning / "dashboards" / "platform.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"

    dashboard = json.loads((dashboards_dir / "platform.json").read_text())
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/etc/grafana/dashboards/platform.json"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    queried: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"]
            names = set(re.findall(r"\b(platform_[a-z_]+)", target["expr"]))
            queried |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    # every metric a panel queries is one the platform exports, and every one it exports is shown
    defined = metric_names()
    assert queried <= defined, f"the dashboard queries metrics nothing exports: {sorted(queried - defined)}"
    assert defined <= queried, f"exported but on no panel: {sorted(defined - queried)}"
