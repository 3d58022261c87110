"""Append-only history of rollouts and alias changes: one small JSON object per event in the lake
(``serving/history/<time>-<id>.json``; an S3 PUT never rewrites an earlier event), mirrored as
model-version tags. ``platform canary history`` merges it with the alias tags the registry writes
(offline gate, promote, rollback) so changes made outside the canary show up too.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

HISTORY_PREFIX = "serving/history/"


def record_event(
    store,
    event: str,
    *,
    model_name: str,
    version: str = "",
    actor: str,
    reason: str,
    rollout_id: str = "",
    step: str = "",
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    at = datetime.now(UTC)
    entry = {
        "at": at.isoformat(timespec="milliseconds"),
        "event": event,
        "model_name": model_name,
        "version": str(version),
        "actor": actor,
        "reason": reason,
        "rollout_id": rollout_id,
        "step": step,
        "details": details or {},
        "source": "canary-log",
    }
    key = f"{HISTORY_PREFIX}{at:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.json"
    store.put_bytes(
        store.settings.lake_bucket, key, json.dumps(entry, default=str).encode(), "application/json"
    )
    return entry


def read_events(store) -> list[dict[str, Any]]:
    bucket = store.settings.lake_bucket
    return [json.loads(store.get_bytes(bucket, k)) for k in store.list_keys(bucket, HISTORY_PREFIX)]


_TAG_EVENTS = {
    # tag prefix -> (event, field holding the actor, field holding the reason)
    "promoted": ("promoted (registry)", "promoted.by", "promoted.reason"),
    "demoted": ("demoted (registry)", "demoted.by", "demoted.reason"),
    "rolled_back": ("rolled back (registry)", "rolled_back.by", "rolled_back.reason"),
    "restored": ("restored (registry)", "restored.by", "restored.reason"),
}


def registry_tag_events(client, model_name: str) -> list[dict[str, Any]]:
    """Alias changes recorded as version tags by pipelines.registry (gate, promote, rollback)."""
    out = []
    for mv in client.search_model_versions(f"name='{model_name}'"):
        tags = mv.tags or {}
        for prefix, (event, by, why) in _TAG_EVENTS.items():
            if f"{prefix}.at" in tags:
                out.append(
                    _tag_event(
                        tags[f"{prefix}.at"],
                        event,
                        model_name,
                        mv.version,
                        tags.get(by, "?"),
                        tags.get(why, ""),
                    )
                )
        for key, value in tags.items():
            if key.startswith("alias.") and key.endswith(".set_at"):
                alias = key.split(".")[1]
                out.append(
                    _tag_event(
                        value,
                        f"alias {alias} set (offline gate)",
                        model_name,
                        mv.version,
                        "offline-gate",
                        tags.get("gate.reason", ""),
                    )
                )
    return out


def _tag_event(at: str, event: str, model_name: str, version: str, actor: str, reason: str) -> dict:
    return {
        "at": at,
        "event": event,
        "model_name": model_name,
        "version": str(version),
        "actor": actor,
        "reason": reason,
        "rollout_id": "",
        "step": "",
        "details": {},
        "source": "version-tags",
    }


def merged_history(store, client, model_name: str) -> list[dict[str, Any]]:
    events = [e for e in read_events(store) if e.get("model_name") == model_name]
    try:
        events += registry_tag_events(client, model_name)
    except Exception as exc:  # noqa: BLE001 - the lake log alone is still worth showing
        events.append(
            {
                "at": "",
                "event": "registry unreachable",
                "model_name": model_name,
                "version": "",
                "actor": "",
                "reason": str(exc)[:200],
                "source": "error",
            }
        )
    return sorted(events, key=lambda e: _sort_key(e.get("at", "")))


def _sort_key(at: str) -> str:
    try:
        return datetime.fromisoformat(at).astimezone(UTC).isoformat()
    except ValueError:
        return at
