"""Fixtures the live-path modules share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def broker():
    """A Mosquitto of the module's own on a free port, with test_stream's users and ACL."""
    from tests.integration.test_stream import MOSQUITTO, PASSWD, Broker

    if not PASSWD or not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto and mosquitto_passwd are needed: `apt-get install mosquitto` (it ships both)")
    b = Broker()
    try:
        yield b.start()
    finally:
        b.stop()
        shutil.rmtree(b.dir, ignore_errors=True)
