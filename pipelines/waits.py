"""Say when the platform is waiting on a service, in one line a person reads.

The HTTP clients under MLflow and the object store retry a refused or timed-out connection with
backoff (MLflow: up to 7 tries over about two minutes): a training run whose MLflow went away
stretched from 15 s to 253 s with nothing on the screen. urllib3 logs each retry as a warning full
of reprs; `announce_waits` turns those into

    [wait] MLflow (http://127.0.0.1:5000) is not answering (connection refused); retrying, 5 tries left

and drops the raw warning. The CLI installs it for every command, `run_task` in every Airflow task,
and `platform run` echoes `[wait]` lines from the DAG run's log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import urlsplit

_RETRY = re.compile(r"^Retrying \(Retry\(total=(\d+).*?\)\) after connection broken by '(.*)': (\S*)$", re.S)
_HOST_PORT = re.compile(r"host='([^']+)', port=(\d+)")
_CAUSES = (
    ("Connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("Name or service not known", "unknown host"),
    ("Connection reset", "connection reset"),
    ("RemoteDisconnected", "it closed the connection"),
)


def _endpoints() -> dict[tuple[str, int], str]:
    try:
        from pipelines.settings import get_settings

        settings = get_settings()
    except Exception:  # noqa: BLE001 - without settings the line names host and port only
        return {}
    out = {}
    for name, url in (("MLflow", settings.mlflow_tracking_uri), ("the object store", settings.s3_endpoint_url)):
        parts = urlsplit(url or "")
        if parts.hostname:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            out[(parts.hostname, port)] = f"{name} ({parts.scheme}://{parts.hostname}:{port})"
    return out


def describe_retry(message: str, endpoints: dict[tuple[str, int], str] | None = None) -> str | None:
    """The `[wait]` line for one of urllib3's retry warnings, or None for any other message."""
    found = _RETRY.match(message)
    if found is None:
        return None
    left, error, path = int(found.group(1)), found.group(2), found.group(3)
    where = _HOST_PORT.search(error)
    if where is not None:
        key = (where.group(1), int(where.group(2)))
        service = (endpoints if endpoints is not None else _endpoints()).get(key, f"{key[0]}:{key[1]}")
    else:
        service = f"the service of {path}" if path else "a service"
    cause = next((text for needle, text in _CAUSES if needle in error), error.split("(")[0] or "no answer")
    tries = f"{left} {'try' if left == 1 else 'tries'} left" if left else "last try"
    return f"[wait] {service} is not answering ({cause}); retrying, {tries}"


class WaitNotice(logging.Filter):
    def __init__(self, emit: Callable[[str], None]):
        super().__init__()
        self.emit = emit

    def filter(self, record: logging.LogRecord) -> bool:
        line = describe_retry(record.getMessage()) if str(record.msg).startswith("Retrying") else None
        if line is None:
            return True
        self.emit(line)
        return False


def announce_waits(emit: Callable[[str], None] | None = None) -> None:
    """Install the notice in this process (once): urllib3's retry warnings become `[wait]` lines."""
    logger = logging.getLogger("urllib3.connectionpool")
    if any(isinstance(f, WaitNotice) for f in logger.filters):
        return
    logger.addFilter(WaitNotice(emit or (lambda line: print(line, flush=True))))
