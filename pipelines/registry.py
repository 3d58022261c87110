"""Model registry: versions, aliases (never stages), the offline gate, promotion and rollback.

One registered model per use case (``registry.model_name``). Three aliases carry the state:
``champion`` (served), ``challenger`` (passed the offline gate, waiting for the canary) and
``previous`` (the champion before the last promotion, the rollback target). Every transition is
also written as version tags (who, why, when, numbers), so the history survives alias moves.

Concurrency design
------------------
MLflow has no transactions on aliases, and two training runs can finish together. Three layers:

1. A lease stored in the registry itself: the registered-model tag ``registry.lease`` holds
   ``{"owner": <uuid>, "expires_at": <epoch>}``. To acquire, a writer reads the tag, writes its own
   lease only if the tag is absent, expired or already its own, waits ``settle`` seconds and re-reads:
   it owns the lease only if the tag still names it (last writer wins; the loser sees someone else and
   backs off with jitter). The lease expires (``ttl``) so a crashed writer cannot block forever, and
   is released only by its owner. The lease is re-entrant per thread, so ``set_alias_safely`` can
   take it on its own or inside ``offline_gate``/``promote``. It works across machines (it only
   needs the tracking server), at the price of being a lease, not a consensus lock: two writers are
   only both admitted if a rival's write lands more than ``max(settle, 3 x our write latency)``
   after ours (the re-checks below narrow that further).
2. Re-validation under the lease: the champion is read (and scored, on the same eval set) only
   while holding the lease, and the challenger alias moves only if (a) the version's own
   ``gate.passed`` tag reads ``true``, (b) the champion it was compared with is still the champion,
   and (c) the challenger slot still holds what we read (compare-and-set, ``set_alias_safely``).
   A version already holding ``challenger`` is replaced only by one at least as good on this eval set.
3. Compare-and-set writes: ``set_alias_safely`` re-reads after the write to confirm.

So a version that lost the gate never receives an alias: its ``gate.passed`` tag is ``false`` and
check (a) runs after the tag is written, under the lease.

Loading models: offline_gate loads ``models:/<name>/<version>`` as the scoring service does
(``pipelines.serving.models.load_skops_model``): the skops file with the platform's trusted types
only, never pickle or pyfunc's loader; a version in another format is refused with its reason.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pipelines.training import TrainResult, evaluate, labelled

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
LEASE_TAG = "registry.lease"
DEFAULT_LEASE_TTL = 120.0
DEFAULT_LEASE_SETTLE = 0.3
DEFAULT_LEASE_TIMEOUT = 180.0


@dataclass
class GateDecision:
    passed: bool
    reason: str
    challenger_metric: float
    champion_metric: float | None
    margin: float
    guardrails: dict
    new_aliases: dict
    version: str = ""
    champion_version: str | None = None
    metric_name: str = "pr_auc"
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- pure decision


def decide(
    challenger_metric: float, champion_metric: float | None, margin: float, guardrails: dict
) -> tuple[bool, str]:
    """The gate rule, with no I/O. Higher metric is better.

    Passes iff every guardrail passed, the challenger metric is a number, and either there is no
    champion or the challenger is not worse than the champion by more than ``margin``.
    """
    failed = sorted(name for name, g in guardrails.items() if not g.get("passed", False))
    if failed:
        details = ", ".join(f"{n}={guardrails[n].get('value')} > {guardrails[n].get('limit')}" for n in failed)
        return False, f"guardrail failed: {details}"
    unmeasurable = challenger_metric is None or np.isnan(challenger_metric)
    if unmeasurable and (champion_metric is None or np.isnan(champion_metric)):
        # No labels in the evaluation range (an unlabelled dataset): the metric cannot be measured
        # for either version, so the gate decides on the guardrails and the canary compares online.
        first = "first model becomes champion" if champion_metric is None else "challenger"
        return True, (
            f"the evaluation range has no labelled anomalies and normals: gated on guardrails only ({first}; "
            "the canary compares online)"
        )
    if unmeasurable:
        return False, "challenger metric is not a number (eval set without both classes?)"
    if champion_metric is None:
        return True, "no champion yet: first model becomes champion"
    if np.isnan(champion_metric):
        return False, "champion metric is not a number: cannot compare, fix the eval set"
    if challenger_metric >= champion_metric - margin:
        return True, f"challenger {challenger_metric:.4f} >= champion {champion_metric:.4f} - margin {margin}"
    return False, f"challenger {challenger_metric:.4f} < champion {champion_metric:.4f} - margin {margin}"


def registry_params(params: dict) -> dict:
    return params["registry"] if "registry" in params else params


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _alias_version(client, model_name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(model_name).aliases or {}
    value = aliases.get(alias)
    return None if value is None else str(value)


# --------------------------------------------------------------------------- the lease


class LeaseTimeout(TimeoutError):
    pass


_held = threading.local()


@contextmanager
def registry_lease(
    client,
    model_name: str,
    *,
    ttl: float = DEFAULT_LEASE_TTL,
    settle: float = DEFAULT_LEASE_SETTLE,
    timeout: float = DEFAULT_LEASE_TIMEOUT,
    who: str = "",
):
    """Hold the registered model's lease (see module docstring); re-entrant within a thread."""
    held: dict = getattr(_held, "leases", None) or {}
    _held.leases = held
    key = model_name
    if key in held:
        held[key][1] += 1
        try:
            yield held[key][0]
        finally:
            held[key][1] -= 1
        return

    token = f"{uuid.uuid4()}:{who}"
    deadline = time.monotonic() + timeout
    while True:
        current = _read_lease(client, model_name)
        if current is None or current["expires_at"] < time.time() or current["owner"] == token:
            lease = json.dumps({"owner": token, "expires_at": time.time() + ttl})
            write_started = time.monotonic()
            client.set_registered_model_tag(model_name, LEASE_TAG, lease)
            # a rival's write lands at most about one write-latency after ours: wait well past it
            time.sleep(max(settle, 3 * (time.monotonic() - write_started)))
            confirmed = _read_lease(client, model_name)
            if confirmed is not None and confirmed["owner"] == token:
                break
        if time.monotonic() > deadline:
            raise LeaseTimeout(
                f"could not acquire the lease on registered model {model_name!r} within {timeout}s; "
                f"held by {current}. If its owner crashed it expires by itself after its ttl."
            )
        time.sleep(settle + random.uniform(0, settle * 2))
    held[key] = [token, 1]
    try:
        yield token
    finally:
        del held[key]
        current = _read_lease(client, model_name)
        if current is not None and current["owner"] == token:
            client.delete_registered_model_tag(model_name, LEASE_TAG)


def _read_lease(client, model_name: str) -> dict | None:
    raw = (client.get_registered_model(model_name).tags or {}).get(LEASE_TAG)
    if not raw:
        return None
    try:
        lease = json.loads(raw)
        return {"owner": str(lease["owner"]), "expires_at": float(lease["expires_at"])}
    except (ValueError, KeyError, TypeError):
        return None  # unreadable lease: treat as free


def _still_own_lease(client, model_name: str) -> bool:
    held = getattr(_held, "leases", None) or {}
    entry = held.get(model_name)
    current = _read_lease(client, model_name)
    return entry is not None and current is not None and current["owner"] == entry[0]


def set_alias_safely(client, model_name: str, alias: str, version, expected_current: str | None) -> bool:
    """Compare-and-set: point ``alias`` at ``version`` only if it still points at ``expected_current``.

    Takes the registry lease (re-entrant), re-reads before and after the write; returns False and
    changes nothing when the alias moved meanwhile or the lease was lost.
    """
    version = str(version)
    expected = None if expected_current is None else str(expected_current)
    with registry_lease(client, model_name, who=f"set {alias}"):
        if _alias_version(client, model_name, alias) != expected:
            return False
        if not _still_own_lease(client, model_name):
            return False
        client.set_registered_model_alias(model_name, alias, version)
        return _alias_version(client, model_name, alias) == version


# --------------------------------------------------------------------------- registration


def register_version(result: TrainResult, model_name: str, *, tracking_uri: str):
    """Create a new version of ``model_name`` from a training result, with description and lineage tags."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(
            model_name, description="IoT sensor anomaly detector; aliases champion/challenger/previous."
        )
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "ALREADY_EXISTS" not in str(exc.error_code):
            raise
    run = client.get_run(result.run_id)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    tags = {
        "run_id": result.run_id,
        "model_family": result.model_family,
        "decision_threshold": repr(result.threshold),
        "metrics": json.dumps(metrics, sort_keys=True),
        "baseline_threshold_metrics": json.dumps(result.baseline_metrics, sort_keys=True),
        "gold_snapshot": run.data.tags.get("gold_snapshot", ""),
        "training_partitions": ",".join(result.training_partitions)[:5000],
        "git_commit": run.data.tags.get("git_commit", ""),
    }
    description = (
        f"{result.model_family} trained in run {result.run_id} on partitions "
        f"{result.training_partitions[0] if result.training_partitions else '?'}.."
        f"{result.training_partitions[-1] if result.training_partitions else '?'}; test PR-AUC "
        f"{result.metrics.get('pr_auc', float('nan')):.4f} vs temperature rule "
        f"{result.baseline_metrics.get('pr_auc', float('nan')):.4f}."
    )
    return client.create_model_version(
        model_name,
        source=result.model_uri,
        run_id=result.run_id,
        tags=tags,
        description=description,
        model_id=result.model_id,
    )


# --------------------------------------------------------------------------- scoring a version


def score_version(
    client,
    model_name: str,
    version: str,
    eval_df: pd.DataFrame,
    metric: str,
    *,
    tracking_uri: str,
    windows: list | None = None,
) -> dict[str, Any]:
    """Load ``models:/name/version`` (skops with the platform's trusted types only: no pickle), score the
    labelled eval rows; metric, timing and size."""
    from pipelines.serving.models import fetch_skops_model

    lab = labelled(eval_df)
    if lab.empty:  # no labels: timing, size and the flag rate are still measured on every row
        lab = eval_df
    model, mlmodel, size_mb = fetch_skops_model(model_name, version, tracking_uri)
    columns = mlmodel.get_input_schema().input_names()
    missing = [c for c in columns if c not in lab.columns]
    if missing:
        raise ValueError(f"eval set lacks columns {missing} that {model_name} v{version} needs; rebuild gold")
    X = lab[columns]
    model.predict(X.head(10))  # warm-up: first call pays schema/JIT costs
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        scores = np.asarray(model.predict(X), dtype=np.float64).ravel()
        timings.append(time.perf_counter() - started)
    threshold = float("inf")
    mv = client.get_model_version(model_name, str(version))
    if mv.run_id:
        threshold = float(client.get_run(mv.run_id).data.metrics.get("decision_threshold", threshold))
    known = lab["is_anomaly"].notna().to_numpy()
    if known.any():
        metrics = evaluate(
            scores[known], lab["is_anomaly"][known].astype(int).to_numpy(), lab["label"][known], threshold
        )
    else:
        metrics = {"rows": float(len(scores)), "flagged": float((scores >= threshold).sum())}
    if metric.startswith("nab_"):
        # event-level: NAB's score of the version's alarms, windows from the contract or label runs
        from pipelines.training import device_windows, nab_scores

        nab, _ = nab_scores(lab, scores >= threshold, device_windows(lab, windows))
        metrics.update(nab)
    return {
        "metric": float(metrics.get(metric, float("nan"))),
        "metrics": metrics,
        "score_ms_per_1k": min(timings) / max(len(X), 1) * 1000 * 1000,
        "model_mb": size_mb,
        "rows": len(X),
        "run_id": mv.run_id,
    }


# --------------------------------------------------------------------------- the offline gate


def offline_gate(
    model_name: str,
    version,
    eval_df: pd.DataFrame,
    params: dict,
    *,
    tracking_uri: str,
    progress=print,
    windows: list | None = None,
    score_with=None,
    metric: str | None = None,
) -> GateDecision:
    """Compare ``version`` with the champion on ``eval_df``; set ``challenger`` (or ``champion`` if first).

    ``score_with(client, version) -> {"metric", "score_ms_per_1k", "model_mb", "run_id"}`` scores a
    version another way (the image classifier's accuracy on its test split): the margin, guardrails,
    lease, compare-and-set and version tags are this gate's, whatever the workload."""
    rp = registry_params(params)
    metric = metric or rp.get("primary_metric", "pr_auc")
    margin = float(rp.get("margin", 0.0))
    max_ms = float(rp.get("max_score_ms_per_1k", float("inf")))
    max_mb = float(rp.get("max_model_mb", float("inf")))
    version = str(version)
    client = _client(tracking_uri)

    def score(v: str) -> dict:
        if score_with is not None:
            return score_with(client, v)
        return score_version(
            client,
            model_name,
            v,
            eval_df,
            metric,
            tracking_uri=tracking_uri,
            windows=windows,
        )

    challenger = score(version)  # outside the lease: independent of the other writers
    guardrails = {
        "score_ms_per_1k": {
            "value": round(challenger["score_ms_per_1k"], 3),
            "limit": max_ms,
            "passed": challenger["score_ms_per_1k"] <= max_ms,
        },
        "model_mb": {
            "value": round(challenger["model_mb"], 3),
            "limit": max_mb,
            "passed": challenger["model_mb"] <= max_mb,
        },
    }
    progress(f"[gate] {model_name} v{version}: {metric}={challenger['metric']:.4f}, guardrails {guardrails}")

    new_aliases: dict[str, str] = {}
    with registry_lease(client, model_name, who=f"gate v{version}"):
        champ = _alias_version(client, model_name, CHAMPION)
        if champ == version:
            return GateDecision(
                True,
                "already champion",
                challenger["metric"],
                challenger["metric"],
                margin,
                guardrails,
                {},
                version,
                champ,
                metric,
            )
        champ_metric = score(champ)["metric"] if champ else None
        passed, reason = decide(challenger["metric"], champ_metric, margin, guardrails)

        current_challenger = _alias_version(client, model_name, CHALLENGER)
        if passed and champ is not None and current_challenger not in (None, version, champ):
            pending = score(current_challenger)["metric"]
            if pending > challenger["metric"]:
                reason += f"; challenger slot kept by v{current_challenger} ({metric} {pending:.4f} is higher)"
                current_challenger = "keep"

        _record_gate(
            client,
            model_name,
            version,
            challenger,
            passed,
            reason,
            metric,
            champ,
            champ_metric,
            margin,
            guardrails,
        )

        # re-validation under the lease before touching any alias
        if passed and current_challenger != "keep":
            tag_ok = client.get_model_version(model_name, version).tags.get("gate.passed") == "true"
            champ_unchanged = _alias_version(client, model_name, CHAMPION) == champ
            if tag_ok and champ_unchanged:
                alias, expected = (CHAMPION, None) if champ is None else (CHALLENGER, current_challenger)
                if set_alias_safely(client, model_name, alias, version, expected):
                    new_aliases[alias] = version
                    client.set_model_version_tag(model_name, version, f"alias.{alias}.set_at", _now())
                else:
                    reason += f"; alias {alias} moved concurrently, left unchanged"
            else:
                reason += "; re-validation failed (gate tag or champion changed), no alias moved"
            client.set_model_version_tag(model_name, version, "gate.reason", reason[:5000])
    progress(f"[gate] {model_name} v{version}: passed={passed} ({reason}); aliases set {new_aliases}")
    return GateDecision(
        passed,
        reason,
        challenger["metric"],
        champ_metric,
        margin,
        guardrails,
        new_aliases,
        version,
        champ,
        metric,
        extra={"score_ms_per_1k": challenger["score_ms_per_1k"], "model_mb": challenger["model_mb"]},
    )


def _record_gate(
    client, model_name, version, challenger, passed, reason, metric, champ, champ_metric, margin, guardrails
) -> None:
    tags = {
        "gate.passed": str(passed).lower(),
        "gate.reason": reason[:5000],
        "gate.primary_metric": metric,
        f"gate.challenger_{metric}": repr(challenger["metric"]),
        f"gate.champion_{metric}": "" if champ_metric is None else repr(champ_metric),
        "gate.champion_version": champ or "",
        "gate.margin": repr(margin),
        "gate.score_ms_per_1k": repr(round(challenger["score_ms_per_1k"], 3)),
        "gate.model_mb": repr(round(challenger["model_mb"], 3)),
        "gate.guardrails": json.dumps(guardrails, sort_keys=True),
        "gate.eval_rows": str(challenger["rows"]),
        "gate.decided_at": _now(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    run_id = challenger.get("run_id")
    if run_id:
        client.log_metric(run_id, f"gate_challenger_{metric}", challenger["metric"])
        if champ_metric is not None and not np.isnan(champ_metric):
            client.log_metric(run_id, f"gate_champion_{metric}", champ_metric)
        client.log_metric(run_id, "gate_score_ms_per_1k", challenger["score_ms_per_1k"])
        client.log_metric(run_id, "gate_model_mb", challenger["model_mb"])
        client.set_tag(run_id, "gate.passed", tags["gate.passed"])
        client.set_tag(run_id, "gate.reason", tags["gate.reason"])
        client.set_tag(run_id, "gate.model_version", f"{model_name}/{version}")


# --------------------------------------------------------------------------- promotion and rollback


def promote(
    model_name: str,
    version,
    *,
    tracking_uri: str,
    actor: str = "unknown",
    reason: str = "",
    require_gate: bool = True,
) -> dict[str, str]:
    """champion <- version, previous <- old champion; clears ``challenger`` if it pointed at version."""
    version = str(version)
    client = _client(tracking_uri)
    with registry_lease(client, model_name, who=f"promote v{version}"):
        mv = client.get_model_version(model_name, version)
        if require_gate and mv.tags.get("gate.passed") != "true":
            raise ValueError(
                f"{model_name} v{version} has not passed the offline gate (gate.passed="
                f"{mv.tags.get('gate.passed')!r}); run offline_gate first or pass require_gate=False"
            )
        old = _alias_version(client, model_name, CHAMPION)
        if old == version:
            return describe_aliases(model_name, tracking_uri=tracking_uri)
        if not set_alias_safely(client, model_name, CHAMPION, version, old):
            raise RuntimeError(f"champion of {model_name} moved during promotion of v{version}; retry")
        if old is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, old)
            _tag_many(
                client,
                model_name,
                old,
                {"demoted.at": _now(), "demoted.by": actor, "demoted.reason": reason, "demoted.for": version},
            )
        if _alias_version(client, model_name, CHALLENGER) == version:
            client.delete_registered_model_alias(model_name, CHALLENGER)
        _tag_many(
            client,
            model_name,
            version,
            {
                "promoted.at": _now(),
                "promoted.by": actor,
                "promoted.reason": reason,
                "promoted.replaced": old or "",
            },
        )
    return describe_aliases(model_name, tracking_uri=tracking_uri)


def rollback(model_name: str, *, tracking_uri: str, actor: str = "unknown", reason: str = "") -> dict[str, str]:
    """champion <- previous; the rolled-back version keeps a tag saying who/why/when."""
    client = _client(tracking_uri)
    with registry_lease(client, model_name, who="rollback"):
        prev = _alias_version(client, model_name, PREVIOUS)
        if prev is None:
            raise ValueError(f"{model_name} has no {PREVIOUS!r} alias: nothing to roll back to")
        current = _alias_version(client, model_name, CHAMPION)
        if not set_alias_safely(client, model_name, CHAMPION, prev, current):
            raise RuntimeError(f"champion of {model_name} moved during rollback; retry")
        client.delete_registered_model_alias(model_name, PREVIOUS)
        if current is not None:
            _tag_many(
                client,
                model_name,
                current,
                {
                    "rolled_back.at": _now(),
                    "rolled_back.by": actor,
                    "rolled_back.reason": reason,
                    "rolled_back.to": prev,
                },
            )
        _tag_many(client, model_name, prev, {"restored.at": _now(), "restored.by": actor, "restored.reason": reason})
    return describe_aliases(model_name, tracking_uri=tracking_uri)


def _tag_many(client, model_name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value)[:5000])


def describe_aliases(model_name: str, *, tracking_uri: str) -> dict[str, str]:
    """{alias: version} of the registered model."""
    aliases = _client(tracking_uri).get_registered_model(model_name).aliases or {}
    return {alias: str(v) for alias, v in sorted(aliases.items())}
