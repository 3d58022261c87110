"""The DVC pipeline's stages: the lake's own layer jobs on a local store under data/, repeatable to the byte.

`dvc.yaml` calls each stage as `python -m pipelines.cli stage <name>` from the checkout's root, so a
reproduction in an old worktree runs that commit's code. The layer stages run exactly what the DAGs
run (`pipelines.jobs.lake`: land_bytes, build_bronze, build_silver, build_gold, read_gold), through
a `LocalStore` rooted at data/ instead of the S3 `ObjectStore`: buckets are folders, so data/ is
laid out as the object store is (manifests, run-scoped files, quarantine), and one lake is written
one way. Stages read only params.yaml and their declared deps, and write only their declared outs:

    ingest   -> data/landing/<dataset>/<date>/*              simulator (params.simulate) or dvc.ingest_file
    bronze   -> data/lake/bronze/<dataset>/event_date=<d>/: _manifest.json, run=dvc-<delivery>/delivery=<delivery>/*
    silver   -> data/lake/silver/..., data/lake/quarantine/...
    gold     -> data/lake/gold/...
    validate -> data/quality/<layer>/<dataset>/event_date=<d>/validation.json, metrics/quality.json
    train    -> models/model.skops, models/model.json, metrics/train.json   (+ an MLflow run)
    evaluate -> metrics/eval.json, plots/*.csv (PR curves, confusion pairs), plots/*.png

The image stages do the same for one image dataset (params.yaml `images`) under data/images, with
the images DAG's jobs (`pipelines.images.lake`) and its training's `train_and_log_images`:

    images_land   -> data/images/landing/<dataset>/<delivery>/*.zip   images.source, or generated photos
    images_bronze -> data/images/lake/bronze/...
    images_silver -> data/images/lake/silver/..., data/images/lake/quarantine/...
    images_gold   -> data/images/lake/gold/...
    images_train  -> models/images/model.skops, models/images/model.json, metrics/images_train.json

(The jobs also store their own gate results under data/lake/quality/; those hold run times and
durations, so they are not DVC outputs: `validate` writes the deterministic summaries.)

Determinism: seeded simulator and models, partitions processed in date order, fixed run ids
(`dvc-<date>`) and a pinned store clock (ingestion and commit times: the end of the date a job
runs for), so manifests, file names and Parquet bytes are the same on every run; the skops model
file is normalised (zip entry names and timestamps).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.storage import LocalStore

Progress = Callable[[str], Any]

DATA = Path("data")
LANDING_BUCKET = "landing"  # data/landing: what was delivered
LAKE_BUCKET = "lake"  # data/lake: bronze, silver, quarantine, gold (+ the jobs' gate results)
QUALITY_DIR = DATA / "quality"
MODEL_FILE = Path("models/model.skops")
MODEL_CARD = Path("models/model.json")
TRAIN_METRICS = Path("metrics/train.json")
EVAL_METRICS = Path("metrics/eval.json")
QUALITY_METRICS = Path("metrics/quality.json")
PLOTS = Path("plots")
DATA_DIGEST_TAG = "dvc_data_digest"  # the gold snapshot's content_sha256 (manifest hashes) a run trained on


class StageError(RuntimeError):
    """A DVC stage cannot run: the message names the input and the fix."""


# --------------------------------------------------------------------------- params, store, clock


def stage_params(root: Path) -> dict:
    """params.yaml next to dvc.yaml (DVC runs stages from there; `-S` edits this file)."""
    from pipelines.settings import load_params

    return load_params(root / "params.yaml")


def dvc_params(params: dict) -> dict:
    return {"dataset": "iot_telemetry", "ingest_file": "", "ingest_date": "", **(params.get("dvc") or {})}


def dataset_params(root: Path) -> tuple[str, dict]:
    """The DVC dataset and params.yaml as its jobs see it (the dataset's train/registry/gold
    overrides merged in, `pipelines.datasets.effective_params`), as the training DAG reads them."""
    from pipelines.datasets import effective_params

    params = stage_params(root)
    dataset = dvc_params(params)["dataset"]
    return dataset, effective_params(dataset, params)


def ingested_at(partition: str) -> dt.datetime:
    """The pinned clock of a DVC job for a date: the end of that date (no wall clock in outputs)."""
    return dt.datetime.combine(dt.date.fromisoformat(partition), dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)


def run_id(date: str) -> str:
    """The run id of a DVC job for a date: in file names, manifests and bronze lineage, so fixed."""
    return f"dvc-{date}"


def local_store(root: Path, dataset: str, data: Path = DATA) -> LocalStore:
    """The lake under <root>/data (the image stages': <root>/data/images) with fixed bucket names:
    dvc.yaml's outs name these folders, whatever buckets the environment configures for the object store."""
    from pipelines.settings import get_settings

    settings = get_settings().model_copy(
        update={"landing_bucket": LANDING_BUCKET, "lake_bucket": LAKE_BUCKET, "dataset": dataset}
    )
    store = LocalStore(root / data, settings)
    store.ensure_buckets()
    return store


@contextmanager
def job_context(store: LocalStore, root: Path, date: str) -> Iterator[None]:
    """Run a lake job as of `date`: the store's clock pinned to the end of that date, and the jobs'
    params read from <root>/params.yaml (the file DVC tracks), not the package's checkout."""
    previous_clock, previous_params = store.clock, os.environ.get("PLATFORM_PARAMS_FILE")
    at = ingested_at(date)
    store.clock = lambda: at
    os.environ["PLATFORM_PARAMS_FILE"] = str(root / "params.yaml")
    try:
        yield
    finally:
        store.clock = previous_clock
        if previous_params is None:
            os.environ.pop("PLATFORM_PARAMS_FILE", None)
        else:
            os.environ["PLATFORM_PARAMS_FILE"] = previous_params


def _contract(dataset: str):
    from pipelines.jobs.lake import _contract as lake_contract

    return lake_contract(dataset)  # the jobs' own lookup, not a second one


def _clear(store: LocalStore, bucket: str, prefix: str) -> None:
    """Start a layer's output empty, as DVC does before it runs the stage (also for a run by hand)."""
    path = store.root / bucket / prefix
    if path.exists():
        shutil.rmtree(path)


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


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _partitions(store: LocalStore, layer: str, dataset: str, before: str) -> list[str]:
    from pipelines import storage

    parts = storage.list_partitions(store, layer, dataset)
    if not parts:
        raise StageError(
            f"no {layer} partitions of {dataset} under {store.root / LAKE_BUCKET / layer}: run `dvc repro {before}`"
            " (or `dvc pull`) first"
        )
    return parts


def read_gold(root: Path, dataset: str) -> tuple[pd.DataFrame, dict]:
    """Gold as training reads it in the DAG (`pipelines.jobs.lake.read_gold`), and its snapshot."""
    from pipelines.jobs.lake import read_gold as read_lake_gold

    store = local_store(root, dataset)
    _partitions(store, "gold", dataset, "gold")
    frame, snapshot = read_lake_gold(dataset=dataset, store=store)
    return frame, {"source": "dvc", "path": str(DATA / LAKE_BUCKET / "gold" / dataset), **snapshot}


# --------------------------------------------------------------------------- stages


def ingest(root: Path, progress: Progress = print) -> list[str]:
    """Land the simulator's days (params.simulate), or the file named by dvc.ingest_file, as delivered."""
    from pipelines.jobs.lake import land_bytes
    from pipelines.simulator import simulate_day_csv

    params = stage_params(root)
    d = dvc_params(params)
    store = local_store(root, d["dataset"])
    _fresh_dir(store.root / LANDING_BUCKET)
    keys = []
    if d["ingest_file"]:
        source = root / d["ingest_file"]
        if not source.is_file():
            raise StageError(f"dvc.ingest_file={d['ingest_file']!r}: no such file under {root}")
        if not d["ingest_date"]:
            raise StageError("dvc.ingest_file needs dvc.ingest_date (YYYY-MM-DD): the date it was delivered")
        day = dt.date.fromisoformat(str(d["ingest_date"])).isoformat()
        keys.append(land_bytes(store, d["dataset"], day, source.name, source.read_bytes()))
    else:
        p = params["simulate"]
        start = dt.date.fromisoformat(str(p["start_date"]))
        for i in range(int(p["days"])):
            day = start + dt.timedelta(days=i)
            data = simulate_day_csv(
                day, devices=int(p["devices"]), freq_seconds=int(p["freq_seconds"]), seed=int(p["seed"])
            )
            keys.append(land_bytes(store, d["dataset"], day.isoformat(), f"telemetry-{day}.csv", data))
    for key in keys:
        size = (store.root / LANDING_BUCKET / key).stat().st_size
        progress(f"[ingest] {DATA / LANDING_BUCKET / key} ({size / 1e6:.2f} MB)")
    return keys


def deliveries(store: LocalStore, dataset: str) -> list[str]:
    """The delivery dates landed for `dataset` (landing/<dataset>/<date>/), oldest first."""
    from pipelines import storage

    prefix = storage.landing_prefix(dataset)
    folders = store.list_keys(store.settings.landing_bucket, prefix, recursive=False)
    return sorted(k[len(prefix) :].rstrip("/") for k in folders if k.endswith("/"))


def bronze(root: Path, progress: Progress = print) -> list[str]:
    """`build_bronze` for every delivery, oldest first (a later delivery supersedes an earlier one,
    as when the DAG runs day by day): JSON lines, event-date split, source line counts and the
    bronze gate all come with the job."""
    from pipelines.jobs.lake import build_bronze

    dataset = dvc_params(stage_params(root))["dataset"]
    store = local_store(root, dataset)
    dates = deliveries(store, dataset)
    if not dates:
        raise StageError(f"nothing landed under {store.root / LANDING_BUCKET / dataset}: run `dvc repro ingest`")
    _clear(store, LAKE_BUCKET, "bronze")
    touched: set[str] = set()
    for day in dates:
        with job_context(store, root, day):
            report = build_bronze(day, run_id(day), dataset=dataset, store=store, progress=progress)
        touched |= set(report.partitions)
    return sorted(touched)


def silver(root: Path, progress: Progress = print) -> list[str]:
    """`build_silver` for every bronze partition (quarantine, outside-partition and future rules, gate)."""
    from pipelines.jobs.lake import build_silver

    dataset = dvc_params(stage_params(root))["dataset"]
    store = local_store(root, dataset)
    days = _partitions(store, "bronze", dataset, "bronze")
    _clear(store, LAKE_BUCKET, "silver")
    _clear(store, LAKE_BUCKET, "quarantine")
    for day in days:
        with job_context(store, root, day):
            build_silver(day, run_id(day), dataset=dataset, store=store, progress=progress)
    return days


def gold(root: Path, progress: Progress = print) -> list[str]:
    """`build_gold` for every silver partition, oldest first: each warms up with the previous day and
    is gated against the previous gold partition's profile, as in the DAG."""
    from pipelines.jobs.lake import build_gold

    dataset = dvc_params(stage_params(root))["dataset"]
    store = local_store(root, dataset)
    days = _partitions(store, "silver", dataset, "silver")
    _clear(store, LAKE_BUCKET, "gold")
    for day in days:
        with job_context(store, root, day):
            build_gold(day, run_id(day), dataset=dataset, store=store, progress=progress)
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
    """The GX suites of every layer and partition, re-run on what was published (read through the
    lake's readers, with the jobs' config lookup); exits non-zero on a critical failure (train never runs).

    Bronze's row count is checked against its manifest (the rows the writer committed): the count
    against the delivered source lines is enforced by build_bronze itself. Gold is compared with the
    previous gold partition's stored profile, as its job gate does."""
    from pipelines import storage
    from pipelines.jobs.lake import _gold_reference
    from pipelines.layers.gold import from_storage
    from pipelines.quality import validate_partition

    params = stage_params(root)
    dataset = dvc_params(params)["dataset"]
    contract = _contract(dataset)
    config = (params.get("quality") or {}).get(contract.name, {})
    store = local_store(root, dataset)
    _fresh_dir(root / QUALITY_DIR)
    totals: dict[str, dict[str, int]] = {}
    failed = []
    for layer in ("bronze", "silver", "gold"):
        for day in _partitions(store, layer, dataset, layer):
            table = storage.read_partition(store, layer, dataset, day)
            kwargs: dict[str, Any] = {}
            if layer == "bronze":
                manifest = storage.read_manifest(store, layer, dataset, day)
                kwargs["expected_row_count"] = manifest.rows if manifest is not None else None
                frame = table.to_pandas(types_mapper=pd.ArrowDtype)  # as the bronze job gates it
            elif layer == "silver":
                kwargs["now"] = ingested_at(day)  # the clock build_silver ran with
                frame = table.to_pandas()
            else:
                kwargs["reference"] = _gold_reference(store, dataset, day)
                frame = from_storage(table)
            result = validate_partition(frame, layer, contract, day, config=config.get(layer), **kwargs)
            progress(result.summary())
            summary = _quality_summary(result)
            _write_json(root / QUALITY_DIR / layer / dataset / f"event_date={day}" / "validation.json", summary)
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
            f"{QUALITY_DIR}; fix the data or the contract, then `dvc repro` again"
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


def _finish_run(uri: str, run_id: str, model_uri: str, tags: dict[str, str]) -> tuple[dict[str, float], Any]:
    """Tag a stage's MLflow run; its metrics as DVC records them (exactly what the run holds, minus
    timings) and its model."""
    import mlflow.sklearn

    import mlflow

    client = mlflow.MlflowClient(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    metrics = {k: v for k, v in client.get_run(run_id).data.metrics.items() if not volatile(k)}
    mlflow.set_tracking_uri(uri)
    return metrics, mlflow.sklearn.load_model(model_uri)


def _write_skops(path: Path, model: Any) -> None:
    import skops.io

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stable_skops_bytes(skops.io.dumps(model)))


def train(root: Path, progress: Progress = print) -> dict:
    """train_and_log on the local lake's gold; the model, its card and the run's metrics as DVC outputs."""

    from pipelines import lineage
    from pipelines.training import TrainingContext, train_and_log

    dataset, params = dataset_params(root)
    frame, snapshot = read_gold(root, dataset)
    quality = {
        p.parent.name.split("=", 1)[1]: json.loads(p.read_text())
        for p in sorted((root / QUALITY_DIR / "gold" / dataset).glob("event_date=*/validation.json"))
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
        result = train_and_log(frame, params, context, tracking_uri=uri, experiment=experiment, progress=progress)
        tags = {
            DATA_DIGEST_TAG: snapshot["content_sha256"],
            "dvc_stage": "train",
            "git_dirty": str(source_dirty(root)).lower(),
        }
        metrics, model = _finish_run(uri, result.run_id, result.model_uri, tags)
    finally:
        if tmp is not None:
            tmp.cleanup()
    _write_skops(root / MODEL_FILE, model)
    _write_json(
        root / MODEL_CARD,
        {
            "model_family": result.model_family,
            "threshold": result.threshold,
            "feature_columns": result.feature_columns,
            "training_partitions": result.training_partitions,
            "data_digest": snapshot["content_sha256"],
            # the rule's T as training used it (a number, or fitted on the training range for "fit")
            "threshold_rule_temp_above": result.baseline_temp_above,
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


def rule_temp_above(card: dict, train_df: pd.DataFrame, rule: dict) -> float:
    """The threshold rule's T: the one training recorded in the model card; else params
    (`temp_above: fit` fitted on the training range, exactly as training does)."""
    from pipelines.training import fit_threshold_rule

    if card.get("threshold_rule_temp_above") is not None:
        return float(card["threshold_rule_temp_above"])
    configured = rule.get("temp_above", 32.0)
    return fit_threshold_rule(train_df) if configured == "fit" else float(configured)


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

    dataset, params = dataset_params(root)
    tp = params["train"]
    card = json.loads((root / MODEL_CARD).read_text())
    model = skops.io.loads((root / MODEL_FILE).read_bytes(), trusted=SKOPS_TRUSTED_TYPES)
    train_df, test_df = split_by_time(read_gold(root, dataset)[0], float(tp["test_fraction"]))
    test = labelled(test_df)
    y = test["is_anomaly"].astype(int).to_numpy()
    scores = anomaly_scores(model, test[card["feature_columns"]])
    threshold = float(card["threshold"])
    temp_above = rule_temp_above(card, train_df, tp.get("threshold_rule") or {})
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
        "pr_curve.png": plots.pr_curves(y, {card["model_family"]: scores, f"temp > {temp_above:g}": rule_scores}),
        "confusion_matrix.png": plots.confusion_matrix_figure(y, (scores >= threshold).astype(int)),
    }
    for name, fig in figures.items():
        fig.savefig(root / PLOTS / name, dpi=80, metadata={"Software": None})
        plots.close(fig)
    progress(
        f"[evaluate] test rows {len(test)}: PR-AUC {model_metrics['pr_auc']:.4f} F1 {model_metrics['f1']:.4f}"
        f" | threshold rule (temp > {temp_above:g}) PR-AUC {rule_metrics['pr_auc']:.4f}"
    )
    return metrics


# --------------------------------------------------------------------------- image stages
#
# One image dataset (params.yaml `images`) through the jobs of its Airflow DAG (dags/images.py:
# pipelines.images.lake build_image_bronze/silver/gold) and its training DAG's fit
# (pipelines.images.model.train_and_log_images), on a LocalStore rooted at data/images: landing
# and lake/<layer> there are laid out as the object store's buckets, apart from the telemetry lake.

IMAGES_DATA = DATA / "images"
IMAGE_MODEL_FILE = Path("models/images/model.skops")
IMAGE_MODEL_CARD = Path("models/images/model.json")
IMAGE_TRAIN_METRICS = Path("metrics/images_train.json")
IMAGE_DEFAULTS: dict[str, Any] = {
    "dataset": "fruit_photos",
    "delivery": "2026-03-02",
    "source": "",
    "generate": {"per_class": 24, "size": 32, "seed": 0},
}


def image_params(params: dict) -> dict:
    """params.yaml `images`: the dataset, the delivery date and what is landed (a folder or zip, or
    generated fruit photos)."""
    given = params.get("images") or {}
    return {
        **IMAGE_DEFAULTS,
        **given,
        "generate": {**IMAGE_DEFAULTS["generate"], **(given.get("generate") or {})},
    }


def image_store(root: Path, dataset: str) -> LocalStore:
    return local_store(root, dataset, IMAGES_DATA)


def image_data_digest(snapshot: dict) -> str:
    """One hash of the gold partitions a model read (each manifest's content_sha256, date order)."""
    import hashlib

    parts = snapshot["manifests"]
    return hashlib.sha256("".join(parts[p]["content_sha256"] for p in sorted(parts)).encode()).hexdigest()


def images_land(root: Path, progress: Progress = print) -> list[str]:
    """`land_images` (what `platform land --images` runs) of images.source, or of generated fruit
    photos (images.generate) when no source is named, under the delivery date images.delivery."""
    from pipelines.images.generator import write_fruit_folder
    from pipelines.images.lake import land_images

    p = image_params(stage_params(root))
    dataset, delivery = p["dataset"], dt.date.fromisoformat(str(p["delivery"])).isoformat()
    store = image_store(root, dataset)
    _fresh_dir(store.root / LANDING_BUCKET)
    if p["source"]:
        source = root / p["source"]
        if not source.exists():
            raise StageError(f"images.source={p['source']!r}: no such folder or zip under {root}")
        return land_images(source, dataset, delivery, store=store, progress=progress)
    g = p["generate"]
    with tempfile.TemporaryDirectory(prefix="dvc-images-") as tmp:
        # the folder's name is the landed shard's name: fixed, whatever the temporary directory
        folder = write_fruit_folder(Path(tmp) / dataset, int(g["per_class"]), size=int(g["size"]), seed=int(g["seed"]))
        return land_images(folder, dataset, delivery, store=store, progress=progress)


def _image_layer(root: Path, layer: str, source: str, build: Callable[..., Any], progress: Progress) -> list[str]:
    """`build` (the DAG task's job) for every `source` partition, oldest first, as of its date."""
    dataset = image_params(stage_params(root))["dataset"]
    store = image_store(root, dataset)
    if source == "landing":
        dates = deliveries(store, dataset)
        if not dates:
            raise StageError(
                f"nothing landed under {store.root / LANDING_BUCKET / dataset}: run `dvc repro images_land`"
            )
    else:
        dates = _partitions(store, source, dataset, f"images_{source}")
    for out in (layer, "quarantine") if layer == "silver" else (layer,):
        _clear(store, LAKE_BUCKET, out)
    for date in dates:
        with job_context(store, root, date):
            build(date, run_id(date), dataset=dataset, store=store, progress=progress)
    if layer == "silver":  # a DVC out even when nothing was quarantined
        (store.root / LAKE_BUCKET / "quarantine").mkdir(parents=True, exist_ok=True)
    return dates


def images_bronze(root: Path, progress: Progress = print) -> list[str]:
    """`build_image_bronze` for every delivery, oldest first: one row per distinct image, duplicates
    of an earlier delivery counted, not stored (as when the DAG runs delivery by delivery)."""
    from pipelines.images.lake import build_image_bronze

    return _image_layer(root, "bronze", "landing", build_image_bronze, progress)


def images_silver(root: Path, progress: Progress = print) -> list[str]:
    """`build_image_silver` for every bronze partition: decoded at the contract's size, bad files
    quarantined with their rule, the GX gate."""
    from pipelines.images.lake import build_image_silver

    return _image_layer(root, "silver", "bronze", build_image_silver, progress)


def images_gold(root: Path, progress: Progress = print) -> list[str]:
    """`build_image_gold` for every silver partition: pixels, colour histograms, the split, the GX gate."""
    from pipelines.images.lake import build_image_gold

    return _image_layer(root, "gold", "silver", build_image_gold, progress)


def images_train(root: Path, progress: Progress = print) -> dict:
    """`train_and_log_images` (the training DAG's fit and MLflow run) on the local gold; the model,
    its card and the run's metrics as DVC outputs."""

    from pipelines import lineage
    from pipelines.images.model import EXPERIMENT, MODEL_FAMILY, train_and_log_images

    dataset = image_params(stage_params(root))["dataset"]
    store = image_store(root, dataset)
    _partitions(store, "gold", dataset, "images_gold")
    uri, experiment, tmp = _tracking(root)
    try:
        result = train_and_log_images(
            store,
            dataset,
            tracking_uri=uri,
            experiment=EXPERIMENT if tmp is None else experiment,  # where the training DAG logs
            lineage={
                "git_commit": lineage.git_commit() or "",
                "dvc_lock_digest": lineage.dvc_lock_digest() or "",
                "dvc_stage": "images_train",
                "git_dirty": str(source_dirty(root)).lower(),
            },
            progress=progress,
        )
        digest = image_data_digest(result.snapshot)
        metrics, model = _finish_run(uri, result.run_id, result.model_uri, {DATA_DIGEST_TAG: digest})
    finally:
        if tmp is not None:
            tmp.cleanup()
    _write_skops(root / IMAGE_MODEL_FILE, model)
    _write_json(
        root / IMAGE_MODEL_CARD,
        {
            "dataset": dataset,
            "model_family": MODEL_FAMILY,
            "model_name": result.model_name,
            "classes": [str(c) for c in model.classes_],
            "training_partitions": result.partitions,
            "data_digest": digest,
        },
    )
    _write_json(root / IMAGE_TRAIN_METRICS, metrics)
    progress(f"[images_train] MLflow run {result.run_id} ({uri if tmp is None else 'local, discarded'})")
    return {"run_id": result.run_id if tmp is None else None, "metrics": metrics}


STAGES: dict[str, Callable[..., Any]] = {
    "ingest": ingest,
    "bronze": bronze,
    "silver": silver,
    "gold": gold,
    "validate": validate,
    "train": train,
    "evaluate": evaluate,
    "images_land": images_land,
    "images_bronze": images_bronze,
    "images_silver": images_silver,
    "images_gold": images_gold,
    "images_train": images_train,
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
    new_schema = _OBJECT_ID.sub(lambda m: f'"__id__": {ids.setdefault(m.group(1), str(len(ids) + 1))}', new_schema)
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
