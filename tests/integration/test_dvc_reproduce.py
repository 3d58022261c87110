"""`dvc repro` rebuilds the registered model exactly: real DVC, the real object store as remote, real MLflow.

One origin repository (a git copy of this working tree with a small params.yaml) runs the whole
pipeline and pushes; fresh clones pull and reproduce; `platform reproduce` rebuilds a registered
version from its commit and reports a tampered object in the DVC remote.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipelines.reproduce import stage_targets
from tests.checkout import copy_checkout, sh

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = {"devices": 2, "days": 2, "freq_seconds": 300}
MODEL = "dvc-reproduce-test"

pytestmark = pytest.mark.timeout(600)


def _env(settings) -> dict[str, str]:
    from pipelines.reproduce import dvc_env

    env = dvc_env(settings, mlflow=True)
    env["PLATFORM_STATE_DIR"] = str(settings.state_dir)
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.com"
    return env


def dvc(*args: str, cwd: Path, env: dict[str, str]) -> str:
    return sh([str(BIN / "dvc"), *args], cwd, env)


def copy_working_tree(dest: Path) -> None:
    """This checkout (`tests.checkout.copy_checkout`), with the small simulated history of SMALL."""
    copy_checkout(dest)
    cli = dest / "pipelines" / "cli.py"
    text = cli.read_text()
    if "pipelines.reproduce_cli" not in text:  # until pipelines/cli.py is wired: the one line it will get
        cut = text.rindex("    return parser\n")
        wiring = "    from pipelines.reproduce_cli import register_commands\n\n    register_commands(sub)\n"
        cli.write_text(text[:cut] + wiring + text[cut:])
    import yaml

    params = yaml.safe_load((dest / "params.yaml").read_text())
    text = (dest / "params.yaml").read_text()
    for key, value in SMALL.items():
        text = text.replace(f"  {key}: {params['simulate'][key]}\n", f"  {key}: {value}\n", 1)
    (dest / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["simulate"] | SMALL == yaml.safe_load(text)["simulate"]


def run_id_from(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("[train] MLflow run ")]
    assert lines, output[-3000:]
    return lines[-1].split()[3]


def head(repo: Path, env) -> str:
    return sh(["git", "rev-parse", "HEAD"], repo, env).strip()


@pytest.fixture(scope="module")
def origin(tmp_path_factory, settings, store):
    """C1 = code, `dvc repro` (run R1), C2 = C1 + dvc.lock and metrics, then `dvc push`."""
    from pipelines.reproduce import DVC_BUCKET

    store.ensure_buckets(DVC_BUCKET)
    env = _env(settings)
    repo = tmp_path_factory.mktemp("origin") / "repo"
    repo.mkdir()
    copy_working_tree(repo)
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "code"], repo, env)
    out = dvc("repro", *stage_targets(repo, "train"), cwd=repo, env=env)
    from pipelines.reproduce import stages_run

    # the telemetry pipeline only: the image stages are test_images_dvc.py's
    assert stages_run(out) == ["ingest", "bronze", "silver", "gold", "validate", "train", "evaluate"]
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "dvc repro"], repo, env)
    assert "files pushed" in dvc("push", cwd=repo, env=env)
    return {"repo": repo, "env": env, "run_id": run_id_from(out)}


@pytest.fixture(scope="module")
def clone(origin, tmp_path_factory):
    """A fresh clone that only pulls: no config.local, the endpoint comes from AWS_ENDPOINT_URL."""
    repo = tmp_path_factory.mktemp("clone") / "repo"
    sh(["git", "clone", "-q", str(origin["repo"]), str(repo)], origin["repo"], origin["env"])
    assert not (repo / "data" / "lake" / "gold").exists()  # only DVC's .gitignore files came with git
    dvc("pull", *stage_targets(repo, "train"), cwd=repo, env=origin["env"])
    return repo


def test_fresh_clone_pulls_and_reproduces_exactly(origin, clone, settings):
    from mlflow import MlflowClient
    from pipelines.reproduce import compare_metrics, stages_run

    env = origin["env"]
    out = dvc("repro", *stage_targets(clone, "train"), cwd=clone, env=env)
    assert stages_run(out) == [], out
    for name in ("metrics/train.json", "metrics/eval.json", "models/model.skops", "plots/pr_curve.csv"):
        assert (clone / name).read_bytes() == (origin["repo"] / name).read_bytes(), name
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(origin["run_id"])
    train = json.loads((clone / "metrics/train.json").read_text())
    assert compare_metrics(run.data.metrics, train, "metrics/train.json") == []
    for tag in ("git_commit", "dvc_lock_digest", "dvc_data_digest"):
        assert tag in run.data.tags, tag

    # Re-running training from the pulled data gives byte-identical outputs (dvc.lock unchanged).
    out = dvc("repro", "--force", "--single-item", "train", cwd=clone, env=env)
    assert stages_run(out) == ["train"]
    assert sh(["git", "status", "--porcelain"], clone, env).strip() == ""
    rerun = MlflowClient(settings.mlflow_tracking_uri).get_run(run_id_from(out))
    assert rerun.data.tags["git_commit"] == head(clone, env)
    assert rerun.data.tags["git_dirty"] == "false"
    assert compare_metrics(run.data.metrics, rerun.data.metrics, "re-run") == []
    origin["clean_run_id"] = rerun.info.run_id

    assert "pr_auc" in dvc("metrics", "show", cwd=clone, env=env)
    assert "pr_curve" in dvc("plots", "show", cwd=clone, env=env) or (clone / "dvc_plots").exists()
    assert "train" in dvc("dag", cwd=clone, env=env)


def test_platform_reproduce_identical_then_reports_tampered_data(origin, clone, settings, store):
    import mlflow
    from pipelines.reproduce import DVC_BUCKET, reproduce

    if "clean_run_id" not in origin:
        pytest.skip("needs the clean re-run from test_fresh_clone_pulls_and_reproduces_exactly")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    version = mlflow.register_model(f"runs:/{origin['clean_run_id']}/model", MODEL).version

    report = reproduce(f"{MODEL}/{version}", repo=origin["repo"], settings=settings)
    assert report.identical, report.summary()
    assert report.metrics_compared > 10

    # Tamper with one gold Parquet file in the DVC remote: the pull still works, the check names it.
    lock = __import__("yaml").safe_load((origin["repo"] / "dvc.lock").read_text())
    gold_dir = next(o for o in lock["stages"]["gold"]["outs"] if o["path"] == "data/lake/gold")["md5"]
    listing = json.loads(store.get_bytes(DVC_BUCKET, f"store/files/md5/{gold_dir[:2]}/{gold_dir[2:]}"))
    victim = next(e for e in listing if e["relpath"].endswith(".parquet"))  # not the manifest, listed first
    key = f"store/files/md5/{victim['md5'][:2]}/{victim['md5'][2:]}"
    original = store.get_bytes(DVC_BUCKET, key)
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "candidate", version)
    store.put_bytes(DVC_BUCKET, key, original[:-16] + b"\0" * 16)
    try:
        tampered = reproduce(f"{MODEL}@candidate", repo=origin["repo"], settings=settings)
    finally:
        store.put_bytes(DVC_BUCKET, key, original)
    assert not tampered.identical
    names = [d.name for d in tampered.differences if d.what == "data"]
    assert f"data/lake/gold/{victim['relpath']}" in names, tampered.summary()
    assert "gold" in tampered.stages_run, tampered.summary()


def test_param_change_reruns_only_dependent_stages(origin, clone, settings):
    from mlflow import MlflowClient
    from pipelines.reproduce import stages_run

    env = origin["env"]
    targets = stage_targets(clone, "train")  # the telemetry pipeline (images: test_images_dvc.py)
    out = dvc("exp", "run", "-S", "train.isolation_forest.n_estimators=50", *targets, cwd=clone, env=env)
    # evaluate re-runs only if the model bytes changed (not when the other family still wins)
    assert stages_run(out) in (["train"], ["train", "evaluate"]), out
    status = dvc("status", *targets, cwd=clone, env=env)
    assert "ingest" not in status and "gold" not in status
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(run_id_from(out))
    assert run.data.params["train.isolation_forest.n_estimators"] == "50"
    assert run.data.tags["git_commit"] == head(clone, env)
    assert os.environ.get("AWS_ENDPOINT_URL")  # the clone had no config.local: the env var carried it
