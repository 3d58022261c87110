"""A copy of this checkout for tests that run `dvc` (or git) in a project of their own."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# generated state, never copied: the copy builds its own
SKIP_TOP = {".venv", ".platform", "data", "models", "metrics", "plots", "dvc.lock", "dvc_plots"}


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `cmd`; its output, or an assertion with the end of both streams when it fails."""
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def copy_checkout(dest: Path) -> None:
    """Tracked + untracked (not ignored) files of this checkout, without generated state: works
    before anything is committed."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for raw in files:
        rel = raw.decode()
        if not rel or rel.split("/", 1)[0] in SKIP_TOP or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
