"""Tell Airflow which bronze partitions a stream commit touched, so silver and gold are rebuilt.

Through Airflow's REST API: `POST /api/v2/assets/events` on the dataset's bronze Asset
(`s3://lake/bronze/<dataset>`), with `extra = {"dataset", "partitions", "source": "mqtt"}`.
Why the REST API and not an AssetWatcher: a watcher needs a message-queue trigger provider, and
there is none for MQTT (sqs, kafka, redis, pubsub, servicebus only); bridging through a Redis list
would add a second queue to operate, and watcher events were reported stranded under
`max_active_runs=1`, which the lakehouse DAGs use. The REST call is one authenticated request whose
answer says whether Airflow recorded the event, and it needs nothing but the api-server.

Commits happen every second; DAG runs should not. Touched partitions are coalesced and sent at most
once per `notify_interval_seconds` from a background thread, so a slow or absent Airflow never
delays ingestion; partitions of a failed call are kept and sent with the next one.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx

log = logging.getLogger("pipelines.streaming")


class AirflowAssetNotifier:
    def __init__(
        self,
        api_url: str,
        asset_uri: str,
        dataset: str,
        *,
        username: str | None,
        password: str | None,
        interval_seconds: float = 60.0,
        timeout: float = 10.0,
    ):
        self.api_url = api_url.rstrip("/")
        self.asset_uri, self.dataset = asset_uri, dataset
        self.username, self.password = username, password
        self.interval = interval_seconds
        self.client = httpx.Client(timeout=timeout)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._token: str | None = None
        self._asset_id: int | None = None
        self.sent_events = 0
        self.last_error = ""
        self._thread = threading.Thread(target=self._loop, name="airflow-notifier", daemon=True)

    def start(self) -> AirflowAssetNotifier:
        self._thread.start()
        return self

    def touched(self, partitions) -> None:
        with self._lock:
            self._pending.update(partitions)

    def flush(self) -> bool:
        """Send what is pending now; True when nothing is left pending."""
        with self._lock:
            partitions, self._pending = sorted(self._pending), set()
        if not partitions:
            return True
        try:
            self._post(partitions)
            self.sent_events += 1
            self.last_error = ""
            return True
        except Exception as exc:  # noqa: BLE001 - kept and retried with the next call
            self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("asset event for %s not sent (kept for the next try): %s", partitions, self.last_error)
            with self._lock:
                self._pending.update(partitions)
            return False

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if not self._stop.is_set():
                self.flush()

    # -- the REST calls -------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        if self._token is None and self.username:
            r = self.client.post(
                f"{self.api_url}/auth/token", json={"username": self.username, "password": self.password or ""}
            )
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        r = self.client.request(method, self.api_url + path, headers=self._headers(), **kwargs)
        if r.status_code == 401 and self.username:  # the token expired: one fresh login
            self._token = None
            r = self.client.request(method, self.api_url + path, headers=self._headers(), **kwargs)
        r.raise_for_status()
        return r

    def asset_id(self) -> int:
        if self._asset_id is None:
            found = self._request("GET", "/api/v2/assets", params={"uri_pattern": self.asset_uri, "limit": 1000}).json()
            exact = [a for a in found.get("assets", []) if a.get("uri") == self.asset_uri]
            if not exact:
                raise LookupError(
                    f"Airflow knows no asset {self.asset_uri!r}: is the {self.dataset} lakehouse DAG parsed "
                    "(its bronze Asset is declared there)?"
                )
            self._asset_id = int(exact[0]["id"])
        return self._asset_id

    def _post(self, partitions: list[str]) -> None:
        body = {
            "asset_id": self.asset_id(),
            "extra": {"dataset": self.dataset, "partitions": partitions, "source": "mqtt", "sent_at": time.time()},
        }
        self._request("POST", "/api/v2/assets/events", json=body)
