"""The one settings object: the stream's variables are read with the same precedence as the rest."""

from __future__ import annotations

import pytest

from pipelines.settings import StreamSettings, load_settings


def test_stream_settings_come_from_the_environment_and_the_stack_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PLATFORM_STATE_DIR", str(tmp_path))
    (tmp_path / "stack.env").write_text("PLATFORM_STREAM_MQTT_PORT=18830\nPLATFORM_STREAM_BATCH_MAX_SECONDS=2.5\n")
    monkeypatch.setenv("PLATFORM_STREAM_MQTT_PORT", "18831")  # the environment wins over stack.env
    monkeypatch.chdir(tmp_path)
    stream = load_settings().stream
    assert stream.mqtt_port == 18831
    assert stream.batch_max_seconds == 2.5
    assert stream.session_id("nab") == "platform-ingester-nab"


def test_a_misspelt_stream_variable_is_named_not_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("PLATFORM_STATE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLATFORM_STREAM_BATCH_MAX_SECOND", "3")
    with pytest.raises(ValueError, match="PLATFORM_STREAM_BATCH_MAX_SECOND.*known are"):
        load_settings()


def test_stream_secrets_read_from_files(tmp_path):
    secret = tmp_path / "mqtt"
    secret.write_text("s3cret\n")
    assert StreamSettings(mqtt_password_file=secret).secret("mqtt_password") == "s3cret"
    with pytest.raises(ValueError, match="cannot read it"):
        StreamSettings(mqtt_password_file=tmp_path / "absent").secret("mqtt_password")


def test_platform_stream_says_whether_its_commits_reach_airflow():
    """Without an Airflow api-server, `platform stream` still commits and scores, but nothing rebuilds
    silver and gold for the streamed partitions: its start says so and names the setting; with one,
    it names where the asset events go and the DAG they schedule."""
    from pipelines.streaming.cli import _airflow_text

    silent = _airflow_text("nab_machine_temperature", StreamSettings())
    assert "--airflow-api-url" in silent and "PLATFORM_STREAM_AIRFLOW_API_URL" in silent
    assert "to bronze and scored, but nab_machine_temperature_stream_rebuild will not rebuild" in silent
    assert "to bronze, but" in _airflow_text("nab_machine_temperature", StreamSettings(scoring=False))
    told = _airflow_text("nab_machine_temperature", StreamSettings(airflow_api_url="http://127.0.0.1:8080"))
    assert "http://127.0.0.1:8080" in told and "schedule nab_machine_temperature_stream_rebuild" in told
