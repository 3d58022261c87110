"""Session fixtures: the real embedded stack (object store, MLflow, Airflow DB) on free ports."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / ".." / "shared").resolve()
NAB_DIR = SHARED / "datasets" / "nab"

# Isolate every test process from a developer's own stack and environment before anything imports
# Airflow or reads settings: a temp state dir, no inherited credentials or endpoints.
_STATE = Path(tempfile.mkdtemp(prefix="platform-test-"))
for var in list(os.environ):
    if var.startswith(("AWS_", "MLFLOW_", "AIRFLOW__", "PLATFORM_")) or var == "AIRFLOW_HOME":
        os.environ.pop(var)
os.environ["PLATFORM_STATE_DIR"] = str(_STATE)
os.environ["AIRFLOW_HOME"] = str(_STATE / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_STATE / 'airflow' / 'airflow.db'}"
(_STATE / "airflow").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@pytest.fixture(scope="session")
def stack(state_dir):
    """The real services, started once for the session on free loopback ports, stopped after."""
    from pipelines import services
    from pipelines.settings import get_settings

    services.write_stack_env(
        get_settings(),
        {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{services.free_port()}",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{services.free_port()}",
            "PLATFORM_AIRFLOW_PORT": str(services.free_port()),
        },
    )
    try:
        info = services.up(ui=False)
        settings = get_settings()
        os.environ.update(settings.client_env())
        yield info
    finally:
        services.down()


@pytest.fixture(scope="session")
def settings(stack):
    from pipelines.settings import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def store(settings):
    from pipelines.storage import ObjectStore

    return ObjectStore(settings)


@pytest.fixture(scope="session")
def nab_csv() -> Path:
    path = NAB_DIR / "machine_temperature_system_failure.csv"
    if not path.exists():
        pytest.fail(f"The shared NAB dataset is missing: expected {path} (../shared beside the repo)")
    return path


@pytest.fixture
def own_state(tmp_path, monkeypatch):
    """A second, empty state directory (another stack of this checkout) with its own keys; whatever it
    starts is stopped afterwards."""
    import secrets

    from pipelines import services

    state = tmp_path / "state"
    for var in list(os.environ):
        if var.startswith(("AWS_", "MLFLOW_")):
            monkeypatch.delenv(var)
    monkeypatch.setenv("PLATFORM_STATE_DIR", str(state))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "platform-" + secrets.token_hex(4))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(24))
    # start_object_store sets AWS_ENDPOINT_URL in os.environ: have monkeypatch put the original back.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "unset")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    try:
        yield state
    finally:
        services.down(progress=lambda *_: None)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and not os.environ.get("PLATFORM_KEEP_TEST_STATE"):
        shutil.rmtree(_STATE, ignore_errors=True)
