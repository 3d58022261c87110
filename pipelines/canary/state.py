"""The rollout state machine: one JSON object per registered model in the lake
(``serving/rollouts/<model>.json``) read by the scoring service and the model's canary DAG, written
with one atomic PUT; transitions are pure functions. Each dataset's model rolls out on its own.

States: ``running`` (at ``step_index``) -> ``promoted`` | ``rolled_back``. ``idle`` when none started.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pipelines.canary.stages import CanaryPlan, Step

ROLLOUT_PREFIX = "serving/rollouts/"


def rollout_key(model_name: str) -> str:
    """Where a model's rollout state lives in the lake bucket."""
    if not model_name:
        raise ValueError("a rollout state belongs to a registered model: model_name is empty")
    return f"{ROLLOUT_PREFIX}{model_name}.json"


IDLE, RUNNING, PROMOTED, ROLLED_BACK = "idle", "running", "promoted", "rolled_back"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RolloutState:
    status: str = IDLE
    rollout_id: str = ""
    model_name: str = ""
    champion_version: str = ""
    challenger_version: str = ""
    step_index: int = -1
    step_name: str = ""
    weight: int = 0  # percent of devices routed to the challenger
    shadow: str = "none"  # none | challenger | champion
    started_at: str = ""
    step_started_at: str = ""
    updated_at: str = ""
    updated_by: str = ""
    reason: str = ""
    mlflow_run_id: str = ""
    last_verdict: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status == RUNNING

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RolloutState:
        raw = json.loads(data)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


# --------------------------------------------------------------------------- pure transitions


def _enter(state: RolloutState, step_index: int, step: Step, actor: str, reason: str) -> RolloutState:
    at = now_iso()
    return replace(
        state,
        step_index=step_index,
        step_name=step.name,
        weight=step.weight,
        shadow=step.shadow,
        step_started_at=at,
        updated_at=at,
        updated_by=actor,
        reason=reason,
    )


def start(plan: CanaryPlan, champion: str, challenger: str, actor: str, reason: str = "") -> RolloutState:
    base = RolloutState(
        status=RUNNING,
        rollout_id=f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}",
        model_name=plan.model_name,
        champion_version=str(champion),
        challenger_version=str(challenger),
        started_at=now_iso(),
    )
    return _enter(base, 0, plan.steps[0], actor, reason or f"rollout of v{challenger} against v{champion}")


def after_verdict(
    state: RolloutState, plan: CanaryPlan, verdict: dict[str, Any], actor: str
) -> tuple[RolloutState, str]:
    """(new state, action) with action one of ``hold``, ``advance``, ``promote``, ``rollback``."""
    if not state.active:
        raise ValueError(f"rollout {state.rollout_id or '-'} is {state.status}, not running: nothing to step")
    outcome = verdict["verdict"]
    reasons = "; ".join(verdict.get("reasons", []))[:2000]
    if outcome == "fail":
        return abort(state, actor, f"step {state.step_name} failed: {reasons}", verdict), "rollback"
    if outcome == "inconclusive":
        at = now_iso()
        return replace(state, updated_at=at, updated_by=actor, reason=reasons, last_verdict=verdict), "hold"
    if state.step_index + 1 >= len(plan.steps):
        return finish(state, actor, f"every step passed (last: {state.step_name})", verdict), "promote"
    nxt = plan.steps[state.step_index + 1]
    new = _enter(state, state.step_index + 1, nxt, actor, f"step {state.step_name} passed")
    return replace(new, last_verdict=verdict), "advance"


def abort(state: RolloutState, actor: str, reason: str, verdict: dict | None = None) -> RolloutState:
    return replace(
        state,
        status=ROLLED_BACK,
        weight=0,
        shadow="none",
        updated_at=now_iso(),
        updated_by=actor,
        reason=reason,
        last_verdict=verdict if verdict is not None else state.last_verdict,
    )


def finish(state: RolloutState, actor: str, reason: str, verdict: dict | None = None) -> RolloutState:
    return replace(
        state,
        status=PROMOTED,
        weight=0,  # the challenger is now the champion: all traffic goes to `champion`
        shadow="none",
        updated_at=now_iso(),
        updated_by=actor,
        reason=reason,
        last_verdict=verdict if verdict is not None else state.last_verdict,
    )


def with_weight(state: RolloutState, weight: int, shadow: str | None, actor: str, reason: str) -> RolloutState:
    if not 0 <= weight <= 100:
        raise ValueError(f"weight {weight} must be within 0..100 (percent of devices)")
    return replace(
        state,
        weight=int(weight),
        shadow=state.shadow if shadow is None else shadow,
        updated_at=now_iso(),
        updated_by=actor,
        reason=reason,
    )


# --------------------------------------------------------------------------- the lake object


def rows_of_step(log, state: RolloutState):
    """The rows of a prediction log (a DataFrame with ``rollout_id``, ``step``, ``ts``) that the
    rollout's current step served, and when that step started (a UTC Timestamp)."""
    import pandas as pd

    started = pd.Timestamp(state.step_started_at).tz_convert("UTC")
    mine = (log["rollout_id"] == state.rollout_id) & (log["step"] == state.step_name) & (log["ts"] >= started)
    return log[mine], started


def read_state(store, model_name: str) -> RolloutState:
    """The model's current state; ``idle`` when no rollout of it was ever started."""
    bucket, key = store.settings.lake_bucket, rollout_key(model_name)
    if not store.exists(bucket, key):
        return RolloutState(model_name=model_name)
    return RolloutState.from_json(store.get_bytes(bucket, key))


def write_state(store, state: RolloutState) -> None:
    """One PUT of the whole object: readers see the old state or the new one, never a mix."""
    store.put_bytes(store.settings.lake_bucket, rollout_key(state.model_name), state.to_json(), "application/json")
