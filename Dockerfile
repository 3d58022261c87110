# One image for Airflow components, the MLflow server and the platform CLI (docker-compose.yml).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl git && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/platform
COPY requirements.lock pyproject.toml ./
RUN pip install --no-cache-dir uv==0.13.9 && uv pip install --system --no-cache -r requirements.lock psycopg2-binary
COPY . .
RUN uv pip install --system --no-deps -e .
ENV PYTHONPATH=/opt/platform
