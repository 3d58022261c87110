#!/bin/sh
# Runs once, when the Postgres volume is empty (docker-entrypoint-initdb.d): one database and one
# owner role each for Airflow's metadata and MLflow's tracking store (and MLflow's auth store,
# mlflow_auth: its users and grants). Passwords come from .env.
set -eu
: "${PG_AIRFLOW_PASSWORD:?set PG_AIRFLOW_PASSWORD in .env}"
: "${PG_MLFLOW_PASSWORD:?set PG_MLFLOW_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v airflow_password="$PG_AIRFLOW_PASSWORD" -v mlflow_password="$PG_MLFLOW_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
