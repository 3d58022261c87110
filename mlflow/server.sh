#!/usr/bin/env sh
# The MLflow tracking server as the platform runs it (docker-compose and `platform up` alike).
set -eu
# Files the server creates (a SQLite backend store, temporary artifacts) are its owner's alone.
umask 077
exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}" \
  --artifacts-destination "s3://${PLATFORM_MLFLOW_BUCKET:-mlflow}/artifacts" \
  --workers "${MLFLOW_WORKERS:-2}"
