"""Append-only history of rollouts and alias changes: one small JSON object per event in the lake
(``serving/history/<time>-<id>.json``; an S3 PUT never rewrites an earlier event), mirrored as
model-version tags. ``platform canary history`` merges it with the alias tags the registry writes
(offline gate, promote, rollback), and audits the registry's aliases (``audit_aliases``): a change no
platform record explains (made in the MLflow UI or API, by anyone) is recorded as an event
"changed outside the platform", so no alias change is missed between two audits.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

HISTORY_PREFIX = "serving/history/"
# The aliases the last audit saw, per model: one object each, overwritten (not an event).
ALIAS_SNAPSHOT_PREFIX = "serving/alias-audit/"
OUTSIDE_ACTOR = "unknown (outside the platform)"
TAG_SETTLE_SECONDS = 2.0


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
    store.put_bytes(store.settings.lake_bucket, key, json.dumps(entry, default=str).encode(), "application/json")
    return entry


def read_events(store) -> list[dict[str, Any]]:
    bucket = store.settings.lake_bucket
    return [json.loads(store.get_bytes(bucket, k)) for k in store.list_keys(bucket, HISTORY_PREFIX)]


# The canary-log events that end a rollout of a version, or a manual promotion of it.
ROLLOUT_ENDINGS = ("promoted to champion", "promoted to champion (manual)", "rolled back")


def rollout_outcome(events: list[dict[str, Any]], version: str) -> dict[str, Any] | None:
    """How the rollout of ``version`` ended (its last ending event: promoted or rolled back), else its
    last recorded step (still running), else None. ``events``: one model's :func:`read_events`."""
    mine = sorted(
        (e for e in events if str(e.get("version")) == str(version)), key=lambda e: _sort_key(e.get("at", ""))
    )
    ended = [e for e in mine if e.get("event") in ROLLOUT_ENDINGS]
    return (ended or mine or [None])[-1]


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
    audit_error = None
    try:
        audit_aliases(store, client, model_name)
    except Exception as exc:  # noqa: BLE001 - the history is still worth showing; the error is in it
        audit_error = exc
    events = [e for e in read_events(store) if e.get("model_name") == model_name]
    if audit_error is not None:
        events.append(_error_event(model_name, "alias audit failed", audit_error))
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


def _error_event(model_name: str, event: str, exc: Exception) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "event": event,
        "model_name": model_name,
        "version": "",
        "actor": "",
        "reason": str(exc)[:200],
        "source": "error",
    }


# --------------------------------------------------------------------------- alias audit


def _snapshot_key(model_name: str) -> str:
    return f"{ALIAS_SNAPSHOT_PREFIX}{model_name}.json"


def read_alias_snapshot(store, model_name: str) -> dict[str, Any] | None:
    bucket, key = store.settings.lake_bucket, _snapshot_key(model_name)
    if not store.exists(bucket, key):
        return None
    return json.loads(store.get_bytes(bucket, key))


def _write_alias_snapshot(store, model_name: str, aliases: dict[str, str], at: str) -> None:
    body = json.dumps({"model_name": model_name, "aliases": aliases, "at": at}, sort_keys=True).encode()
    store.put_bytes(store.settings.lake_bucket, _snapshot_key(model_name), body, "application/json")


def _after(stamp: str | None, since: str) -> bool:
    """`stamp` is at or after `since`, to the second: the registry's tags carry whole seconds."""
    if not stamp:
        return False
    try:
        floor = datetime.fromisoformat(since).astimezone(UTC).replace(microsecond=0)
        return datetime.fromisoformat(stamp).astimezone(UTC) >= floor
    except ValueError:
        return _sort_key(stamp) >= _sort_key(since)


def explained_by_platform(alias: str, before: str | None, after: str | None, tags_of, since: str) -> bool:
    """Whether a platform record written since the last audit (`since`) explains this alias change.

    `tags_of(version)` gives a version's tags. The platform's alias moves and what they record:
    the gate sets an alias (``alias.<a>.set_at``); promote sets champion (``promoted.at``), previous
    (``demoted.at`` on the old champion) and clears challenger; rollback sets champion (``restored.at``)
    and clears previous; the canary clears a failed challenger (``canary.failed_at``)."""
    if after is not None:
        tags = tags_of(after)
        marks = [tags.get(f"alias.{alias}.set_at")]
        if alias == "champion":
            marks += [tags.get("promoted.at"), tags.get("restored.at")]
        if alias == "previous":
            marks.append(tags.get("demoted.at"))
        if not any(_after(m, since) for m in marks):
            return False
    if before is not None and after is None:
        tags = tags_of(before)
        marks = []
        if alias == "challenger":
            marks += [tags.get("promoted.at"), tags.get("canary.failed_at")]
        if alias == "previous":
            marks.append(tags.get("restored.at"))  # rollback: champion <- previous, previous cleared
        if not any(_after(m, since) for m in marks):
            return False
    return True


def audit_aliases(store, client, model_name: str) -> list[dict[str, Any]]:
    """Compare the registry's aliases with the last audit's; record every change no platform record
    explains as an event "alias <a> changed outside the platform" (who: unknown, MLflow does not say).

    The first audit of a model records its aliases as they are. Called by ``platform canary history``
    and by every canary step, so a change shows up at the next of either; MLflow keeps no audit log of
    its own, so a change undone before the next audit is not seen."""
    from mlflow.exceptions import MlflowException

    now = datetime.now(UTC).isoformat(timespec="milliseconds")  # before the read: later records are newer
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    current = {k: str(v) for k, v in sorted((model.aliases or {}).items())}
    snapshot = read_alias_snapshot(store, model_name)
    if snapshot is None:
        _write_alias_snapshot(store, model_name, current, now)
        return [
            record_event(
                store,
                "aliases first recorded by the audit",
                model_name=model_name,
                version=current.get("champion", ""),
                actor="alias-audit",
                reason=", ".join(f"{a}=v{v}" for a, v in current.items()) or "no aliases",
                details={"aliases": current},
            )
        ]
    before_all: dict[str, str] = snapshot.get("aliases", {})
    if before_all == current:
        return []
    since = snapshot.get("at", "")
    cache: dict[str, dict[str, str]] = {}

    def tags_of(version: str) -> dict[str, str]:
        if version not in cache:
            try:
                cache[version] = dict(client.get_model_version(model_name, version).tags or {})
            except MlflowException:
                cache[version] = {}  # a deleted version explains nothing
        return cache[version]

    def unexplained(alias: str) -> bool:
        before, after = before_all.get(alias), current.get(alias)
        return before != after and not explained_by_platform(alias, before, after, tags_of, since)

    suspects = [a for a in sorted(set(before_all) | set(current)) if unexplained(a)]
    if suspects:  # the platform tags a version right after moving its alias: let a tag in flight land
        time.sleep(TAG_SETTLE_SECONDS)
        cache.clear()
        suspects = [a for a in suspects if unexplained(a)]
    recorded = []
    for alias in suspects:
        before, after = before_all.get(alias), current.get(alias)
        change = f"v{before}" if before else "unset"
        change += f" -> v{after}" if after else " -> deleted"
        recorded.append(
            record_event(
                store,
                f"alias {alias} changed outside the platform",
                model_name=model_name,
                version=after or before or "",
                actor=OUTSIDE_ACTOR,
                reason=f"{alias}: {change} (seen by the alias audit; no gate, promote, rollback or canary record "
                f"explains it)",
                details={"alias": alias, "before": before, "after": after, "since": since, "aliases": current},
            )
        )
    _write_alias_snapshot(store, model_name, current, now)
    return recorded
