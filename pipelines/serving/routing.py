"""Sticky routing: a device's bucket (0..9999) comes from a stable hash, so a device sees one model.

Buckets below ``weight`` percent go to the challenger; raising the weight only adds devices, so a
device never flips back and forth during a rollout. The rollout id salts the hash: each rollout
draws a fresh cohort.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000


def device_bucket(device: str, salt: str = "") -> int:
    digest = hashlib.blake2b(f"{salt}:{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def route(device: str, weight: int, salt: str = "") -> str:
    """``challenger`` or ``champion`` for this device at this weight (percent)."""
    if weight <= 0:
        return "champion"
    if weight >= 100:
        return "challenger"
    return "challenger" if device_bucket(device, salt) < weight * BUCKETS // 100 else "champion"
