"""Headless Chromium for the UI tests: Debian's chromium (`apt-get install chromium`, or the path in
PLATFORM_CHROMIUM) driven through Playwright's Python client; Playwright's own browser download does
not work everywhere and is not used. Screenshots go to test-artifacts/<name>/ (git-ignored)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import playwright.sync_api as playwright_api  # in the lock's dev extra
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PLATFORM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's own background connections are refused on closed networks, many at a time: off.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    # `make test` installs Debian's chromium when it is missing; a UI test never silently skips.
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install chromium` or set PLATFORM_CHROMIUM")


@contextlib.contextmanager
def chromium(timeout_ms: int):
    """A browser context with a throwaway profile, closed (and the profile removed) afterwards."""
    require_chromium()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 900},
        )
        context.set_default_timeout(timeout_ms)
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, artifacts: Path, name: str) -> Path:
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path
