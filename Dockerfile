# One image for the Airflow components, the MLflow server and the scoring service (docker-compose.yml).
# Everything Python comes from requirements.lock (which carries psycopg2-binary for Postgres and
# apache-airflow-providers-celery for the CeleryExecutor), so the image runs what the tests ran.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends curl git \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/platform
COPY requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache -r requirements.lock

COPY . .
RUN uv pip install --system --no-cache --no-deps -e .

# A non-root user; AIRFLOW_HOME's volume mount points exist in the image with its ownership, so
# fresh named volumes (logs, the UI password file) are writable by it.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home platform \
 && mkdir -p /opt/airflow/logs /opt/airflow/auth \
 && chown -R 50000:0 /opt/airflow
USER 50000

ENV PYTHONPATH=/opt/platform \
    AIRFLOW_HOME=/opt/airflow \
    PYTHONUNBUFFERED=1
EXPOSE 5000 8080 8700
