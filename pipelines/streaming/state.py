"""The latest state per device: its last reading, score, threshold and model, for the HTTP endpoint.

Redis when configured (a hash per device, `stream:<dataset>:device:<device>`, and a set of the
dataset's devices), so the state outlives the ingester and other services can read it; a dict
otherwise (tests, a laptop without Redis). One write round-trip per micro-batch (a pipeline).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol


class DeviceStateStore(Protocol):
    def put_many(self, states: list[dict[str, Any]]) -> None: ...

    def get(self, device: str) -> dict[str, Any] | None: ...

    def devices(self) -> list[str]: ...

    def ping(self) -> bool: ...


class MemoryStateStore:
    def __init__(self) -> None:
        self._states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def put_many(self, states: list[dict[str, Any]]) -> None:
        with self._lock:
            for state in states:
                self._states[state["device"]] = state

    def get(self, device: str) -> dict[str, Any] | None:
        return self._states.get(device)

    def devices(self) -> list[str]:
        return sorted(self._states)

    def ping(self) -> bool:
        return True


class RedisStateStore:
    def __init__(self, url: str, dataset: str, password: str | None = None):
        import redis

        extra = {"password": password} if password else {}
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, **extra)
        self.prefix = f"stream:{dataset}"

    def _key(self, device: str) -> str:
        return f"{self.prefix}:device:{device}"

    def put_many(self, states: list[dict[str, Any]]) -> None:
        if not states:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.mset({self._key(state["device"]): json.dumps(state, default=str) for state in states})  # one command
        pipe.sadd(f"{self.prefix}:devices", *{s["device"] for s in states})
        pipe.execute()

    def get(self, device: str) -> dict[str, Any] | None:
        raw = self.client.get(self._key(device))
        return json.loads(raw) if raw else None

    def devices(self) -> list[str]:
        return sorted(d.decode() for d in self.client.smembers(f"{self.prefix}:devices"))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:  # noqa: BLE001 - health reports it
            return False


def state_store(redis_url: str | None, dataset: str, password: str | None = None) -> DeviceStateStore:
    return RedisStateStore(redis_url, dataset, password) if redis_url else MemoryStateStore()
