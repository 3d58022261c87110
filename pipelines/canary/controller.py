"""The canary's I/O edge: start a rollout, evaluate the current step from the prediction log, move
weights and aliases, record every transition (lake history, version tags, an MLflow run).

DAG tasks and ``platform canary ...`` call these functions; the decision itself is
``analysis.analyze_step`` + ``state.after_verdict`` (pure). A rollout of an image classifier (its
versions tagged ``model_kind=classifier``) is read from /classify's log by ``pipelines.canary.images``
and judged by the same analysis, state machine and records.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from pipelines.canary import analysis, history
from pipelines.canary import state as st
from pipelines.canary.stages import CanaryPlan, load_plan


def _context(store=None, params: dict | None = None, dataset: str | None = None):
    from pipelines.canary.images import image_dataset_params
    from pipelines.datasets import DatasetError, effective_params
    from pipelines.serving.predlog import lake_store
    from pipelines.settings import get_settings, load_params

    settings = get_settings()
    params = params if params is not None else load_params(settings.params_file)
    # The dataset's view of params: its own registered model unless canary.model_name names another.
    name = dataset or settings.dataset
    try:
        params = effective_params(name, params)
    except DatasetError as exc:
        image_params = image_dataset_params(name, params)  # an image dataset: its contract's classifier
        if image_params is None:
            from pipelines.images.contract import image_contract_files

            raise DatasetError(f"{exc}; image datasets: {sorted(image_contract_files())}") from None
        params = image_params
    return settings, load_plan(params), store or lake_store(settings, 30.0)


def _client(settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def _aliases(client, name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return {}  # nothing registered yet: no roles, nothing to roll out
        raise
    return {k: str(v) for k, v in (model.aliases or {}).items()}


def _audit_aliases(store, client, name: str, progress=print) -> None:
    """Record alias changes made outside the platform (history.audit_aliases) before the canary acts,
    so they are in the history even when nobody runs `platform canary history`."""
    try:
        for event in history.audit_aliases(store, client, name):
            progress(f"[canary] {event['event']}: {event['reason']}")
    except Exception as exc:  # noqa: BLE001 - the audit must not stop a rollout step
        progress(f"[canary] alias audit of {name} failed: {exc}")


def _tag(client, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value)[:5000])


def _transition_tags(state: st.RolloutState, action: str) -> dict[str, Any]:
    return {
        "canary.rollout_id": state.rollout_id,
        "canary.status": state.status,
        "canary.step": state.step_name,
        "canary.weight": state.weight,
        "canary.last_action": action,
        "canary.reason": state.reason,
        "canary.updated_at": state.updated_at,
        "canary.updated_by": state.updated_by,
    }


def stage_note(state: st.RolloutState) -> str:
    """One line for the Airflow run note / task log / CLI."""
    if not state.rollout_id:
        return "no rollout"
    verdict = state.last_verdict.get("verdict", "-") if state.last_verdict else "-"
    return (
        f"{state.model_name} v{state.challenger_version} vs v{state.champion_version}: {state.status} "
        f"at {state.step_name} (weight {state.weight}%, shadow {state.shadow}); last verdict {verdict}; "
        f"{state.reason[:300]}"
    )


# --------------------------------------------------------------------------- start


def start_rollout(
    *, actor: str, reason: str = "", store=None, params: dict | None = None, dataset: str | None = None
) -> st.RolloutState:
    """Begin a rollout of the ``challenger`` alias against ``champion`` at the first step."""
    settings, plan, store = _context(store, params, dataset)
    client = _client(settings)
    current = st.read_state(store, plan.model_name)
    if current.active:
        raise ValueError(
            f"rollout {current.rollout_id} is still running at {current.step_name}; "
            "promote or roll it back first (platform canary promote|rollback)"
        )
    _audit_aliases(store, client, plan.model_name)
    aliases = _aliases(client, plan.model_name)
    if "champion" not in aliases or "challenger" not in aliases:
        raise ValueError(
            f"{plan.model_name} needs both a champion and a challenger alias to start a canary; it has {aliases}"
        )
    if aliases["champion"] == aliases["challenger"]:
        raise ValueError(f"challenger v{aliases['challenger']} is already champion: nothing to roll out")
    state = st.start(plan, aliases["champion"], aliases["challenger"], actor, reason)
    kind = _rollout_kind(client, state)
    run_id = _mlflow_run(settings, plan, state, kind)
    state = dataclasses.replace(state, mlflow_run_id=run_id) if run_id else state
    st.write_state(store, state)
    _tag(client, plan.model_name, state.challenger_version, _transition_tags(state, "start"))
    history.record_event(
        store,
        "rollout started",
        model_name=plan.model_name,
        version=state.challenger_version,
        actor=actor,
        reason=state.reason,
        rollout_id=state.rollout_id,
        step=state.step_name,
        details={"champion": state.champion_version, "kind": kind, "steps": [s.__dict__ for s in plan.steps]},
    )
    return state


def _rollout_kind(client, state: st.RolloutState) -> str:
    """What the rollout's models predict (``analysis.ANOMALY`` or ``CLASSIFIER``), from their version tags."""
    from pipelines.canary.images import rollout_kind

    return rollout_kind(client, state)


def _mlflow_run(settings, plan: CanaryPlan, state: st.RolloutState, kind: str = analysis.ANOMALY) -> str:
    client = _client(settings)
    exp = client.get_experiment_by_name(plan.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(plan.experiment)
    run = client.create_run(
        exp_id,
        run_name=f"canary-{state.model_name}-v{state.challenger_version}",
        tags={
            "canary.rollout_id": state.rollout_id,
            "model_name": state.model_name,
            "challenger_version": state.challenger_version,
            "champion_version": state.champion_version,
            "model_kind": kind,
        },
    )
    for i, step in enumerate(plan.steps):
        client.log_param(run.info.run_id, f"step{i}", json.dumps(step.__dict__))
    client.log_param(run.info.run_id, "analysis", json.dumps(plan.analysis.__dict__)[:6000])
    return run.info.run_id


# --------------------------------------------------------------------------- the sample


def build_sample(
    predictions: pd.DataFrame, feedback: pd.DataFrame, state: st.RolloutState, now: datetime | None = None
) -> analysis.StepSample:
    """The step's traffic from the prediction log (pure: frames in, arrays out)."""
    now = now or datetime.now(UTC)
    p, started = st.rows_of_step(predictions, state)
    labels = pd.DataFrame(columns=["request_id", "record_index", "is_anomaly"])
    if len(feedback):
        labels = feedback.sort_values("ts").drop_duplicates(["request_id", "record_index"], keep="last")
        labels = labels[["request_id", "record_index", "is_anomaly"]]

    def role_sample(role: str) -> tuple[analysis.RoleSample, pd.DataFrame]:
        rows = p[p["role"] == role]
        ok = rows[rows["error"].isna()]
        lab = ok.merge(labels, on=["request_id", "record_index"], how="inner")
        # latency is a property of a model call, not of a record: the 50 records of one request share
        # one latency, and counting them 50 times made one slow call look like overwhelming evidence
        calls = rows.groupby(["request_id", "served"], sort=False)
        return analysis.RoleSample(
            latency_ms=calls["latency_ms"].first().to_numpy(dtype=float),
            compute_ms=calls["compute_ms"].first().to_numpy(dtype=float),  # null: an older service's rows
            error=rows["error"].notna().to_numpy(),
            score=ok["score"].to_numpy(dtype=float),
            flagged=ok["flagged"].to_numpy(dtype=bool),
            labels=lab["is_anomaly"].to_numpy(dtype=int),
            labelled_flags=lab["flagged"].to_numpy(dtype=bool),
        ), ok

    champion, champ_ok = role_sample("champion")
    challenger, chal_ok = role_sample("challenger")
    both = champ_ok.merge(chal_ok, on=["request_id", "record_index"], suffixes=("_a", "_b"))
    both = both.merge(labels, on=["request_id", "record_index"], how="left")
    paired = None
    if len(both):
        paired = analysis.PairedSample(
            champion_score=both["score_a"].to_numpy(dtype=float),
            challenger_score=both["score_b"].to_numpy(dtype=float),
            champion_flagged=both["flagged_a"].to_numpy(dtype=bool),
            challenger_flagged=both["flagged_b"].to_numpy(dtype=bool),
            labels=both["is_anomaly"].fillna(-1).to_numpy(dtype=int),
        )
    return analysis.StepSample(
        champion, challenger, elapsed_seconds=(now - started.to_pydatetime()).total_seconds(), paired=paired
    )


def read_step_traffic(store, state: st.RolloutState) -> tuple[pd.DataFrame, pd.DataFrame]:
    from pipelines.serving.predlog import FEEDBACK, PREDICTIONS, read_table

    since = datetime.fromisoformat(state.step_started_at)
    return read_table(store, PREDICTIONS, since), read_table(store, FEEDBACK, since)


# --------------------------------------------------------------------------- one step


def evaluate_step(
    *, actor: str = "canary-dag", store=None, params: dict | None = None, progress=print, dataset: str | None = None
) -> dict[str, Any]:
    """Evaluate the current step once and act: hold, advance, promote (at the last step) or roll back."""
    settings, plan, store = _context(store, params, dataset)
    _audit_aliases(store, _client(settings), plan.model_name, progress)
    state = st.read_state(store, plan.model_name)
    if not state.active:
        note = stage_note(state)
        progress(f"[canary] nothing to evaluate: {note}")
        return {"action": "none", "status": state.status, "note": note}
    step = plan.steps[state.step_index]
    if _rollout_kind(_client(settings), state) == analysis.CLASSIFIER:
        from pipelines.canary import images

        predictions, labels = images.read_image_step_traffic(store, state)
        sample = images.build_image_sample(predictions, labels, state)
    else:
        predictions, feedback = read_step_traffic(store, state)
        sample = build_sample(predictions, feedback, state)
    verdict = analysis.analyze_step(sample, step, plan.analysis)
    progress("[canary] " + verdict.summary())
    new_state, action = st.after_verdict(state, plan, verdict.to_dict(), actor)
    return _apply(settings, plan, store, state, new_state, action, actor, progress)


def _apply(
    settings, plan, store, old: st.RolloutState, new: st.RolloutState, action: str, actor: str, progress
) -> dict[str, Any]:
    from pipelines import registry

    client = _client(settings)
    name, version = plan.model_name, new.challenger_version
    if action == "promote":
        registry.promote(
            name,
            version,
            tracking_uri=settings.mlflow_tracking_uri,
            actor=actor,
            reason=new.reason,
            require_gate=False,
        )  # the canary is the gate's online half
    st.write_state(store, new)
    _tag(client, name, version, _transition_tags(new, action))
    if action == "rollback":
        _tag(
            client,
            name,
            version,
            {
                "canary.failed_at": new.updated_at,
                "canary.failed_step": old.step_name,
                "canary.failed_reason": new.reason,
            },
        )
        if _aliases(client, name).get("challenger") == version:
            # so the next rollout does not pick the same failed version again
            with registry.registry_lease(client, name, who="canary rollback"):
                client.delete_registered_model_alias(name, "challenger")
    _log_to_mlflow(client, new, old, action)
    if action != "hold" or not old.last_verdict:
        event = {
            "advance": f"advanced to {new.step_name}",
            "promote": "promoted to champion",
            "rollback": "rolled back",
            "hold": "holding",
        }[action]
        history.record_event(
            store,
            event,
            model_name=name,
            version=version,
            actor=actor,
            reason=new.reason,
            rollout_id=new.rollout_id,
            step=old.step_name,
            details={"verdict": new.last_verdict, "weight": new.weight},
        )
    note = stage_note(new)
    progress(f"[canary] {action}: {note}")
    return {
        "action": action,
        "status": new.status,
        "step": new.step_name,
        "weight": new.weight,
        "verdict": new.last_verdict,
        "note": note,
        "rollout_id": new.rollout_id,
    }


def _log_to_mlflow(client, new: st.RolloutState, old: st.RolloutState, action: str) -> None:
    if not new.mlflow_run_id:
        return
    run_id = new.mlflow_run_id
    verdict = new.last_verdict or {}
    metrics = {"step_index": float(old.step_index), "weight": float(new.weight)}
    for name, m in (verdict.get("metrics") or {}).items():
        for field in ("champion", "challenger", "statistic", "p_value"):
            if isinstance(m.get(field), (int, float)):
                metrics[f"{name}.{field}"] = float(m[field])
        metrics[f"{name}.n_challenger"] = float(m.get("n_challenger", 0))
    stamp = datetime.now(UTC)
    for key, value in metrics.items():
        if np.isfinite(value):
            client.log_metric(run_id, key, value, step=old.step_index)
    client.log_text(
        run_id,
        json.dumps({"action": action, "state": json.loads(new.to_json())}, indent=2),
        f"decisions/{stamp:%Y%m%dT%H%M%S%f}-{old.step_name}-{action}.json",
    )
    client.set_tag(run_id, "canary.status", new.status)
    client.set_tag(run_id, "canary.step", new.step_name)
    if new.status != st.RUNNING:
        client.set_terminated(run_id, "FINISHED" if new.status == st.PROMOTED else "FAILED")


# --------------------------------------------------------------------------- manual operations


def set_weight(
    weight: int,
    shadow: str | None = None,
    *,
    actor: str,
    reason: str,
    store=None,
    params: dict | None = None,
    dataset: str | None = None,
) -> st.RolloutState:
    settings, plan, store = _context(store, params, dataset)
    state = st.read_state(store, plan.model_name)
    if not state.active:
        raise ValueError(f"no running rollout (status {state.status}): start one with `platform canary start`")
    new = st.with_weight(state, weight, shadow, actor, reason)
    st.write_state(store, new)
    _tag(_client(settings), plan.model_name, new.challenger_version, _transition_tags(new, "set-weight"))
    history.record_event(
        store,
        f"weight set to {new.weight}% (shadow {new.shadow})",
        model_name=plan.model_name,
        version=new.challenger_version,
        actor=actor,
        reason=reason,
        rollout_id=new.rollout_id,
        step=new.step_name,
        details={"from": state.weight},
    )
    return new


def promote(
    *,
    actor: str,
    reason: str,
    version: str | None = None,
    force: bool = False,
    store=None,
    params: dict | None = None,
    dataset: str | None = None,
) -> dict[str, str]:
    """Manual promotion: ``version`` (default: the running rollout's challenger, else the alias)."""
    from pipelines import registry

    settings, plan, store = _context(store, params, dataset)
    client = _client(settings)
    state = st.read_state(store, plan.model_name)
    version = version or (
        state.challenger_version if state.active else _aliases(client, plan.model_name).get("challenger")
    )
    if not version:
        raise ValueError(f"{plan.model_name} has no challenger and no --version was given: nothing to promote")
    aliases = registry.promote(
        plan.model_name,
        version,
        tracking_uri=settings.mlflow_tracking_uri,
        actor=actor,
        reason=reason,
        require_gate=not force,
    )
    if state.active and state.challenger_version == str(version):
        new = st.finish(state, actor, f"manual promotion: {reason}")
        st.write_state(store, new)
        _log_to_mlflow(client, new, state, "promote")
    _tag(
        client,
        plan.model_name,
        str(version),
        {"canary.manual_promotion_by": actor, "canary.manual_promotion_reason": reason},
    )
    history.record_event(
        store,
        "promoted to champion (manual)",
        model_name=plan.model_name,
        version=str(version),
        actor=actor,
        reason=reason,
        rollout_id=state.rollout_id if state.active else "",
        details={"aliases": aliases},
    )
    return aliases


def rollback(
    *, actor: str, reason: str, store=None, params: dict | None = None, dataset: str | None = None
) -> dict[str, Any]:
    """A running rollout: abort it (weight 0). Otherwise: champion <- previous (registry.rollback)."""
    from pipelines import registry

    settings, plan, store = _context(store, params, dataset)
    state = st.read_state(store, plan.model_name)
    if state.active:
        new = st.abort(state, actor, f"manual rollback: {reason}")
        result = _apply(settings, plan, store, state, new, "rollback", actor, progress=lambda s: None)
        return {"aborted_rollout": state.rollout_id, **result}
    aliases = registry.rollback(plan.model_name, tracking_uri=settings.mlflow_tracking_uri, actor=actor, reason=reason)
    history.record_event(
        store,
        "champion rolled back to previous (manual)",
        model_name=plan.model_name,
        version=aliases.get("champion", ""),
        actor=actor,
        reason=reason,
        details={"aliases": aliases},
    )
    return {"aliases": aliases}


def status(store=None, params: dict | None = None, dataset: str | None = None) -> dict[str, Any]:
    settings, plan, store = _context(store, params, dataset)
    state = st.read_state(store, plan.model_name)
    try:
        aliases = _aliases(_client(settings), plan.model_name)
    except Exception as exc:  # noqa: BLE001 - the state is still worth showing
        aliases = {"error": str(exc)[:200]}
    return {
        "model_name": plan.model_name,
        "aliases": aliases,
        "note": stage_note(state),
        "state": json.loads(state.to_json()),
        "steps": [s.__dict__ for s in plan.steps],
    }


def history_events(store=None, params: dict | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
    settings, plan, store = _context(store, params, dataset)
    return history.merged_history(store, _client(settings), plan.model_name)
