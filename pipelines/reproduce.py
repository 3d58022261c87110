"""Rebuild a registered model from its lineage: git commit -> temporary worktree -> dvc pull -> dvc repro.

`reproduce("iot-anomaly-detector@champion")` (or `name/3`) reads the version's MLflow run, checks the
run's `git_commit` out into a temporary `git worktree`, pulls the DVC-tracked data from the remote,
checks every pulled file against dvc.lock (a file whose content differs from the hash the lock
records was changed after it was pushed), runs `dvc repro`, and compares the rebuilt metrics and
gold data digest with the run's. The result lists every difference; nothing is raised for a
difference, only for a model or commit that cannot be found.

The DVC commands run with the object-store credentials of the settings but without MLflow, so a
reproduction never adds runs to the experiment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.settings import REPO_ROOT, Settings, get_settings

Progress = Callable[[str], Any]
DVC_BUCKET = "dvc"
DVC_REMOTE = "store"


@dataclass
class Difference:
    what: str  # "metric", "data", "pull", "repro", "lineage"
    name: str
    registered: Any = None
    reproduced: Any = None
    detail: str = ""

    def describe(self) -> str:
        text = f"{self.what} {self.name}"
        if self.registered is not None or self.reproduced is not None:
            text += f": registered {self.registered!r}, reproduced {self.reproduced!r}"
        return text + (f" ({self.detail})" if self.detail else "")


@dataclass
class ReproductionReport:
    model: str
    version: str
    run_id: str
    git_commit: str
    stages_run: list[str] = field(default_factory=list)
    metrics_compared: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict:
        return {**asdict(self), "identical": self.identical}

    def summary(self) -> str:
        head = f"{self.model} version {self.version} (run {self.run_id}, commit {self.git_commit[:12]})"
        ran = ", ".join(self.stages_run) or "none (all outputs matched dvc.lock)"
        if self.identical:
            return f"IDENTICAL: {head}\n  {self.metrics_compared} metrics equal; stages re-run: {ran}"
        lines = [f"DIFFERS: {head}", f"  stages re-run: {ran}"]
        lines += [f"  - {d.describe()}" for d in self.differences]
        return "\n".join(lines)


class ReproduceError(RuntimeError):
    """The model, its run or its commit cannot be found: nothing to compare."""


# --------------------------------------------------------------------------- environment


def bin_dir() -> Path:
    return Path(sys.executable).parent


def dvc_env(settings: Settings, *, mlflow: bool, state_dir: Path | None = None) -> dict[str, str]:
    """Environment for dvc and its stages: this venv first on PATH, object-store credentials.

    Without ``mlflow`` the tracking URI is left out and the state dir points at an empty directory
    (whose stack.env would otherwise name the server), so the train stage uses a throwaway store.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PLATFORM_", "AWS_"))}
    env.update(settings.client_env())
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    if not mlflow:
        env.pop("MLFLOW_TRACKING_URI", None)
        env["PLATFORM_STATE_DIR"] = str(state_dir or tempfile.mkdtemp(prefix="reproduce-state-"))
    return env


def dvc_bin() -> str:
    local = bin_dir() / "dvc"
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise subprocess.CalledProcessError(out.returncode, cmd, out.stdout, out.stderr)
    return out


def configure_remote(repo: Path, settings: Settings | None = None) -> str:
    """`dvc remote modify --local store endpointurl <settings>`: the machine's endpoint, out of git.

    Also creates the `dvc` bucket. Recent botocore honours AWS_ENDPOINT_URL on its own; writing
    .dvc/config.local makes plain `dvc push` work in shells that do not export it.
    """
    from pipelines.storage import ObjectStore

    settings = settings or get_settings()
    ObjectStore(settings).ensure_buckets(DVC_BUCKET)
    run(
        [dvc_bin(), "remote", "modify", "--local", DVC_REMOTE, "endpointurl", settings.s3_endpoint_url],
        repo,
        dvc_env(settings, mlflow=False),
    )
    return settings.s3_endpoint_url


# --------------------------------------------------------------------------- lineage checks


def stages_run(repro_output: str) -> list[str]:
    """Stage names from `dvc repro` / `dvc exp run` output ("Running stage 'train':")."""
    return re.findall(r"Running stage '([^']+)'", repro_output)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_outputs(repo: Path) -> list[Difference]:
    """Every output file named by dvc.lock, hashed now: the files whose content is not what the lock says.

    DVC trusts what it pulled (its state records the pulled hash), so a tampered object in the
    remote is only caught by hashing the files again.
    """
    import yaml

    lock_path = repo / "dvc.lock"
    if not lock_path.exists():
        return []
    lock = yaml.safe_load(lock_path.read_text()) or {}
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    problems: list[Difference] = []
    for stage, info in sorted((lock.get("stages") or {}).items()):
        for out in info.get("outs") or []:
            path, md5 = repo / out["path"], out.get("md5", "")
            if not path.exists():
                problems.append(Difference("data", out["path"], md5, None, f"stage {stage}: not pulled"))
                continue
            if not md5.endswith(".dir"):
                if _md5(path) != md5:
                    problems.append(Difference("data", out["path"], md5, _md5(path), f"stage {stage}"))
                continue
            listing = cache / md5[:2] / md5[2:]
            if not listing.exists():
                problems.append(Difference("data", out["path"], md5, None, "directory listing not in cache"))
                continue
            for entry in json.loads(listing.read_text()):
                file = path / entry["relpath"]
                actual = _md5(file) if file.exists() else None
                if actual != entry["md5"]:
                    rel = f"{out['path']}/{entry['relpath']}"
                    problems.append(
                        Difference("data", rel, entry["md5"], actual, f"stage {stage}: content differs from dvc.lock")
                    )
    return problems


def _same(a: Any, b: Any) -> bool:
    def nan(v: Any) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    if nan(a) and nan(b):
        return True
    return a == b


def compare_metrics(registered: dict[str, float], reproduced: dict[str, Any], source: str) -> list[Difference]:
    from pipelines.dvc_stages import volatile

    out = []
    for key in sorted(k for k in set(registered) | set(reproduced) if not volatile(k)):
        if key not in reproduced:
            out.append(Difference("metric", key, registered[key], None, f"missing from {source}"))
        elif key not in registered:
            out.append(Difference("metric", key, None, reproduced[key], "not on the registered run"))
        elif not _same(float(registered[key]), reproduced[key]):
            out.append(Difference("metric", key, registered[key], reproduced[key], source))
    return out


# --------------------------------------------------------------------------- the reproduction


def resolve(ref: str, tracking_uri: str) -> tuple[str, str, Any]:
    """MODEL@ALIAS or MODEL/VERSION -> (name, version, ModelVersion)."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        if "@" in ref:
            name, alias = ref.rsplit("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise ReproduceError(f"{ref!r}: give MODEL@ALIAS (e.g. iot-anomaly-detector@champion) or MODEL/VERSION")
    except MlflowException as e:
        raise ReproduceError(f"{ref!r} not found in the MLflow registry at {tracking_uri}: {e.message}") from None
    return mv.name, str(mv.version), mv


IMAGE_STAGE_PREFIX = "images_"


def stage_targets(repo: Path, dvc_stage: str) -> list[str]:
    """The stages of `repo`'s dvc.yaml in the pipeline of `dvc_stage` (the `dvc_stage` tag of the run
    being reproduced): the image pipeline's (`images_*`) or telemetry's. `dvc repro` of these rebuilds
    that model and nothing of the other pipeline."""
    import yaml

    stages = list((yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {}))
    images = dvc_stage.startswith(IMAGE_STAGE_PREFIX)
    return [name for name in stages if name.startswith(IMAGE_STAGE_PREFIX) == images]


def reproduce(
    ref: str,
    *,
    repo: Path = REPO_ROOT,
    force: bool = False,
    keep: bool = False,
    settings: Settings | None = None,
    progress: Progress = print,
) -> ReproductionReport:
    """Check out the run's commit in a temporary worktree, pull, repro, compare (see the module doc)."""
    from mlflow import MlflowClient

    settings = settings or get_settings()
    name, version, mv = resolve(ref, settings.mlflow_tracking_uri)
    run_ = MlflowClient(settings.mlflow_tracking_uri).get_run(mv.run_id)
    tags = run_.data.tags
    commit = tags.get("git_commit") or ""
    if not commit:
        raise ReproduceError(
            f"{name} version {version} (run {mv.run_id}) has no git_commit tag: it was not trained from a "
            "git checkout, so there is nothing to reproduce it from"
        )
    report = ReproductionReport(name, version, mv.run_id, commit)
    if tags.get("git_dirty") == "true":
        report.differences.append(
            Difference("lineage", "git_dirty", detail="the run was trained from uncommitted changes")
        )

    tmp = Path(tempfile.mkdtemp(prefix=f"reproduce-{name}-{version}-"))
    worktree = tmp / "src"
    git_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    try:
        added = run(["git", "worktree", "add", "--detach", str(worktree), commit], repo, git_env, check=False)
        if added.returncode != 0:
            raise ReproduceError(
                f"cannot check out commit {commit} of run {mv.run_id} in {repo}: {added.stderr.strip()} "
                "(fetch the branch that holds it, or pass the repository with --repo)"
            )
        progress(f"[reproduce] {name}/{version}: run {mv.run_id}, commit {commit[:12]} -> {worktree}")
        env = dvc_env(settings, mlflow=False, state_dir=tmp / "state")
        (tmp / "state").mkdir()
        dvc = dvc_bin()
        tampered: list[Difference] = []
        if (worktree / "dvc.lock").exists():
            targets = stage_targets(worktree, tags.get("dvc_stage") or "train")
            pulled = run([dvc, "pull", "--allow-missing", *targets], worktree, env, check=False)
            progress(f"[reproduce] dvc pull: {(pulled.stdout + pulled.stderr).strip().splitlines()[-1:]}")
            if pulled.returncode != 0:
                report.differences.append(
                    Difference("pull", "dvc pull", detail=(pulled.stderr or pulled.stdout).strip()[-500:])
                )
            tampered = verify_outputs(worktree)
            report.differences += tampered
            for diff in tampered:
                # DVC trusts what it pulled: remove the bad file and its cache object so repro rebuilds it.
                (worktree / diff.name).unlink(missing_ok=True)
                md5 = str(diff.registered or "")
                if len(md5) == 32:
                    (worktree / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink(missing_ok=True)
        else:
            progress("[reproduce] no dvc.lock at that commit: rebuilding every stage from params.yaml")
        cmd = [dvc, "repro", *stage_targets(worktree, tags.get("dvc_stage") or "train")]  # that model's pipeline
        cmd += (["--force"] if force else []) + (["--no-run-cache"] if tampered else [])
        rep = run(cmd, worktree, env, check=False)
        report.stages_run = stages_run(rep.stdout)
        progress(f"[reproduce] dvc repro ran: {', '.join(report.stages_run) or 'nothing'}")
        if rep.returncode != 0:
            report.differences.append(
                Difference("repro", "dvc repro", detail=(rep.stderr or rep.stdout).strip()[-1500:])
            )
            return report

        registered = dict(run_.data.metrics)
        from pipelines.dvc_stages import DATA_DIGEST_TAG, EVAL_METRICS, MODEL_CARD, TRAIN_METRICS

        train_metrics = _read_json(worktree / TRAIN_METRICS)
        if train_metrics is None:
            report.differences.append(Difference("metric", str(TRAIN_METRICS), detail="not produced"))
        else:
            report.differences += compare_metrics(registered, train_metrics, str(TRAIN_METRICS))
            report.metrics_compared = len(train_metrics)
        eval_metrics = _read_json(worktree / EVAL_METRICS) or {}
        shared = {k: registered[k] for k in eval_metrics if k in registered}
        report.differences += compare_metrics(shared, eval_metrics, str(EVAL_METRICS))
        card = _read_json(worktree / MODEL_CARD) or {}
        if tags.get(DATA_DIGEST_TAG) and tags[DATA_DIGEST_TAG] != card.get("data_digest"):
            report.differences.append(Difference("data", "gold digest", tags[DATA_DIGEST_TAG], card.get("data_digest")))
        return report
    finally:
        if not keep:
            run(["git", "worktree", "remove", "--force", str(worktree)], repo, git_env, check=False)
            run(["git", "worktree", "prune"], repo, git_env, check=False)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            progress(f"[reproduce] kept the worktree at {worktree} (`git worktree remove` it when done)")


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
