"""The image DVC stages (dvc.yaml images_*) with the real dvc CLI: a copy of this checkout reproduces
an image dataset land -> bronze -> silver -> gold -> train under data/images, re-runs only what a
change touches, and its lake is the one the images DAG (`airflow dags test`, the session's object
store) builds from the same photos: the same landed bytes, the same silver and gold files.

params.yaml `images` as committed: 24 generated photos of each of 12 fruits (288 images), 32 x 32.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.checkout import copy_checkout, sh

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE_STAGES = ["images_land", "images_bronze", "images_silver", "images_gold", "images_train"]
# the DAG path's lake: buckets of its own, so the session's fruit_photos lake (test_images) is untouched
BUCKETS = {"PLATFORM_LANDING_BUCKET": "dvc-images-landing", "PLATFORM_LAKE_BUCKET": "dvc-images-lake"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, settings, store):
    """`dvc repro images_train` in a git copy of this checkout (throwaway MLflow), and meanwhile the
    images DAG on the same generated photos through `airflow dags test` (the session's stack)."""
    from pipelines import dvc_stages, reproduce
    from pipelines.images.generator import write_fruit_folder
    from pipelines.images.lake import land_images
    from pipelines.orchestration import run_dag
    from pipelines.settings import get_settings, load_params
    from pipelines.storage import ObjectStore

    env = reproduce.dvc_env(settings, mlflow=False, state_dir=tmp_path_factory.mktemp("dvc-state"))
    env.update(GIT_AUTHOR_NAME="test", GIT_COMMITTER_NAME="test")
    env.update(GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_EMAIL="test@example.com")
    repo = tmp_path_factory.mktemp("images-dvc") / "repo"
    repo.mkdir()
    copy_checkout(repo)
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "code"], repo, env)
    result: dict = {}
    dvc = threading.Thread(
        target=lambda: result.__setitem__(
            "repro",
            subprocess.run(
                [str(BIN / "dvc"), "repro", "images_train"], cwd=repo, env=env, capture_output=True, text=True
            ),
        )
    )
    dvc.start()

    p = dvc_stages.image_params(load_params(REPO / "params.yaml"))
    dataset, delivery, g = p["dataset"], p["delivery"], p["generate"]
    photos = write_fruit_folder(
        tmp_path_factory.mktemp("dag-photos") / dataset, g["per_class"], size=g["size"], seed=g["seed"]
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in BUCKETS.items():
            mp.setenv(key, value)
        dag_store = ObjectStore(get_settings())
        land_images(photos, dataset, delivery, store=dag_store, progress=lambda _: None)
        dag = run_dag(f"{dataset}_images", conf={"delivery_date": delivery}, progress=lambda _: None)
    dvc.join(timeout=240)
    out = result["repro"]
    assert out.returncode == 0, f"dvc repro images_train:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert dag.succeeded
    return {
        "repo": repo,
        "env": env,
        "output": out.stdout + out.stderr,
        "dataset": dataset,
        "delivery": delivery,
        "dag_store": dag_store,
        "local": dvc_stages.image_store(repo, dataset),
    }


def test_dvc_repro_runs_the_image_stages_in_order_and_records_them(reproduced):
    from pipelines.reproduce import stages_run

    assert stages_run(reproduced["output"]) == IMAGE_STAGES
    lock = __import__("yaml").safe_load((reproduced["repo"] / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(IMAGE_STAGES)  # the telemetry stages were not run
    repo = reproduced["repo"]
    metrics = json.loads((repo / "metrics" / "images_train.json").read_text())
    assert metrics["train_images"] + metrics["test_images"] == 288
    assert metrics["accuracy"] > metrics["baseline_accuracy"]
    card = json.loads((repo / "models" / "images" / "model.json").read_text())
    assert card["training_partitions"] == [reproduced["delivery"]] and len(card["classes"]) == 12
    assert (repo / "models" / "images" / "model.skops").stat().st_size > 10_000


@pytest.mark.parametrize("layer", ["silver", "gold"])
def test_dvc_lake_equals_the_images_dag_lake(reproduced, layer):
    """Same photos, same delivery: the DVC stages' files are the DAG's, byte for byte (a manifest's
    content hash is the hash of its files' SHA-256s); only run ids and commit times differ."""
    from pipelines import storage

    dataset, delivery = reproduced["dataset"], reproduced["delivery"]
    local = storage.read_manifest(reproduced["local"], layer, dataset, delivery)
    dag = storage.read_manifest(reproduced["dag_store"], layer, dataset, delivery)
    assert local.run_id == f"dvc-{delivery}" and dag.run_id != local.run_id
    assert (local.rows, local.schema) == (dag.rows, dag.schema) and local.rows == 288
    assert local.content_sha256 == dag.content_sha256, layer
    assert local.extra["report"] == dag.extra["report"]


def test_dvc_landing_equals_what_platform_land_lands(reproduced):
    local, dag = reproduced["local"], reproduced["dag_store"]
    prefix = f"{reproduced['dataset']}/{reproduced['delivery']}/"
    keys = local.list_keys(local.settings.landing_bucket, prefix)
    assert keys and keys == dag.list_keys(dag.settings.landing_bucket, prefix)
    for key in keys:
        assert local.get_bytes(local.settings.landing_bucket, key) == dag.get_bytes(dag.settings.landing_bucket, key)


def test_dvc_repro_reruns_only_what_a_change_touches(reproduced):
    from pipelines.reproduce import stages_run

    repo, env = reproduced["repo"], reproduced["env"]
    dvc = str(BIN / "dvc")
    gold = (repo / "data/images/lake/gold").rglob("*.parquet")
    before = {p: p.read_bytes() for p in gold}
    model_before = (repo / "models/images/model.skops").read_bytes()
    metrics_before = (repo / "metrics/images_train.json").read_text()

    assert stages_run(sh([dvc, "repro", "images_train"], repo, env)) == []  # nothing changed
    with open(repo / "pipelines/images/model.py", "a") as f:  # the model's code changed: only training
        f.write("\n# touched by test_images_dvc\n")
    assert stages_run(sh([dvc, "repro", "images_train"], repo, env)) == ["images_train"]
    # the same gold and a deterministic fit: the same model bytes and metrics as the first run
    assert (repo / "models/images/model.skops").read_bytes() == model_before
    assert (repo / "metrics/images_train.json").read_text() == metrics_before
    assert {p: p.read_bytes() for p in before} == before

    # a telemetry parameter (params.yaml train.seed) is none of the image stages' business
    params = (repo / "params.yaml").read_text()
    assert "\ntrain:\n  seed: 42\n" in params
    (repo / "params.yaml").write_text(params.replace("\ntrain:\n  seed: 42\n", "\ntrain:\n  seed: 7\n"))
    assert stages_run(sh([dvc, "repro", "images_train"], repo, env)) == []


def test_image_land_and_bronze_stages_rebuild_the_same_bytes(tmp_path):
    """Bronze holds the ingestion time and run id: pinned per delivery date in a DVC stage, so two
    builds of the same photos are byte-identical (silver and gold: compared with the DAG's above)."""
    import filecmp

    from pipelines import dvc_stages

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    builds = []
    for attempt in range(2):
        for stage in ("images_land", "images_bronze"):
            dvc_stages.STAGES[stage](tmp_path, progress=lambda _msg: None)
        builds.append(tmp_path / f"build-{attempt}")
        shutil.copytree(tmp_path / "data" / "images", builds[-1])
    files = sorted(p.relative_to(builds[0]) for p in builds[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(builds[1]) for p in builds[1].rglob("*") if p.is_file())
    assert any(p.name == "_manifest.json" for p in files) and any(p.suffix == ".zip" for p in files)
    _, mismatch, errors = filecmp.cmpfiles(builds[0], builds[1], [str(p) for p in files], shallow=False)
    assert mismatch == errors == []
