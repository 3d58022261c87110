"""The DVC pipeline's stages: the lake's pure functions on local Parquet under data/, repeatable to the byte.

`dvc.yaml` calls each stage as `python -m pipelines.cli stage <name>` from the checkout's root, so a
reproduction in an old worktree runs that commit's code. Stages read only params.yaml and their
declared deps, and write only their declared outs:

    ingest   -> data/landing/<dataset>/<date>/*.csv          simulator (params.simulate) or dvc.ingest_file
    bronze   -> data/bronze/<dataset>/event_date=<d>/part-0.parquet
    silver   -> data/silver/..., data/quarantine/...
    gold     -> data/gold/...
    validate -> data/quality/<layer>/<dataset>/event_date=<d>/validation.json, metrics/quality.json
    train    -> models/model.skops, models/model.json, metrics/train.json   (+ an MLflow run)
    evaluate -> metrics/eval.json, plots/*.csv (PR curves, confusion pairs), plots/*.png

Determinism: seeded simulator and models, sorted partitions and files, Parquet with fixed settings,
no wall-clock time in any output (bronze lineage gets a run id and ingestion time derived from the
partition date), and the skops model file normalised (zip entry names and timestamps).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import math
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

Progress = Callable[[str], Any]

DATA = Path("data")
LAYER_DIRS = ("landing", "bronze", "silver", "quarantine", "gold", "quality")
MODEL_FILE = Path("models/model.skops")
MODEL_CARD = Path("models/model.json")
TRAIN_METRICS = Path("metrics/train.json")
EVAL_METRICS = Path("metrics/eval.json")
QUALITY_METRICS = Path("metrics/quality.json")
PLOTS = Path("plots")
PART_FILE = "part-0.parquet"
DATA_DIGEST_TAG = "dvc_data_digest"  # sha256 over the gold partitions a run was trained on


class StageError(RuntimeError):
    """A DVC stage cannot run: the message names the input and the fix."""


# --------------------------------------------------------------------------- params and paths


def stage_params(root: Path) -> dict:
    """params.yaml next to dvc.yaml (DVC runs stages from there; `-S` edits this file)."""
    from pipelines.settings import load_params

    return load_params(root / "params.yaml")


def dvc_params(params: dict) -> dict:
    return {"dataset": "iot_telemetry", "ingest_file": "", "ingest_date": "", **(params.get("dvc") or {})}


def layer_dir(root: Path, layer: str, dataset: str) -> Path:
    return root / DATA / layer / dataset


def partition_file(root: Path, layer: str, dataset: str, partition: str) -> Path:
    return layer_dir(root, layer, dataset) / f"event_date={partition}" / PART_FILE


def partitions(root: Path, layer: str, dataset: str) -> list[str]:
    base = layer_dir(root, layer, dataset)
    if not base.is_dir():
        return []
    return sorted(p.name.split("=", 1)[1] for p in base.iterdir() if p.name.startswith("event_date="))


def ingested_at(partition: str) -> dt.datetime:
    """Fixed ingestion time for DVC-built bronze: the end of the event date (no wall clock in outputs)."""
    return dt.datetime.combine(dt.date.fromisoformat(partition), dt.time(), tzinfo=dt.UTC) + dt.timedelta(
        days=1
    )


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_parquet(path: Path, table: pa.Table) -> None:
    from pipelines.storage import table_to_parquet_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(table_to_parquet_bytes(table))


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, sort_keys=True, default=str) + "\n")


def _finite(obj: Any) -> Any:
    """NaN/inf become null: strict JSON for `dvc metrics show` (the comparison treats null as NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _read_layer(root: Path, layer: str, dataset: str, partition: str) -> pa.Table:
    path = partition_file(root, layer, dataset, partition)
    if not path.exists():
        raise StageError(f"{path} is missing: run `dvc repro {layer}` (or `dvc pull`) first")
    return pq.read_table(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gold_snapshot(root: Path, dataset: str) -> dict:
    """What training read: per-partition rows and file hashes, and one digest over them (as read_gold)."""
    parts = partitions(root, "gold", dataset)
    snapshot: dict[str, Any] = {"source": "dvc", "path": str(DATA / "gold" / dataset), "dataset": dataset}
    snapshot["partitions"] = {
        p: {
            "rows": pq.read_metadata(partition_file(root, "gold", dataset, p)).num_rows,
            "content_sha256": _sha256(partition_file(root, "gold", dataset, p)),
        }
        for p in parts
    }
    snapshot["content_sha256"] = hashlib.sha256(
        "".join(v["content_sha256"] for _, v in sorted(snapshot["partitions"].items())).encode()
    ).hexdigest()
    return snapshot


def read_gold_frame(root: Path, dataset: str) -> pd.DataFrame:
    parts = partitions(root, "gold", dataset)
    if not parts:
        raise StageError(f"no gold partitions under {layer_dir(root, 'gold', dataset)}: run `dvc repro gold`")
    from pipelines.layers.gold import from_storage

    return pd.concat([from_storage(_read_layer(root, "gold", dataset, p)) for p in parts], ignore_index=True)


# --------------------------------------------------------------------------- stages


def ingest(root: Path, progress: Progress = print) -> list[Path]:
    """Land the simulator's days (params.simulate), or the file named by dvc.ingest_file, as CSV."""
    from pipelines.simulator import simulate_day_csv

    params = stage_params(root)
    d = dvc_params(params)
    out = _fresh_dir(root / DATA / "landing")
    written = []
    if d["ingest_file"]:
        source = root / d["ingest_file"]
        if not source.is_file():
            raise StageError(f"dvc.ingest_file={d['ingest_file']!r}: no such file under {root}")
        if not d["ingest_date"]:
            raise StageError("dvc.ingest_file needs dvc.ingest_date (YYYY-MM-DD): the event date it holds")
        day = dt.date.fromisoformat(str(d["ingest_date"])).isoformat()
        target = out / d["dataset"] / day / source.name
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        written.append(target)
    else:
        p = params["simulate"]
        start = dt.date.fromisoformat(str(p["start_date"]))
        for i in range(int(p["days"])):
            day = start + dt.timedelta(days=i)
            target = out / d["dataset"] / day.isoformat() / f"telemetry-{day}.csv"
            target.parent.mkdir(parents=True)
            target.write_bytes(
                simulate_day_csv(
                    day, devices=int(p["devices"]), freq_seconds=int(p["freq_seconds"]), seed=int(p["seed"])
                )
            )
            written.append(target)
    for path in written:
        progress(f"[ingest] {path.relative_to(root)} ({path.stat().st_size / 1e6:.2f} MB)")
    return written


def bronze(root: Path, progress: Progress = print) -> list[str]:
    from pipelines.contracts import load_contract
    from pipelines.layers.bronze import parse_landing_csv

    dataset = dvc_params(stage_params(root))["dataset"]
    contract = load_contract(dataset)
    landing = layer_dir(root, "landing", dataset)
    days = sorted(p.name for p in landing.iterdir() if p.is_dir()) if landing.is_dir() else []
    if not days:
        raise StageError(f"nothing landed under {landing}: run `dvc repro ingest`")
    _fresh_dir(root / DATA / "bronze")
    for day in days:
        tables = []
        for path in sorted(p for p in (landing / day).iterdir() if p.is_file()):
            data = path.read_bytes()
            tables.append(
                parse_landing_csv(
                    data,
                    source_key=str(path.relative_to(root)),
                    source_etag=hashlib.md5(data).hexdigest(),  # what S3 reports for a single-part PUT
                    run_id=f"dvc:{dataset}:{day}",
                    ingested_at=ingested_at(day),
                    contract=contract,
                )
            )
        table = pa.concat_tables(tables, promote_options="default")
        _write_parquet(partition_file(root, "bronze", dataset, day), table)
        progress(f"[bronze] {day}: {table.num_rows} records")
    return days


def silver(root: Path, progress: Progress = print) -> list[str]:
    from pipelines.contracts import load_contract
    from pipelines.layers.silver import to_silver

    dataset = dvc_params(stage_params(root))["dataset"]
    contract = load_contract(dataset)
    days = partitions(root, "bronze", dataset)
    if not days:
        raise StageError(f"no bronze partitions under {layer_dir(root, 'bronze', dataset)}")
    _fresh_dir(root / DATA / "silver")
    _fresh_dir(root / DATA / "quarantine")
    for day in days:
        table = _read_layer(root, "bronze", dataset, day)
        rows, quarantine = to_silver(table, contract, now=ingested_at(day))
        _write_parquet(
            partition_file(root, "quarantine", dataset, day),
            pa.Table.from_pandas(
                quarantine.astype(str) if len(quarantine) else quarantine, preserve_index=False
            ),
        )
        _write_parquet(
            partition_file(root, "silver", dataset, day), pa.Table.from_pandas(rows, preserve_index=False)
        )
        progress(f"[silver] {day}: {table.num_rows} in -> {len(rows)} silver, {len(quarantine)} quarantined")
    return days


def gold(root: Path, progress: Progress = print) -> list[str]:
    """Per event date, with the previous day's tail as warm-up (exactly as the lake's gold job)."""
    from pipelines.contracts import load_contract
    from pipelines.layers.gold import to_gold, to_storage, warmup_tail

    params = stage_params(root)
    dataset = dvc_params(params)["dataset"]
    contract = load_contract(dataset)
    window = int(params["gold"]["window"])
    long_window = int(params["gold"].get("long_window", 240))
    days = partitions(root, "silver", dataset)
    if not days:
        raise StageError(f"no silver partitions under {layer_dir(root, 'silver', dataset)}")
    _fresh_dir(root / DATA / "gold")
    for day in days:
        rows = _read_layer(root, "silver", dataset, day).to_pandas()
        previous = (dt.date.fromisoformat(day) - dt.timedelta(days=1)).isoformat()
        warmup = None
        if previous in days:
            prev = _read_layer(root, "silver", dataset, previous).to_pandas()
            warmup = warmup_tail(prev, contract.entity.column, contract.event_time.column, window, long_window)
        features = to_gold(rows, contract, window=window, warmup=warmup, long_window=long_window)
        _write_parquet(partition_file(root, "gold", dataset, day), to_storage(features))
        progress(f"[gold] {day}: {len(features)} feature rows")
    return days


def _quality_summary(result) -> dict:
    """The deterministic part of a GX result (no run times, durations or clock-derived bounds)."""
    outcomes = [
        {
            "expectation": o.expectation,
            "column": o.column,
            "severity": o.severity,
            "success": bool(o.success),
            "unexpected_count": int(o.unexpected_count or 0),
        }
        for o in result.outcomes
    ]
    outcomes.sort(key=lambda o: (o["expectation"], str(o["column"]), o["severity"]))
    return {
        "layer": result.layer,
        "partition": result.partition,
        "success": bool(result.success),
        "evaluated": len(outcomes),
        "passed": sum(o["success"] for o in outcomes),
        "critical_failed": len(result.critical_failures),
        "warnings": len(result.warnings),
        "outcomes": outcomes,
    }


def validate(root: Path, progress: Progress = print) -> dict:
    """GX suites of every layer and partition; exits non-zero on a critical failure (train never runs)."""
    from pipelines.contracts import load_contract
    from pipelines.quality import validate_partition

    params = stage_params(root)
    dataset = dvc_params(params)["dataset"]
    contract = load_contract(dataset)
    config = (params.get("quality") or {}).get(contract.name, {})
    _fresh_dir(root / DATA / "quality")
    totals: dict[str, dict[str, int]] = {}
    failed = []
    for layer in ("bronze", "silver", "gold"):
        days = partitions(root, layer, dataset)
        for i, day in enumerate(days):
            frame = _read_layer(root, layer, dataset, day).to_pandas()
            kwargs: dict[str, Any] = {}
            if layer == "bronze":
                kwargs["expected_row_count"] = len(frame)
            if layer == "gold" and i > 0:
                kwargs["reference"] = _read_layer(root, "gold", dataset, days[i - 1]).to_pandas()
            result = validate_partition(frame, layer, contract, day, config=config.get(layer), **kwargs)
            progress(result.summary())
            summary = _quality_summary(result)
            _write_json(
                root / DATA / "quality" / layer / dataset / f"event_date={day}" / "validation.json", summary
            )
            t = totals.setdefault(layer, {"partitions": 0, "evaluated": 0, "passed": 0, "critical_failed": 0})
            t["partitions"] += 1
            for key in ("evaluated", "passed", "critical_failed"):
                t[key] += summary[key]
            if not result.success:
                failed.append(f"{layer} {day}")
    _write_json(root / QUALITY_METRICS, totals)
    if failed:
        raise StageError(
            f"quality gate failed for {', '.join(failed)}: see the expectations above and "
            f"{DATA / 'quality'}; fix the data or the contract, then `dvc repro` again"
        )
    return totals


def _tracking(root: Path) -> tuple[str, str, tempfile.TemporaryDirectory | None]:
    """The configured MLflow server, or a throwaway local store when none is configured."""
    from pipelines.settings import get_settings

    settings = get_settings()
    if "mlflow_tracking_uri" in settings.model_fields_set:
        return settings.mlflow_tracking_uri, settings.mlflow_experiment, None
    import mlflow

    tmp = tempfile.TemporaryDirectory(prefix="dvc-train-mlflow-")
    uri = f"sqlite:///{tmp.name}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("dvc-local", artifact_location=f"file://{tmp.name}/artifacts")
    return uri, "dvc-local", tmp


def source_dirty(root: Path) -> bool | None:
    """Uncommitted changes to tracked files other than what `dvc repro` itself rewrites mid-run
    (dvc.lock, and the git-tracked metrics/ and plots/ outputs it deletes before a stage runs)."""
    import subprocess

    spec = [".", ":!dvc.lock", ":!metrics", ":!plots"]
    cmd = ["git", "status", "--porcelain", "--untracked-files=no", "--", *spec]
    try:
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


VOLATILE_METRIC_MARKERS = ("duration", "seconds", "_ms", "latency")


def volatile(metric: str) -> bool:
    """Timings differ run to run: never part of a DVC output or a reproduction check."""
    return any(m in metric for m in VOLATILE_METRIC_MARKERS)


def logged_metrics(result) -> dict[str, float]:
    """The metrics train_and_log puts on its MLflow run, from its TrainResult (same names)."""
    return {
        **result.metrics,
        **{f"baseline_threshold_{k}": v for k, v in result.baseline_metrics.items()},
        **result.candidate_metrics,
        "decision_threshold": result.threshold,
        "train_rows": float(result.train_rows),
        "test_rows": float(result.test_rows),
    }


def train(root: Path, progress: Progress = print) -> dict:
    """train_and_log on data/gold; the model, its card and the run's metrics as DVC outputs."""
    import mlflow.sklearn

    import mlflow
    from pipelines import lineage
    from pipelines.training import TrainingContext, train_and_log

    params = stage_params(root)
    dataset = dvc_params(params)["dataset"]
    frame = read_gold_frame(root, dataset)
    snapshot = gold_snapshot(root, dataset)
    quality = {
        p.parent.name.split("=", 1)[1]: json.loads(p.read_text())
        for p in sorted((root / DATA / "quality" / "gold" / dataset).glob("event_date=*/validation.json"))
    }
    uri, experiment, tmp = _tracking(root)
    try:
        context = TrainingContext(
            dataset_name=dataset,
            data_snapshot=snapshot,
            git_commit=lineage.git_commit(),
            dvc_lock_digest=lineage.dvc_lock_digest(),
            gx_summary={"statistics": _gx_totals(quality)} if quality else None,
        )
        result = train_and_log(
            frame, params, context, tracking_uri=uri, experiment=experiment, progress=progress
        )
        client = mlflow.MlflowClient(uri)
        for key, value in {
            DATA_DIGEST_TAG: snapshot["content_sha256"],
            "dvc_stage": "train",
            "git_dirty": str(source_dirty(root)).lower(),
        }.items():
            client.set_tag(result.run_id, key, value)
        # Exactly what the run holds (train_and_log's metric set evolves), minus timings.
        metrics = {k: v for k, v in client.get_run(result.run_id).data.metrics.items() if not volatile(k)}
        mlflow.set_tracking_uri(uri)
        model = mlflow.sklearn.load_model(result.model_uri)
    finally:
        if tmp is not None:
            tmp.cleanup()
    import skops.io

    (root / MODEL_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / MODEL_FILE).write_bytes(stable_skops_bytes(skops.io.dumps(model)))
    _write_json(
        root / MODEL_CARD,
        {
            "model_family": result.model_family,
            "threshold": result.threshold,
            "feature_columns": result.feature_columns,
            "training_partitions": result.training_partitions,
            "data_digest": snapshot["content_sha256"],
        },
    )
    _write_json(root / TRAIN_METRICS, metrics)
    progress(f"[train] MLflow run {result.run_id} ({uri if tmp is None else 'local, discarded'})")
    return {"run_id": result.run_id if tmp is None else None, "metrics": metrics}


def _gx_totals(quality: dict) -> dict:
    return {
        "success": all(q["success"] for q in quality.values()),
        "evaluated_expectations": sum(q["evaluated"] for q in quality.values()),
        "successful_expectations": sum(q["passed"] for q in quality.values()),
        "unsuccessful_expectations": sum(q["evaluated"] - q["passed"] for q in quality.values()),
    }


def evaluate(root: Path, progress: Progress = print) -> dict:
    """The saved model on the held-out (latest) time range: metrics, PR curve points, confusion matrix."""
    import numpy as np
    import skops.io
    from sklearn.metrics import precision_recall_curve

    from pipelines import plots
    from pipelines.training import (
        SKOPS_TRUSTED_TYPES,
        anomaly_scores,
        labelled,
        split_by_time,
        threshold_rule_metrics,
        threshold_rule_scores,
    )
    from pipelines.training import evaluate as evaluate_scores

    params = stage_params(root)
    tp = params["train"]
    dataset = dvc_params(params)["dataset"]
    card = json.loads((root / MODEL_CARD).read_text())
    model = skops.io.loads((root / MODEL_FILE).read_bytes(), trusted=SKOPS_TRUSTED_TYPES)
    _, test_df = split_by_time(read_gold_frame(root, dataset), float(tp["test_fraction"]))
    test = labelled(test_df)
    y = test["is_anomaly"].astype(int).to_numpy()
    scores = anomaly_scores(model, test[card["feature_columns"]])
    threshold = float(card["threshold"])
    temp_above = float(tp.get("threshold_rule", {}).get("temp_above", 32.0))
    model_metrics = evaluate_scores(scores, y, test["label"], threshold)
    rule_metrics = threshold_rule_metrics(test, temp_above)
    metrics = {**model_metrics, **{f"baseline_threshold_{k}": v for k, v in rule_metrics.items()}}
    _write_json(root / EVAL_METRICS, metrics)

    _fresh_dir(root / PLOTS)
    rule_scores = threshold_rule_scores(test, temp_above)[0]
    for name, s in (("pr_curve.csv", scores), ("pr_curve_threshold_rule.csv", rule_scores)):
        precision, recall, _ = precision_recall_curve(y, s)
        curve = pd.DataFrame({"recall": recall, "precision": precision}).round(6)
        curve.to_csv(root / PLOTS / name, index=False, lineterminator="\n")
    names = np.array(["normal", "anomaly"])
    pd.DataFrame({"actual": names[y], "predicted": names[(scores >= threshold).astype(int)]}).to_csv(
        root / PLOTS / "confusion_matrix.csv", index=False, lineterminator="\n"
    )
    figures = {
        "pr_curve.png": plots.pr_curves(
            y, {card["model_family"]: scores, f"temp > {temp_above}": rule_scores}
        ),
        "confusion_matrix.png": plots.confusion_matrix_figure(y, (scores >= threshold).astype(int)),
    }
    for name, fig in figures.items():
        fig.savefig(root / PLOTS / name, dpi=80, metadata={"Software": None})
        plots.close(fig)
    progress(
        f"[evaluate] test rows {len(test)}: PR-AUC {model_metrics['pr_auc']:.4f} F1 {model_metrics['f1']:.4f}"
        f" | threshold rule PR-AUC {rule_metrics['pr_auc']:.4f}"
    )
    return metrics


STAGES: dict[str, Callable[..., Any]] = {
    "ingest": ingest,
    "bronze": bronze,
    "silver": silver,
    "gold": gold,
    "validate": validate,
    "train": train,
    "evaluate": evaluate,
}


# --------------------------------------------------------------------------- stable model bytes

_NPY_NAME = re.compile(r"\d+\.npy")
_OBJECT_ID = re.compile(r'"__id__": (\d+)')


def stable_skops_bytes(data: bytes) -> bytes:
    """skops names entries and memo keys by id() and stamps zip times: number them by first use, fix times."""
    src = zipfile.ZipFile(io.BytesIO(data))
    schema = src.read("schema.json").decode()
    renames: dict[str, str] = {}
    for name in _NPY_NAME.findall(schema):
        renames.setdefault(name, f"{len(renames):06d}.npy")
    pattern = re.compile("|".join(re.escape(n) for n in sorted(renames, key=len, reverse=True)))
    new_schema = pattern.sub(lambda m: renames[m.group(0)], schema) if renames else schema
    ids: dict[str, str] = {}  # "__id__" (shared-reference memo keys) are id()s too: number by first use
    new_schema = _OBJECT_ID.sub(
        lambda m: f'"__id__": {ids.setdefault(m.group(1), str(len(ids) + 1))}', new_schema
    )
    entries = {"schema.json": new_schema.encode()}
    for info in src.infolist():
        if info.filename != "schema.json":
            entries[renames.get(info.filename, info.filename)] = src.read(info.filename)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            dst.writestr(info, entries[name])
    return out.getvalue()
