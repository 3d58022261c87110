#!/usr/bin/env sh
# The MLflow tracking server as the platform runs it (docker-compose and `platform up` alike), with
# MLflow's basic-auth app: anonymous requests get 401, users only what their grants allow.
set -eu
# Files the server creates (a SQLite backend store, temporary artifacts) are its owner's alone.
umask 077
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (the admin MLflow creates on its first start)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (signs the auth app's CSRF tokens)}"
# The auth app's config: mlflow/basic_auth.ini with this deployment's auth store (users and grants).
MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$(mktemp -d)/basic_auth.ini}"
sed "s|^database_uri = .*|database_uri = ${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI}|" \
  "$(dirname "$0")/basic_auth.ini" > "$MLFLOW_AUTH_CONFIG_PATH"
export MLFLOW_AUTH_CONFIG_PATH
exec mlflow server \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}" \
  --artifacts-destination "s3://${PLATFORM_MLFLOW_BUCKET:-mlflow}/artifacts" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --app-name basic-auth
