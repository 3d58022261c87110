"""Throughput and latency of `platform serve` vs `mlflow models serve` on the same model and load.

Same load generator (asyncio + httpx, single-record requests), same concurrency, same duration, one
run; prints requests/s, p50 and p99 of both and the ratios. Target: >= 3x the throughput at <= half
the p99.

    .venv/bin/python benchmarks/serving_benchmark.py                # against the stack of `platform up`
    .venv/bin/python benchmarks/serving_benchmark.py --ephemeral    # starts a throwaway stack + model

The first form needs a registered model with a `champion` alias (e.g. after `make demo KEEP_UP=1`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_benchmark_model(uri: str, name: str) -> None:
    """An IsolationForest with 100 trees (the platform's default) on simulated features -> champion."""
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.ensemble import IsolationForest
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    import mlflow
    from mlflow import MlflowClient
    from pipelines import training

    rng = np.random.default_rng(0)
    cols = ["temp", "temp_roll_mean", "temp_roll_std", "temp_delta", "humidity", "vibration"]
    X = pd.DataFrame(rng.normal(size=(2000, len(cols))), columns=cols)
    model = training.AnomalyScorer(
        Pipeline(
            [
                ("impute", SimpleImputer()),
                ("scale", StandardScaler()),
                ("model", IsolationForest(n_estimators=100, random_state=0)),
            ]
        )
    ).fit(X)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-benchmark")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(X, model.predict(X)),
            serialization_format="skops",
            skops_trusted_types=training.SKOPS_TRUSTED_TYPES,
            pip_requirements=["scikit-learn", "skops"],
            registered_model_name=name,
        )
    client = MlflowClient(uri, registry_uri=uri)
    version = info.registered_model_version
    client.set_registered_model_alias(name, "champion", str(version))


def feature_columns(uri: str, name: str) -> list[str]:
    from mlflow.models import get_model_info

    return get_model_info(f"models:/{name}@champion").signature.inputs.input_names()


async def load(url: str, make_body, concurrency: int, seconds: float, warmup: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup

    async def worker(i: int) -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            n = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post(
                    url, content=make_body(i, n), headers={"content-type": "application/json"}
                )
                t1 = time.perf_counter()
                n += 1
                if t0 >= measure_from:
                    if r.status_code != 200:
                        errors += 1
                    else:
                        latencies.append(t1 - t0)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}; log {log}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="registered model (default: params.yaml registry.model_name)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--ephemeral", action="store_true", help="start a throwaway stack and register a model")
    args = ap.parse_args()

    state = None
    if args.ephemeral:
        state = Path(tempfile.mkdtemp(prefix="platform-bench-"))
        for var in [v for v in os.environ if v.startswith(("AWS_", "MLFLOW_", "PLATFORM_"))]:
            os.environ.pop(var)
        os.environ["PLATFORM_STATE_DIR"] = str(state)
        os.environ["AIRFLOW_HOME"] = str(state / "airflow")
        os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{state / 'airflow' / 'airflow.db'}"
        (state / "airflow").mkdir(parents=True)
    from pipelines import services
    from pipelines.datasets import get_dataset
    from pipelines.settings import get_settings

    procs: list[subprocess.Popen] = []
    try:
        if args.ephemeral:
            services.write_stack_env(
                get_settings(),
                {
                    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                    "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
                },
            )
            services.up(ui=False)
        settings = get_settings()
        os.environ.update(settings.client_env())
        os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"  # our own registry's model (skops)
        name = args.model or get_dataset(settings.dataset).model_name
        uri = settings.mlflow_tracking_uri
        if args.ephemeral:
            name = "serving-benchmark"
            register_benchmark_model(uri, name)
        cols = feature_columns(uri, name)
        rng = np.random.default_rng(1)
        rows = [dict(zip(cols, map(float, rng.normal(size=len(cols))), strict=True)) for _ in range(512)]
        import orjson

        ours_port, mlflow_port = free_port(), free_port()
        env = {**os.environ, "PLATFORM_SERVING_MODEL_NAME": name, "PLATFORM_SERVING_LOG_FLUSH_SECONDS": "2"}
        # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        log_dir = settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipelines.serving", "--port", str(ours_port)],
                cwd=REPO,
                env=env,
                stdout=open(log_dir / "bench-serving.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "models",
                    "serve",
                    "-m",
                    f"models:/{name}@champion",
                    "--env-manager",
                    "local",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(mlflow_port),
                ],
                cwd=REPO,
                env=env,
                stdout=open(log_dir / "bench-mlflow-serve.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait_http(f"http://127.0.0.1:{ours_port}/health", procs[0], log_dir / "bench-serving.log")
        wait_http(f"http://127.0.0.1:{mlflow_port}/ping", procs[1], log_dir / "bench-mlflow-serve.log")

        def ours_body(i: int, n: int) -> bytes:
            return orjson.dumps({"records": [{"device": f"dev-{i}", **rows[(i * 997 + n) % len(rows)]}]})

        def mlflow_body(i: int, n: int) -> bytes:
            return orjson.dumps({"dataframe_records": [rows[(i * 997 + n) % len(rows)]]})

        print(
            f"model {name}@champion, {len(cols)} features; concurrency {args.concurrency}, "
            f"{args.seconds:.0f}s per server after {args.warmup:.0f}s warm-up; single-record requests"
        )
        results = {}
        for label, url, body in (
            ("platform serve", f"http://127.0.0.1:{ours_port}/score", ours_body),
            ("mlflow models serve", f"http://127.0.0.1:{mlflow_port}/invocations", mlflow_body),
        ):
            results[label] = asyncio.run(load(url, body, args.concurrency, args.seconds, args.warmup))
            r = results[label]
            print(
                f"{label:<20} {r['rps']:8.1f} req/s   p50 {r['p50_ms']:7.1f} ms   p99 {r['p99_ms']:7.1f} ms"
                f"   ({r['requests']} ok, {r['errors']} errors)"
            )
        a, b = results["platform serve"], results["mlflow models serve"]
        tput, p99 = a["rps"] / b["rps"], a["p99_ms"] / b["p99_ms"]
        print(
            f"ratio: throughput x{tput:.1f} (target >= 3), p99 x{p99:.2f} (target <= 0.5): "
            f"{'MET' if tput >= 3 and p99 <= 0.5 else 'NOT MET'}"
        )
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.ephemeral:
            services.down(progress=lambda s: None)
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
