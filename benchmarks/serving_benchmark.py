"""Latency and throughput of `platform serve` vs `mlflow models serve` on the same model, with wrk.

The load generator is wrk (not Python: a Python client on the same cores measures itself), one
record per request, keep-alive connections, after a warm-up; every figure is printed beside its
target and beside `mlflow models serve` at the same concurrency, measured in the same run:

* p99 under 25 ms at 1, 2, 8 and 64 connections;
* throughput at least 20x `mlflow models serve` at 8 connections;
* a 60 s soak at 8 connections across a change of the champion alias and prediction-log flushes
  (every 2 s) with zero errors.

    .venv/bin/python benchmarks/serving_benchmark.py                # against the stack of `platform up`
    .venv/bin/python benchmarks/serving_benchmark.py --ephemeral    # starts a throwaway stack + model

The first form needs a registered model with a `champion` alias (e.g. after `make demo KEEP_UP=1`); its
soak moves the alias to the model's previous version and back only with --soak-alias. wrk is Debian's
package (`apt-get install wrk`).

Cores: a client is another machine in production. On one machine (`taskset`, 2 CPUs or more) both
services run on CPU 0 and wrk on CPU 1, so the load generator never takes the service's core; with
--no-pin all of them share every core and the tail measures the scheduler as much as the service
(2 cores, 64 connections: p99 59 ms shared against 17 ms pinned, no collector pause in either).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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


WRK_SCRIPT = """
local bodies = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, bodies[n %% #bodies + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT {\\"requests\\": %%d, \\"seconds\\": %%f, \\"p50_us\\": %%f, \\"p99_us\\": %%f, \\"max_us\\": %%f, "
    .. "\\"errors\\": %%d}\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


SERVER_CPUS: list[str] = []  # command prefixes (`taskset -c N`) set by main(): see the module's docstring
CLIENT_CPUS: list[str] = []


def wrk(url: str, bodies: list[bytes], connections: int, seconds: float, script_dir: Path) -> dict:
    """One wrk run: requests/s, p50/p99/max latency (ms) and errors (non-2xx answers, socket errors)."""
    script = script_dir / f"bodies-{abs(hash(tuple(bodies))) % 10**8}.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT % ", ".join(json.dumps(b.decode()) for b in bodies))
    out = subprocess.run(
        [*CLIENT_CPUS, "wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{seconds:g}s"]
        + ["--timeout", "5s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next((x for x in out.splitlines() if x.startswith("WRK_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = json.loads(line.removeprefix("WRK_RESULT "))
    return {
        "rps": r["requests"] / r["seconds"],
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
        "errors": r["errors"],
        "requests": r["requests"],
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
    ap.add_argument("--connections", default="1,2,8,64", help="wrk connection counts (default 1,2,8,64)")
    ap.add_argument("--seconds", type=float, default=10, help="per wrk run")
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--soak-seconds", type=float, default=60)
    ap.add_argument("--soak-alias", action="store_true", help="move the champion alias during the soak (stack form)")
    ap.add_argument("--ephemeral", action="store_true", help="start a throwaway stack and register a model")
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="services on CPU 0, wrk on CPU 1 (default, with taskset and 2+ CPUs)",
    )
    args = ap.parse_args()
    if args.pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        SERVER_CPUS[:] = ["taskset", "-c", "0"]
        CLIENT_CPUS[:] = ["taskset", "-c", "1"]
    if not shutil.which("wrk"):
        print("wrk is not installed: `apt-get install wrk` (Debian), then run this again", file=sys.stderr)
        return 2
    connections = [int(c) for c in args.connections.split(",")]
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

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
            register_benchmark_model(uri, name)  # a second version: the soak moves the alias to it and back
        cols = feature_columns(uri, name)
        rng = np.random.default_rng(1)
        rows = [dict(zip(cols, map(float, rng.normal(size=len(cols))), strict=True)) for _ in range(256)]
        import orjson

        ours_port, mlflow_port = free_port(), free_port()
        env = {**os.environ, "PLATFORM_SERVING_MODEL_NAME": name, "PLATFORM_SERVING_LOG_FLUSH_SECONDS": "2"}
        env["PLATFORM_SERVING_POLL_SECONDS"] = "2"
        # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        log_dir = settings.state_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        procs.append(
            subprocess.Popen(
                [*SERVER_CPUS, sys.executable, "-m", "pipelines.serving", "--port", str(ours_port)],
                cwd=REPO,
                env=env,
                stdout=open(log_dir / "bench-serving.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    *SERVER_CPUS,
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

        ours_bodies = [orjson.dumps({"records": [{"device": f"dev-{i % 50}", **r}]}) for i, r in enumerate(rows)]
        mlflow_bodies = [orjson.dumps({"dataframe_records": [r]}) for r in rows]
        ours_url, mlflow_url = f"http://127.0.0.1:{ours_port}/score", f"http://127.0.0.1:{mlflow_port}/invocations"
        scripts = Path(tempfile.mkdtemp(prefix="wrk-"))
        print(
            f"model {name}@champion, {len(cols)} features; wrk, one record a request, {args.seconds:g} s a run "
            f"after {args.warmup:g} s warm-up; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
            + ("services on CPU 0, wrk on CPU 1" if SERVER_CPUS else "services and wrk share every CPU")
        )
        import httpx

        header = (
            f"{'connections':>11}  {'platform serve':>34}  {'mlflow models serve (baseline)':>34}  {'p99 target':>10}"
        )
        print(header)
        met = True
        results: dict[int, tuple[dict, dict]] = {}
        for c in connections:
            wrk(ours_url, ours_bodies, c, args.warmup, scripts)
            gc_before = httpx.get(f"http://127.0.0.1:{ours_port}/status").json().get("gc", {})
            ours = wrk(ours_url, ours_bodies, c, args.seconds, scripts)
            gc_after = httpx.get(f"http://127.0.0.1:{ours_port}/status").json().get("gc", {})
            wrk(mlflow_url, mlflow_bodies, c, args.warmup, scripts)
            base = wrk(mlflow_url, mlflow_bodies, c, args.seconds, scripts)
            results[c] = (ours, base)
            ok = ours["p99_ms"] < 25 and ours["errors"] == 0
            met &= ok

            def fmt(r):
                return f"{r['rps']:7.0f} req/s p50 {r['p50_ms']:6.2f} p99 {r['p99_ms']:7.2f} ms"

            print(
                f"{c:>11}  {fmt(ours):>34}  {fmt(base):>34}  {'< 25 ms':>10}  {'met' if ok else 'NOT MET'}"
                + (f" ({ours['errors']} errors)" if ours["errors"] else "")
            )
            if gc_after:  # the service's own collector pauses during this run (the event loop stops)
                pauses = ", ".join(
                    f"{g} {gc_after[g]['collections'] - gc_before[g]['collections']}x "
                    f"{gc_after[g]['total_ms'] - gc_before[g]['total_ms']:.0f} ms (longest so far "
                    f"{gc_after[g]['longest_ms']:.1f})"
                    for g in ("gen0", "gen1", "gen2")
                )
                print(f"{'':>13}garbage collection in the service: {pauses}")
        if 8 in results:
            ours, base = results[8]
            ratio = ours["rps"] / base["rps"] if base["rps"] else float("inf")
            met &= ratio >= 20
            print(
                f"throughput at 8 connections: {ours['rps']:.0f} vs {base['rps']:.0f} req/s = x{ratio:.1f} "
                f"(target >= x20): {'met' if ratio >= 20 else 'NOT MET'}"
            )

        # The soak: 8 connections for soak_seconds; the champion alias moves a third of the way in and
        # back at two thirds (ephemeral stack, or --soak-alias), the prediction log flushes every 2 s.
        from mlflow import MlflowClient

        client = MlflowClient(uri, registry_uri=uri)
        champion = client.get_model_version_by_alias(name, "champion").version
        others = [v.version for v in client.search_model_versions(f"name='{name}'") if v.version != champion]
        moves: list[str] = []
        if (args.ephemeral or args.soak_alias) and others:

            def move_alias():
                for at, version in ((1 / 3, max(others, key=int)), (2 / 3, champion)):
                    time.sleep(args.soak_seconds / 3)
                    client.set_registered_model_alias(name, "champion", str(version))
                    moves.append(f"v{version} at {at * args.soak_seconds:.0f} s")

            mover = threading.Thread(target=move_alias, daemon=True)
            mover.start()

        before = httpx.get(f"http://127.0.0.1:{ours_port}/status").json()
        soak = wrk(ours_url, ours_bodies, 8, args.soak_seconds, scripts)
        after = httpx.get(f"http://127.0.0.1:{ours_port}/status").json()
        flushed = after["prediction_log"]["written"] - before["prediction_log"]["written"]
        ok = soak["errors"] == 0 and after["prediction_log"]["dropped"] == 0
        met &= ok
        print(
            f"soak {args.soak_seconds:g} s at 8 connections: {soak['requests']} requests, {soak['errors']} errors "
            f"(target 0): {'met' if ok else 'NOT MET'}; p99 {soak['p99_ms']:.2f} ms, max {soak['max_ms']:.1f} ms; "
            f"alias moves: {', '.join(moves) or 'none'}; prediction-log rows written meanwhile: {flushed}"
        )
        print("all targets met" if met else "some targets NOT MET")
        shutil.rmtree(scripts, ignore_errors=True)
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
