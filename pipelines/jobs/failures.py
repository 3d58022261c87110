"""Which failures a retry can heal: I/O and service errors retry, deterministic ones fail at once.

A bad file, a contract error or a failed quality gate fails the same way on every try: retrying it
three times with backoff only delays the error (and left orphan MLflow runs behind). Tasks call
their job through :func:`run_task`, which turns a deterministic error into Airflow's
``AirflowFailException`` (no retries) carrying the job's own message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Errors a later try can succeed on: the network, a server that is down or busy, a timeout.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProtocolError",
    "MaxRetryError",
    "NewConnectionError",
    "RemoteDisconnected",
    "ServiceUnavailable",
    "SlowDown",
}


def is_transient(exc: BaseException) -> bool:
    """True for I/O and service errors (retry), False for deterministic ones (fail at once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if type(current).__name__ in _TRANSIENT_NAMES:
            return True
        status = _http_status(current)
        if status is not None and (status >= 500 or status == 429):
            return True
        current = current.__cause__ or current.__context__
    return False


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(code) if code else None
    status = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    code = getattr(exc, "error_code", None)  # MlflowException
    if code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR"):
        return 503
    return None


def run_task(job: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a job inside an Airflow task: transient errors propagate (the task retries), any other
    error fails the task at once with the job's own message."""
    from pipelines.waits import announce_waits

    announce_waits()  # a service that stops answering shows as `[wait]` lines, echoed by `platform run`
    try:
        return job(*args, **kwargs)
    except Exception as exc:
        if is_transient(exc):
            raise
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc} (deterministic: not retried)") from exc
