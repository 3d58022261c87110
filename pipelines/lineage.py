"""Where a model came from: the git commit and dvc.lock digest of the code and data that built it."""

from __future__ import annotations

import hashlib
import subprocess

from pipelines.settings import REPO_ROOT


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_is_dirty() -> bool | None:
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def dvc_lock_digest() -> str | None:
    lock = REPO_ROOT / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None
