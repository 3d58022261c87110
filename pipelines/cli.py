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
    print(
        f"  MLflow UI:  {info['endpoints']['mlflow']}  (user admin, MLFLOW_AUTH_ADMIN_PASSWORD in {info['env_file']})"
    )
    print(
        f"  Airflow UI: {info['endpoints']['airflow']}  (user admin, password in {info['airflow_admin_password_file']})"
    )


# -- data -------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A command-line argument is wrong: checked before anything lands or runs."""


def _dataset_arg(args) -> str:
    """The --dataset of a command (default: settings), checked against the catalogue."""
    from pipelines.datasets import DatasetError, get_dataset

    name = getattr(args, "dataset", None) or get_settings().dataset
    try:
        return get_dataset(name).name
    except DatasetError as exc:
        raise UsageError(str(exc)) from None


def _date_arg(value: str, what: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except (TypeError, ValueError):
        raise UsageError(f"{what} {value!r} is not a date: write YYYY-MM-DD") from None


def cmd_datasets(args) -> int:
    """Every dataset of the catalogue: contract, layers' row counts and its model's aliases."""
    rows = dataset_overview()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        layers = "  ".join(f"{k} {v:,}" for k, v in r["rows"].items()) if r.get("rows") else r.get("lake", "")
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(r["aliases"].items())) if r.get("aliases") else "none"
        print(f"{r['dataset']:28s} {r['contract']}")
        print(f"  DAGs {', '.join(r['dags'])}; partitions by {r['grain']}")
        print(f"  rows: {layers or 'nothing landed yet'}")
        note = f" ({r['model_error']})" if r.get("model_error") else ""
        print(f"  model {r['model_name']}: aliases {aliases}{note}")
    return 0


def dataset_overview() -> list[dict]:
    from pipelines import storage
    from pipelines.datasets import catalogue

    settings = get_settings()
    rows = []
    store = None
    try:
        from pipelines.storage import ObjectStore

        store = ObjectStore(settings)
    except Exception as e:  # noqa: BLE001 - the catalogue still lists without a running stack
        lake_error = f"lake not reachable: {e}"
    for ds in catalogue().values():
        row = {
            "dataset": ds.name,
            "contract": str(ds.contract_path),
            "dags": [
                ds.lakehouse_dag_id,
                ds.training_dag_id,
                ds.canary_dag_id,
                ds.monitoring_dag_id,
                ds.stream_dag_id,
            ],
            "grain": ds.grain,
            "model_name": ds.model_name,
        }
        if store is not None:
            try:
                row["rows"] = {
                    layer: sum(
                        m.rows
                        for p in storage.list_partitions(store, layer, ds.name)
                        if (m := storage.read_manifest(store, layer, ds.name, p)) is not None
                    )
                    for layer in ("bronze", "silver", "quarantine", "gold")
                }
            except Exception as e:  # noqa: BLE001
                row["lake"] = f"lake not reachable: {type(e).__name__}"
        else:
            row["lake"] = lake_error
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
            row["aliases"] = {a: str(v) for a, v in (client.get_registered_model(ds.model_name).aliases or {}).items()}
        except Exception as e:  # noqa: BLE001
            row["aliases"] = {}
            row["model_error"] = "not registered yet" if "RESOURCE_DOES_NOT_EXIST" in str(e) else type(e).__name__
        rows.append(row)
    return rows


def cmd_land(args) -> int:
    from pipelines.jobs.lake import land_file, land_simulated_days
    from pipelines.storage import ObjectStore

    if getattr(args, "images", None):  # a folder or zip of class sub-folders: pipelines/images
        from pipelines.images.cli import land_command

        return land_command(args)
    dataset = _dataset_arg(args)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UsageError(f"--file {path} does not exist or is not a file")
        delivery = _date_arg(args.date, "--date") if args.date else dt.datetime.now(dt.UTC).date().isoformat()
        store = ObjectStore()
        key = land_file(store, dataset, delivery, path)  # streamed: memory holds one upload part
        print(f"landed s3://{store.settings.landing_bucket}/{key} (dataset {dataset}, delivery date {delivery})")
        print(f"next: platform run --dataset {dataset} {delivery}")
        return 0
    store = ObjectStore()
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


def run_dates(dates: list[str], *, dataset: str | None = None, train: bool = True, label: str = "run") -> None:
    """The dataset's lakehouse DAG once per delivery date, then its training DAG once (airflow dags test).

    Each lakehouse run names its delivery in the run's conf, so deliveries of any age run (a
    logical date before the DAG's start_date would make a run without tasks)."""
    from pipelines.datasets import get_dataset
    from pipelines.orchestration import DagRunRequest, run_dags

    ds = get_dataset(dataset or get_settings().dataset)
    print(f"[{label}] {ds.name}: delivery dates {', '.join(dates)}" + (", then training" if train else ""))
    runs = [DagRunRequest(ds.lakehouse_dag_id, conf={"delivery_date": d}) for d in dates]
    run_dags(runs + ([DagRunRequest(ds.training_dag_id)] if train else []))


def cmd_run(args) -> int:
    """Run the dataset's lakehouse DAG for each delivery date, then its training DAG once, through Airflow."""
    dataset = _dataset_arg(args)
    if args.start:
        dates = _dates(_date_arg(args.start, "--start"), args.days)
    elif args.dates:
        dates = [_date_arg(d, "delivery date") for d in args.dates]
    else:
        dates = _landed_dates(dataset)
        if not dates:
            raise UsageError(f"nothing landed for {dataset}: `platform land --dataset {dataset} --file F` first")
    run_dates(dates, dataset=dataset, train=not args.skip_training)
    return 0


def _landed_dates(dataset: str) -> list[str]:
    """Every delivery date landed for the dataset (what `run` processes when given no date)."""
    from pipelines import storage
    from pipelines.storage import ObjectStore

    store = ObjectStore()
    keys = store.list_keys(store.settings.landing_bucket, storage.landing_prefix(dataset))
    return sorted({k.split("/")[1] for k in keys if k.count("/") >= 2})


def cmd_backfill(args) -> int:
    """Reprocess history on request: every delivery date in [start, end], then train once."""
    first, last = dt.date.fromisoformat(args.start), dt.date.fromisoformat(args.end)
    if last < first:
        print(f"error: end {last} is before start {first}", file=sys.stderr)
        return 2
    run_dates(
        _dates(args.start, (last - first).days + 1),
        dataset=_dataset_arg(args),
        train=not args.skip_training,
        label="backfill",
    )
    return 0


def cmd_train(args) -> int:
    from pipelines.jobs.model import register_and_gate, train

    trained = train(args.dates or None, dataset=_dataset_arg(args))
    print(json.dumps(register_and_gate(trained), indent=2))
    return 0


def cmd_summary(args) -> int:
    summary = build_summary(_dataset_arg(args))
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
def build_summary(dataset: str | None = None) -> dict:
    import mlflow
    from mlflow import MlflowClient
    from pipelines import services, storage
    from pipelines.datasets import get_dataset
    from pipelines.jobs.lake import read_quality
    from pipelines.storage import ObjectStore

    settings = get_settings()
    store = ObjectStore(settings)
    ds = get_dataset(dataset or settings.dataset)
    dataset = ds.name
    layers = {}
    for layer in ("bronze", "silver", "quarantine", "gold"):
        parts = storage.list_partitions(store, layer, dataset)
        rows = {p: storage.read_manifest(store, layer, dataset, p).rows for p in parts}
        # verified, not only read: every file a manifest names must be in the store
        missing = {p: m for p in parts if (m := storage.verify_partition(store, layer, dataset, p))}
        layers[layer] = {"partitions": len(parts), "rows": sum(rows.values()), "by_partition": rows}
        layers[layer]["missing_files"] = missing
    quality = {}
    for layer in ("bronze", "silver", "gold"):
        results = read_quality(layer, dataset=dataset, store=store)  # every gate run recorded for it
        quality[layer] = {
            p: {
                "success": r.get("success"),
                "statistics": r.get("statistics"),
                "failed": sorted(
                    {
                        f"{o['expectation']}{'(' + o['column'] + ')' if o.get('column') else ''} [{o['severity']}]"
                        for o in r.get("outcomes") or []
                        if not o.get("success")
                    }
                ),
            }
            for p, r in results.items()
        }
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    model_name = ds.model_name
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
                "baseline_rule": run.data.tags.get("baseline_rule"),
                "unmeasured": run.data.tags.get("unmeasured"),
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
        "env_file": info["env_file"],
    }


def format_summary(s: dict) -> str:
    out = [f"dataset {s['dataset']}", "", "rows per layer:"]
    for layer, info in s["layers"].items():
        out.append(f"  {layer:11s} {info['rows']:>9,d} rows in {info['partitions']} partition(s)")
        for p, keys in (info.get("missing_files") or {}).items():
            out.append(
                f"    NOT READABLE: {layer} {p}: {len(keys)} file(s) its manifest names are missing "
                f"(first: {keys[0]}); run that date again"
            )
    out += ["", "quality gates (Great Expectations), per layer:"]
    for layer, parts in s["quality"].items():
        stats = [r.get("statistics") or {} for r in parts.values()]
        passed = sum(bool(r.get("success")) for r in parts.values())
        evaluated = sum(int(x.get("evaluated_expectations") or 0) for x in stats)
        ok = sum(int(x.get("successful_expectations") or 0) for x in stats)
        failed: dict[str, int] = {}
        for r in parts.values():
            for name in r.get("failed") or []:
                failed[name] = failed.get(name, 0) + 1
        line = f"  {layer:7s} {passed}/{len(parts)} partitions passed; {ok}/{evaluated} expectations met"
        if failed:
            line += "; not met: " + ", ".join(f"{n} in {c} partition(s)" for n, c in sorted(failed.items()))
        out.append(line)
    m = s["model"]
    out += ["", f"model {m['name']}:"]
    if "error" in m:
        out.append(f"  (not available: {m['error']})")
    else:
        out.append(f"  version {m['latest_version']} ({m.get('model_family')}), aliases {m.get('aliases')}")
        out.append(f"  run {m['run_id']}")
        out.append(f"  artifacts in the object store: {m.get('artifact_location')}")
        metrics = m["metrics"]
        if "pr_auc" in metrics or "f1" in metrics:
            out.append(f"  {'held-out later time range':<28}{'precision':>10}{'recall':>8}{'f1':>8}{'pr_auc':>8}")
            for label, prefix in (("model", ""), ("baseline rule", "baseline_threshold_")):
                vals = [metrics.get(prefix + k, float("nan")) for k in ("precision", "recall", "f1", "pr_auc")]
                out.append(f"  {label:<28}" + "".join(f"{v:>{w}.3f}" for v, w in zip(vals, (10, 8, 8, 8), strict=True)))
        if m.get("baseline_rule"):
            out.append(f"  baseline rule: {m['baseline_rule'][:150]}")
        if "event_windows" in metrics:
            out.append(
                f"  events: {int(metrics['event_windows_detected'])}/{int(metrics['event_windows'])} windows detected, "
                f"{metrics.get('event_false_alarm_episodes_per_day', 0):.2f} false alarms/day"
                + (f", NAB standard {metrics['nab_standard']:.1f}" if "nab_standard" in metrics else "")
            )
        if m.get("unmeasured"):
            out.append(f"  not measured: {m['unmeasured'][:200]}")
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
        f"  MLflow UI   {s['endpoints']['mlflow']}   (experiments, runs, model registry; user admin, "
        f"MLFLOW_AUTH_ADMIN_PASSWORD in {s['env_file']})",
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

    p = sub.add_parser("datasets", help="every dataset (contract): its DAGs, rows per layer, model aliases")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("land", help="land simulated telemetry, or your own file with --file")
    p.add_argument("--file", help="a CSV / JSON-lines file (optionally .gz), landed as delivered")
    p.add_argument("--images", metavar="DIR", help="a folder (or .zip) of images, one sub-folder per class")
    p.add_argument(
        "--date",
        help="DELIVERY date of --file, YYYY-MM-DD (default: today); records are filed by their own event time",
    )
    p.add_argument("--dataset", help="dataset (contract) name; default PLATFORM_DATASET or iot_telemetry")
    p.add_argument("--start")
    p.add_argument("--days", type=int)
    p.set_defaults(func=cmd_land)

    p = sub.add_parser("layer", help="build one layer for partitions, without Airflow")
    p.add_argument("layer", choices=["bronze", "silver", "gold"])
    p.add_argument("dates", nargs="+")
    p.add_argument("--dataset")
    p.add_argument("--run-id")
    p.set_defaults(func=cmd_layer)

    p = sub.add_parser(
        "run", help="run the dataset's lakehouse DAG per delivery date, then its training DAG (airflow dags test)"
    )
    p.add_argument("dates", nargs="*", help="delivery dates (default: every landed one)")
    p.add_argument("--dataset", help="dataset (contract) name; default PLATFORM_DATASET or iot_telemetry")
    p.add_argument("--start")
    p.add_argument("--days", type=int, default=1)
    p.add_argument("--skip-training", action="store_true")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("backfill", help="reprocess delivery dates START..END through Airflow, then train")
    p.add_argument("start")
    p.add_argument("end")
    p.add_argument("--dataset", help="dataset (contract) name")
    p.add_argument("--skip-training", action="store_true")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("train", help="train, register and gate directly, without Airflow")
    p.add_argument("dates", nargs="*", help="gold partitions (default: all)")
    p.add_argument("--dataset", help="dataset (contract) name")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("summary", help="rows per layer, quality, model and aliases")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dataset", help="dataset (contract) name")
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
    from pipelines.streaming.cli import register_commands as streaming_commands

    streaming_commands(sub)  # platform stream, platform simulate --mqtt
    from pipelines.monitoring.cli import register_commands as monitoring_commands

    monitoring_commands(sub)  # platform monitor
    from pipelines.dashboard.cli import register_commands as dashboard_commands

    dashboard_commands(sub)  # platform dashboard
    return parser


# Commands that read or write the lake or the registry: checked first to talk to our own stack.
STACK_COMMANDS = ("land", "layer", "run", "backfill", "train", "summary", "serve")


def main(argv: list[str] | None = None) -> int:
    import os

    os.umask(0o077)  # what the CLI writes (logs, data) is its owner's alone, as the stack's files are
    from pipelines.waits import announce_waits

    announce_waits()  # a service that stops answering is said, not waited on in silence
    args = build_parser().parse_args(argv)
    try:
        if args.command in STACK_COMMANDS:
            # credentials go only to the servers `platform up` started here (pipelines.services)
            from pipelines.services import verify_own_stack

            verify_own_stack(get_settings())
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a user's mistake gets one clear line, not a traceback
        import os

        if os.environ.get("PLATFORM_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        print("(set PLATFORM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
