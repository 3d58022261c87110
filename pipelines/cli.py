"""`platform`: the one command-line entry point that users, the Makefile, DVC stages and CI call."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from pipelines.settings import get_settings, load_params


def _dates(start: str, days: int) -> list[str]:
    first = dt.date.fromisoformat(start)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(days)]


# -- stack ------------------------------------------------------------------------------------
def cmd_up(args) -> int:
    from pipelines import services

    info = services.up(ui=not args.no_ui, workers=args.workers, worker_concurrency=args.worker_concurrency)
    _print_status(info)
    return 0


def cmd_down(args) -> int:
    from pipelines import services

    services.down()
    return 0


def cmd_status(args) -> int:
    from pipelines import services

    info = services.status()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_status(info)
    return 0


def _print_status(info: dict) -> None:
    print(f"state directory: {info['state_dir']}")
    for name, s in info["services"].items():
        state = "running" if s["running"] else "stopped"
        health = "" if s["healthy"] is None else (" healthy" if s["healthy"] else " UNHEALTHY")
        print(f"  {name:24s} {state}{health}  {s['url'] or ''}")
    print(f"  MLflow UI:  {info['endpoints']['mlflow']}")
    print(
        f"  Airflow UI: {info['endpoints']['airflow']}  (user admin, password in {info['airflow_admin_password_file']})"
    )


# -- data -------------------------------------------------------------------------------------
def cmd_land(args) -> int:
    from pipelines.jobs.lake import land_bytes, land_simulated_days
    from pipelines.storage import ObjectStore

    store = ObjectStore()
    if args.file:
        path = Path(args.file)
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        if not args.date:
            print(
                "error: --date YYYY-MM-DD is required with --file (the event date it belongs to)",
                file=sys.stderr,
            )
            return 2
        key = land_bytes(store, args.dataset or store.settings.dataset, args.date, path.name, path.read_bytes())
        print(f"landed s3://{store.settings.landing_bucket}/{key}")
        return 0
    p = load_params()["simulate"]
    land_simulated_days(dt.date.fromisoformat(args.start or p["start_date"]), args.days or p["days"], store=store)
    return 0


def cmd_layer(args) -> int:
    """Build one layer partition directly, without Airflow (what DVC stages and debugging use)."""
    from pipelines.jobs import lake

    build = {"bronze": lake.build_bronze, "silver": lake.build_silver, "gold": lake.build_gold}[args.layer]
    for partition in args.dates:
        report = build(partition, args.run_id or f"cli__{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}", dataset=args.dataset)
        print(json.dumps(report.to_dict(), default=str))
    if args.layer == "gold":
        lake.publish_docs()
    return 0


def run_dates(dates: list[str], *, train: bool = True, label: str = "run") -> None:
    """The lakehouse DAG once per delivery date, then the training DAG once (airflow dags test)."""
    from pipelines.orchestration import (
        LAKEHOUSE_DAG,
        TRAINING_DAG,
        DagRunRequest,
        logical_date_for_partition,
        run_dags,
    )

    print(f"[{label}] delivery dates {', '.join(dates)}" + (", then training" if train else ""))
    runs = [DagRunRequest(LAKEHOUSE_DAG, logical_date_for_partition(d)) for d in dates]
    run_dags(runs + ([DagRunRequest(TRAINING_DAG)] if train else []))


def cmd_run(args) -> int:
    """Run the lakehouse DAG for each date, then the training DAG once, through Airflow."""
    run_dates(_dates(args.start, args.days) if args.start else args.dates, train=not args.skip_training)
    return 0


def cmd_backfill(args) -> int:
    """Reprocess history on request: every delivery date in [start, end], then train once."""
    first, last = dt.date.fromisoformat(args.start), dt.date.fromisoformat(args.end)
    if last < first:
        print(f"error: end {last} is before start {first}", file=sys.stderr)
        return 2
    run_dates(_dates(args.start, (last - first).days + 1), train=not args.skip_training, label="backfill")
    return 0


def cmd_train(args) -> int:
    from pipelines.jobs.model import register_and_gate, train

    trained = train(args.dates or None)
    print(json.dumps(register_and_gate(trained), indent=2))
    return 0


def cmd_summary(args) -> int:
    summary = build_summary()
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_demo(args) -> int:
    """The main job end to end: stack up, land simulated telemetry, run the DAGs, summarise."""
    from pipelines import services
    from pipelines.jobs.lake import land_simulated_days

    p = load_params()["simulate"]
    dates = _dates(args.start or p["start_date"], args.days or p["days"])
    try:
        print(f"== 1/4 starting the embedded stack (UIs: {'yes' if args.keep_up else 'no'})")
        services.up(ui=args.keep_up)
        print(f"== 2/4 landing simulated IoT telemetry for {dates[0]} .. {dates[-1]}")
        land_simulated_days(dt.date.fromisoformat(dates[0]), len(dates))
        print("== 3/4 running the Airflow DAGs")
        run_dates(dates, label="demo")
        print("== 4/4 summary")
        print(format_summary(build_summary()))
    finally:
        if not args.keep_up:
            services.down()
        else:
            print("\nThe stack is still up: `platform status`; stop it with `platform down` (or `make down`).")
    return 0


# -- summary ----------------------------------------------------------------------------------
def build_summary() -> dict:
    import mlflow
    from mlflow import MlflowClient
    from pipelines import services, storage
    from pipelines.jobs.lake import read_quality
    from pipelines.storage import ObjectStore

    settings = get_settings()
    store = ObjectStore(settings)
    dataset = settings.dataset
    layers = {}
    for layer in ("bronze", "silver", "quarantine", "gold"):
        parts = storage.list_partitions(store, layer, dataset)
        rows = {p: storage.read_manifest(store, layer, dataset, p).rows for p in parts}
        layers[layer] = {"partitions": len(parts), "rows": sum(rows.values()), "by_partition": rows}
    quality = {}
    for layer in ("bronze", "silver", "gold"):
        results = read_quality(layer, storage.list_partitions(store, layer, dataset), store=store)
        quality[layer] = {
            p: {"success": r.get("success"), "statistics": r.get("statistics")} for p, r in results.items()
        }
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    model_name = load_params()["registry"]["model_name"]
    model: dict = {"name": model_name}
    try:
        rm = client.get_registered_model(model_name)
        model["aliases"] = {alias: str(v) for alias, v in (rm.aliases or {}).items()}
        versions = client.search_model_versions(f"name='{model_name}'")
        latest = max(versions, key=lambda v: int(v.version))
        run = client.get_run(latest.run_id)
        model.update(
            {
                "latest_version": latest.version,
                "run_id": latest.run_id,
                "artifact_uri": run.info.artifact_uri,
                # Proxied artifacts: the server stores mlflow-artifacts:/<path> under its S3 destination.
                "artifact_location": run.info.artifact_uri.replace(
                    "mlflow-artifacts:", settings.mlflow_artifact_root.rstrip("/"), 1
                ).replace("artifacts//", "artifacts/"),
                "model_family": run.data.params.get("model_family"),
                "metrics": {k: round(v, 4) for k, v in sorted(run.data.metrics.items())},
                "trained_on": run.data.tags.get("training_partitions") or run.data.tags.get("gold_snapshot"),
                "gate": {k: v for k, v in latest.tags.items() if k.startswith("gate.")},
            }
        )
    except Exception as e:  # noqa: BLE001 - the summary must still print the lake part
        model["error"] = str(e)
    info = services.status()
    return {
        "dataset": dataset,
        "layers": layers,
        "quality": quality,
        "model": model,
        "endpoints": info["endpoints"],
        "airflow_admin_password_file": info["airflow_admin_password_file"],
    }


def format_summary(s: dict) -> str:
    out = [f"dataset {s['dataset']}", "", "rows per layer:"]
    for layer, info in s["layers"].items():
        out.append(f"  {layer:11s} {info['rows']:>9,d} rows in {info['partitions']} partition(s)")
    out += ["", "quality gates (Great Expectations):"]
    for layer, parts in s["quality"].items():
        for p, r in parts.items():
            stats = r.get("statistics") or {}
            out.append(
                f"  {layer:7s} {p}: {'PASS' if r.get('success') else 'FAIL'}  "
                f"{stats.get('successful_expectations', '?')}/{stats.get('evaluated_expectations', '?')} "
                "expectations"
            )
    m = s["model"]
    out += ["", f"model {m['name']}:"]
    if "error" in m:
        out.append(f"  (not available: {m['error']})")
    else:
        out.append(f"  version {m['latest_version']} ({m.get('model_family')}), aliases {m.get('aliases')}")
        out.append(f"  run {m['run_id']}")
        out.append(f"  artifacts in the object store: {m.get('artifact_location')}")
        metrics = m["metrics"]
        out.append(f"  {'held-out later time range':<28}{'precision':>10}{'recall':>8}{'f1':>8}{'pr_auc':>8}")
        for label, prefix in (("model", ""), ("rule: temp above threshold", "baseline_threshold_")):
            vals = [metrics.get(prefix + k, float("nan")) for k in ("precision", "recall", "f1", "pr_auc")]
            out.append(f"  {label:<28}" + "".join(f"{v:>{w}.3f}" for v, w in zip(vals, (10, 8, 8, 8), strict=True)))
        per_fault = {k.removeprefix("recall_"): v for k, v in metrics.items() if k.startswith("recall_")}
        if per_fault:
            out.append("  recall per fault type: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per_fault.items())))
        gate = m.get("gate") or {}
        out.append(
            f"  offline gate: {'passed' if gate.get('gate.passed') == 'true' else 'FAILED'} "
            f"({gate.get('gate.reason', 'n/a')})"
        )
        out.append(f"  trained on gold partitions: {m.get('trained_on')}")
    out += [
        "",
        "browse:",
        f"  MLflow UI   {s['endpoints']['mlflow']}   (experiments, runs, model registry)",
        f"  Airflow UI  {s['endpoints']['airflow']}   (`make up` keeps it running; user admin, "
        f"password in {s['airflow_admin_password_file']})",
    ]
    return "\n".join(out)


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="platform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the embedded stack (object store, MLflow, Airflow)")
    p.add_argument("--no-ui", action="store_true", help="only what DAG tests need: no Airflow UI processes")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="also start N Celery workers (set AIRFLOW__CORE__EXECUTOR=CeleryExecutor, AIRFLOW__CELERY__BROKER_URL)",
    )
    p.add_argument("--worker-concurrency", type=int, help="task slots per Celery worker (default 2)")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="services and endpoints")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("land", help="land simulated telemetry, or your own CSV with --file")
    p.add_argument("--file")
    p.add_argument("--date", help="event date of --file")
    p.add_argument("--dataset", help="contract name (default from settings)")
    p.add_argument("--start")
    p.add_argument("--days", type=int)
    p.set_defaults(func=cmd_land)

    p = sub.add_parser("layer", help="build one layer for dates, without Airflow")
    p.add_argument("layer", choices=["bronze", "silver", "gold"])
    p.add_argument("dates", nargs="+")
    p.add_argument("--dataset")
    p.add_argument("--run-id")
    p.set_defaults(func=cmd_layer)

    p = sub.add_parser("run", help="run the lakehouse DAG for dates, then the training DAG (airflow dags test)")
    p.add_argument("dates", nargs="*")
    p.add_argument("--start")
    p.add_argument("--days", type=int, default=1)
    p.add_argument("--skip-training", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("backfill", help="reprocess delivery dates START..END through Airflow, then train")
    p.add_argument("start")
    p.add_argument("end")
    p.add_argument("--skip-training", action="store_true")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("train", help="train, register and gate directly, without Airflow")
    p.add_argument("dates", nargs="*")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("summary", help="rows per layer, quality, model and aliases")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("demo", help="the main job end to end on embedded defaults")
    p.add_argument("--keep-up", action="store_true", help="leave the stack and UIs running afterwards")
    p.add_argument("--start")
    p.add_argument("--days", type=int)
    p.set_defaults(func=cmd_demo)

    from pipelines.canary_cli import register_commands as canary_commands

    canary_commands(sub)  # platform serve, platform canary ...
    from pipelines.reproduce_cli import register_commands as reproduce_commands

    reproduce_commands(sub)  # platform stage <name>, platform reproduce, platform dvc-remote
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a user's mistake gets one clear line, not a traceback
        import os

        if os.environ.get("PLATFORM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        print("(set PLATFORM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
