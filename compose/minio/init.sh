#!/bin/sh
# One-shot MinIO setup (the `minio-init` service): the platform's buckets (encrypted at rest), then
# one user per service with its own policy from /policies/<name>.json. Safe to re-run: existing buckets,
# policies and users are updated in place, so rotating a key in .env and re-running works.
set -eu

: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER in .env}"
: "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD in .env}"

mc alias set platform "${MINIO_ENDPOINT:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"

for bucket in landing lake mlflow dvc; do
  mc mb --ignore-existing "platform/$bucket"
  # Encryption at rest: every new object encrypted with the server's KMS key (MINIO_KMS_SECRET_KEY).
  mc encrypt set sse-s3 "platform/$bucket"
done

# user <policy> <access key> <secret key>: create or update the user and give it exactly one policy.
user() {
  policy=$1 access=$2 secret=$3
  [ -n "$access" ] && [ -n "$secret" ] || { echo "minio-init: keys for '$policy' are empty: set them in .env" >&2; exit 1; }
  mc admin policy create platform "$policy" "/policies/$policy.json"
  mc admin user add platform "$access" "$secret"
  # `attach` refuses a policy that is already attached; that is the state we want.
  mc admin policy attach platform "$policy" --user "$access" 2>/dev/null \
    || mc admin user info platform "$access" | grep -q "$policy"
  echo "minio-init: user for $policy ready"
}

user airflow  "$S3_AIRFLOW_ACCESS_KEY"  "$S3_AIRFLOW_SECRET_KEY"
user mlflow   "$S3_MLFLOW_ACCESS_KEY"   "$S3_MLFLOW_SECRET_KEY"
user scoring  "$S3_SCORING_ACCESS_KEY"  "$S3_SCORING_SECRET_KEY"
user operator "$AWS_ACCESS_KEY_ID"      "$AWS_SECRET_ACCESS_KEY"
