"""Canary promotion: the pure decision logic over simulated traffic, then whole rollouts through the
real scoring service, prediction log, registry and lake (good challenger promoted, bad one rolled back).
"""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest

from pipelines.canary import analysis, controller, history
from pipelines.canary import state as st
from pipelines.canary.stages import AnalysisConfig, CanaryPlan, Step
from pipelines.serving.routing import route
from tests.integration.test_serving import (
    ServiceProcess,
    records_of,
    register_model,
    set_alias,
    traffic_frame,
)

CFG = AnalysisConfig(min_labels=100)
SHADOW = Step("shadow", 0, "challenger", min_requests=300, bake_seconds=0)
CANARY = Step("canary-10", 10, min_requests=300, bake_seconds=0)


# --------------------------------------------------------------------------- simulated traffic


def simulate(rng, n=800, paired=False, slow=1.0, errors=0.001, noise=0.1, scramble=0.0) -> analysis.StepSample:
    """Two models' traffic. ``scramble``: share of the challenger's scores replaced by noise (worse model)."""
    y = rng.random(n) < 0.1
    base = rng.normal(0, 1, n) + 2.5 * y

    def role(score: np.ndarray, lat_scale: float, err: float, shift_noise: float) -> analysis.RoleSample:
        s = score + rng.normal(0, shift_noise, n)
        flagged = s >= 1.3
        error = rng.random(n) < err
        latency = rng.lognormal(np.log(8 * lat_scale), 0.3, n)
        return analysis.RoleSample(latency, error, s[~error], flagged[~error], y[~error].astype(int), flagged[~error])

    champion_score = base if paired else rng.normal(0, 1, n) + 2.5 * (rng.random(n) < 0.1)
    champ = role(base, 1.0, 0.001, 0.0)
    chal_score = base.copy() if paired else champion_score
    if not paired:  # a different population of devices, same distribution
        y_other = rng.random(n) < 0.1
        chal_score = rng.normal(0, 1, n) + 2.5 * y_other
        y = y_other
    k = int(scramble * n)
    chal_score[:k] = rng.normal(0.8, 1.2, k)
    chal = role(chal_score, slow, errors, noise)
    agreement = None
    if paired:
        both = ~(np.isin(np.arange(n), []))
        a = (base >= 1.3)[both]
        b = (chal_score + 0 >= 1.3)[both]
        agreement = a == b
    return analysis.StepSample(champ, chal, agreement, elapsed_seconds=3600)


@pytest.mark.parametrize("step,paired", [(SHADOW, True), (CANARY, False)], ids=["shadow", "canary"])
def test_equal_models_are_rolled_back_in_at_most_5_percent_of_simulations(step, paired):
    rng = np.random.default_rng(2026)
    runs = 300
    verdicts = [analysis.analyze_step(simulate(rng, paired=paired), step, CFG).verdict for _ in range(runs)]
    fail_rate = verdicts.count("fail") / runs
    assert fail_rate <= 0.05, (fail_rate, {v: verdicts.count(v) for v in set(verdicts)})
    assert verdicts.count("pass") / runs >= 0.9


def clustered_canary_traffic(rng, equal=True, devices=200, per_device=12, weight=10) -> analysis.StepSample:
    """A canary step as the service sees it: devices differ (each has its own score level), ``weight``% of
    them (sticky) go to the challenger, and the champion shadows the challenger's records."""
    level = rng.normal(0, 1.5, devices)  # per-device offset: what makes two device groups differ
    dev = np.repeat(np.arange(devices), per_device)
    y = rng.random(len(dev)) < 0.1
    champ_score = level[dev] + rng.normal(0, 1, len(dev)) + 2.5 * y
    chal_score = champ_score + rng.normal(0, 0.1, len(dev)) if equal else rng.normal(0.8, 1.2, len(dev))
    to_challenger = np.isin(dev, rng.choice(devices, devices * weight // 100, replace=False))
    lat = lambda n: rng.lognormal(np.log(8), 0.3, n)  # noqa: E731

    def role(score, mask, threshold=1.3):
        flags = score[mask] >= threshold
        return analysis.RoleSample(lat(mask.sum()), np.zeros(mask.sum(), bool), score[mask], flags, y[mask], flags)

    champion = role(champ_score, np.ones(len(dev), bool))  # served (90%) + shadow copies (10%)
    challenger = role(chal_score, to_challenger)
    paired = analysis.PairedSample(
        champ_score[to_challenger],
        chal_score[to_challenger],
        champ_score[to_challenger] >= 1.3,
        chal_score[to_challenger] >= 1.3,
        y[to_challenger].astype(int),
    )
    return analysis.StepSample(champion, challenger, elapsed_seconds=3600, paired=paired)


def test_canary_compares_both_models_on_the_same_records_not_across_device_groups():
    """Two equally good models at a 10% split of heterogeneous devices: compared across the device groups
    they look different (the rollback seen in CI); compared on the challenger's records, scored by both,
    they pass. A bad challenger still fails on the paired records."""
    step = Step("canary-10", 10, "champion", min_requests=150, bake_seconds=0)
    cfg = AnalysisConfig(min_labels=100)
    rng = np.random.default_rng(11)
    runs = 120
    paired_fail = unpaired_fail = 0
    for _ in range(runs):
        sample = clustered_canary_traffic(rng)
        paired_fail += analysis.analyze_step(sample, step, cfg).verdict == "fail"
        sample.paired, sample.paired_agreement = None, None
        unpaired_fail += analysis.analyze_step(sample, step, cfg).verdict == "fail"
    assert paired_fail / runs <= 0.05, paired_fail
    assert unpaired_fail / runs > 0.15, unpaired_fail  # why the paired comparison exists
    verdict = analysis.analyze_step(clustered_canary_traffic(rng, equal=False), step, cfg)
    assert verdict.verdict == "fail" and verdict.metrics["agreement"].verdict == "fail", verdict.summary()
    shift = verdict.metrics["score_shift"]
    assert shift.verdict == "fail" and "Spearman" in shift.test and shift.n_challenger == shift.n_champion


def test_build_sample_pairs_the_shadow_copy_with_the_served_record():
    """From prediction-log rows: the champion's shadow copy of a challenger-served record is paired with
    it, records only one model scored stay unpaired, labels join where feedback exists (-1 elsewhere)."""
    import pandas as pd

    state = st.RolloutState(
        status=st.RUNNING, rollout_id="r1", step_name="canary-10", step_started_at="2026-01-01T00:00:00+00:00"
    )
    ts = pd.Timestamp("2026-01-01T00:05:00Z")

    def row(role, rid, i, score, served=True):
        return {
            "rollout_id": "r1",
            "step": "canary-10",
            "ts": ts,
            "role": role,
            "request_id": rid,
            "record_index": i,
            "score": score,
            "flagged": score >= 0.5,
            "latency_ms": 5.0,
            "compute_ms": None,  # as read_table gives a part of a service that logged no compute time
            "error": None,
            "served": served,
        }

    log = pd.DataFrame(
        [
            row("champion", "a", 0, 0.1),
            row("champion", "a", 1, 0.9),  # served by the champion only
            row("challenger", "a", 2, 0.8),
            row("champion", "a", 2, 0.7, served=False),  # pair 1
            row("challenger", "b", 0, 0.2),
            row("champion", "b", 0, 0.6, served=False),  # pair 2, disagree
        ]
    )
    feedback = pd.DataFrame([{"request_id": "a", "record_index": 2, "is_anomaly": 1, "ts": ts}])
    sample = controller.build_sample(log, feedback, state, now=ts.to_pydatetime())
    assert sample.paired is not None and sample.paired.n == 2
    assert list(sample.paired.champion_score) == [0.7, 0.6] and list(sample.paired.challenger_score) == [0.8, 0.2]
    assert list(sample.paired.labels) == [1, -1]
    assert list(sample.paired_agreement) == [True, False]
    assert sample.champion.n == 4 and sample.challenger.n == 2
    # latency: one observation per model call (request a served, a's shadow copy, b's shadow copy)
    assert len(sample.champion.latency_ms) == 3 and len(sample.challenger.latency_ms) == 2
    assert np.isnan(sample.champion.compute_ms).all()  # rows of a service that logged no compute time
    timed = controller.build_sample(log.assign(compute_ms=2.0), feedback, state, now=ts.to_pydatetime())
    assert list(timed.champion.compute_ms) == [2.0, 2.0, 2.0]
    # no feedback at all yet: still paired, nothing labelled
    empty = pd.DataFrame(columns=["request_id", "record_index", "is_anomaly", "ts"])
    assert list(controller.build_sample(log, empty, state, now=ts.to_pydatetime()).paired.labels) == [-1, -1]


def reordered_normals_traffic(rng, labelled: bool, n: int = 2000) -> analysis.StepSample:
    """Both models flag the same anomalies but order the normal records independently (a retrained
    classifier's near-zero probabilities): Spearman's rho over all records is low."""
    y = rng.random(n) < 0.08
    champ = np.where(y, rng.uniform(0.9, 1.0, n), rng.uniform(0.0, 0.05, n))
    chal = np.where(y, rng.uniform(0.9, 1.0, n), rng.uniform(0.0, 0.05, n))  # independent among normals
    flags_a, flags_b = champ >= 0.5, chal >= 0.5
    labels = y.astype(int) if labelled else np.full(n, -1)
    lat = rng.lognormal(np.log(8), 0.3, n)
    champion = analysis.RoleSample(lat, np.zeros(n, bool), champ, flags_a, y[:0], flags_a[:0])
    challenger = analysis.RoleSample(lat, np.zeros(n, bool), chal, flags_b, y[:0], flags_b[:0])
    paired = analysis.PairedSample(champ, chal, flags_a, flags_b, labels)
    return analysis.StepSample(champion, challenger, elapsed_seconds=3600, paired=paired)


def test_labels_on_the_same_records_overrule_the_score_rank_check():
    """Ranks are a proxy while no labels say how the decisions compare: with them, a challenger that
    flags what the champion flags and is no worse on labels passes; without them the rank check fails it."""
    step = Step("canary-10", 10, "champion", min_requests=150, bake_seconds=0)
    cfg = AnalysisConfig(min_labels=100)
    rng = np.random.default_rng(5)
    unlabelled = analysis.analyze_step(reordered_normals_traffic(rng, labelled=False), step, cfg)
    assert unlabelled.verdict == "fail" and unlabelled.metrics["score_shift"].verdict == "fail"
    assert unlabelled.metrics["score_shift"].statistic < 0.5
    labelled = analysis.analyze_step(reordered_normals_traffic(rng, labelled=True), step, cfg)
    shift = labelled.metrics["score_shift"]
    assert labelled.verdict == "pass", labelled.summary()
    assert shift.verdict == "pass" and "overruled by labels" in shift.detail and shift.statistic < 0.5


@pytest.mark.parametrize(
    "fault,kwargs,metric",
    [
        ("slow", {"slow": 3.0}, "latency_p99"),
        ("errors", {"errors": 0.05}, "error_rate"),
        ("worse predictions", {"scramble": 0.6}, "f1"),
    ],
)
def test_a_bad_challenger_fails_the_first_step(fault, kwargs, metric):
    rng = np.random.default_rng(7)
    for step, paired in ((SHADOW, True), (CANARY, False)):
        verdict = analysis.analyze_step(simulate(rng, paired=paired, **kwargs), step, CFG)
        assert verdict.verdict == "fail", (fault, verdict.summary())
        assert verdict.metrics[metric].verdict == "fail", verdict.summary()
        # the numbers behind the verdict are there, not only the verdict
        m = verdict.metrics[metric].__dict__
        assert m["n_champion"] > 0 and m["challenger"] is not None and m["threshold"]


def with_calls(rng, n_calls, wall_ms, compute_ms) -> analysis.RoleSample:
    return analysis.RoleSample(
        rng.lognormal(np.log(wall_ms), 0.3, n_calls),
        np.zeros(n_calls, bool),
        rng.normal(0, 1, n_calls),
        np.zeros(n_calls, bool),
        compute_ms=rng.lognormal(np.log(compute_ms), 0.2, n_calls),
    )


def test_latency_compares_the_models_compute_time_per_call():
    """A shadow copy runs beside the next request, so its wall time can double while the model costs the
    same (the CI rollback of a good challenger): compute time decides. A model that costs 3x fails, and
    latency holds the step until each model made min_latency_calls calls."""
    rng = np.random.default_rng(3)
    cfg = AnalysisConfig(min_labels=100, min_latency_calls=30)

    def latency(champion, challenger):
        return analysis._latency(analysis.StepSample(champion, challenger), cfg, alpha=0.05 / 6)

    contended = latency(with_calls(rng, 40, 50, 10), with_calls(rng, 40, 110, 10))
    assert contended.verdict == "pass" and "compute time" in contended.test, contended
    assert "wall-clock p99" in contended.detail
    costly = latency(with_calls(rng, 40, 50, 10), with_calls(rng, 40, 50, 30))
    assert costly.verdict == "fail" and costly.challenger > 1.5 * costly.champion, costly
    few = latency(with_calls(rng, 8, 50, 10), with_calls(rng, 8, 110, 30))
    assert few.verdict == "inconclusive" and few.blocking and "needs 30 calls" in few.detail, few
    # no compute times logged (an older service): wall time per call decides
    old = with_calls(rng, 40, 110, 10)
    old.compute_ms = np.full(40, np.nan)
    wall = latency(with_calls(rng, 40, 10, 10), old)
    assert wall.verdict == "fail" and "wall time" in wall.test, wall


def test_too_few_requests_or_bake_time_hold_the_step():
    rng = np.random.default_rng(1)
    small = analysis.analyze_step(simulate(rng, n=100, paired=True), SHADOW, CFG)
    assert small.verdict == "inconclusive" and any("needs 300" in r for r in small.reasons)
    sample = simulate(rng, paired=True)
    sample.elapsed_seconds = 10
    baking = analysis.analyze_step(sample, Step("shadow", 0, "challenger", 300, bake_seconds=600), CFG)
    assert baking.verdict == "inconclusive" and "baking" in baking.reasons[0]


def test_state_machine_walks_the_steps_and_aborts_on_fail():
    plan = CanaryPlan(steps=(SHADOW, CANARY, Step("full", 100, "champion", 300, 0)), analysis=CFG, model_name="m")
    s = st.start(plan, "1", "2", actor="t")
    assert (s.step_name, s.weight, s.shadow) == ("shadow", 0, "challenger")
    s, action = st.after_verdict(s, plan, {"verdict": "inconclusive", "reasons": ["wait"]}, "t")
    assert action == "hold" and s.step_name == "shadow"
    s, action = st.after_verdict(s, plan, {"verdict": "pass"}, "t")
    assert (action, s.step_name, s.weight) == ("advance", "canary-10", 10)
    s2, action = st.after_verdict(s, plan, {"verdict": "fail", "reasons": ["latency"]}, "t")
    assert (action, s2.status, s2.weight) == ("rollback", st.ROLLED_BACK, 0) and "latency" in s2.reason
    s, _ = st.after_verdict(s, plan, {"verdict": "pass"}, "t")
    s, action = st.after_verdict(s, plan, {"verdict": "pass"}, "t")
    assert (action, s.status) == ("promote", st.PROMOTED)
    with pytest.raises(ValueError, match="not running"):
        st.after_verdict(s, plan, {"verdict": "pass"}, "t")


def test_routing_is_sticky_and_monotonic_in_weight():
    devices = [f"dev-{i}" for i in range(5000)]
    at10 = {d for d in devices if route(d, 10, "r1") == "challenger"}
    at50 = {d for d in devices if route(d, 50, "r1") == "challenger"}
    assert at10 <= at50 and 0.08 < len(at10) / 5000 < 0.12 and 0.45 < len(at50) / 5000 < 0.55
    assert all(route(d, 10, "r1") == route(d, 10, "r1") for d in devices[:100])
    assert {route(d, 0, "r1") for d in devices} == {"champion"}


# --------------------------------------------------------------------------- whole rollouts


@pytest.fixture(scope="module")
def canary_setup(settings):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    uri = settings.mlflow_tracking_uri
    name = "canary-e2e"
    versions = {
        "v1": register_model(uri, name, "good", seed=0),
        "v2": register_model(uri, name, "good", seed=1),
        "bad": register_model(uri, name, "bad", seed=2),
    }
    set_alias(uri, name, "champion", versions["v1"])
    from pipelines.settings import load_params

    params = copy.deepcopy(load_params())
    params["canary"]["model_name"] = name
    params["canary"]["experiment"] = "canary-tests"
    for step in params["canary"]["steps"]:
        step.update(min_requests=150, bake_minutes=0)
    params["canary"]["analysis"]["min_labels"] = 100
    return {"name": name, "uri": uri, "params": params, **versions}


def drive(svc: ServiceProcess, n: int, seed: int, per_request: int = 10) -> None:
    """Send n records (``per_request`` per request: latency is compared per call, and a step needs
    min_latency_calls of each model) from 200 simulated devices, then their ground-truth labels."""
    frame = traffic_frame(n, seed=seed)
    labels = []
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        for start in range(0, n, per_request):
            chunk = frame.iloc[start : start + per_request]
            rid = f"s{seed}-{start}"
            r = c.post("/score", json={"records": records_of(chunk), "request_id": rid})
            assert r.status_code == 200, r.text
            labels += [
                {"request_id": rid, "record_index": i, "is_anomaly": int(y)} for i, y in enumerate(chunk["is_anomaly"])
            ]
        assert c.post("/feedback", json={"labels": labels}).status_code == 200
    svc.flush()


def run_step(svc, setup, state, n, seed) -> dict:
    svc.wait_for(
        lambda s: (
            (s["rollout"] or {}).get("step_name") == state.step_name
            and (s["rollout"] or {}).get("rollout_id") == state.rollout_id
        ),
        what=f"step {state.step_name}",
    )
    drive(svc, n, seed)
    return controller.evaluate_step(actor="test-dag", params=setup["params"])


def test_good_challenger_goes_from_shadow_to_champion_and_bad_one_is_rolled_back(canary_setup, store):
    from mlflow import MlflowClient

    setup = canary_setup
    name, uri, params = setup["name"], setup["uri"], setup["params"]
    client = MlflowClient(uri, registry_uri=uri)
    set_alias(uri, name, "challenger", setup["v2"])
    traffic = {"shadow": 400, "canary-10": 2500, "canary-50": 700, "full": 400}
    with ServiceProcess(name) as svc:
        svc.wait_for(lambda s: s["models"]["challenger"] == setup["v2"], what="challenger loaded")
        state = controller.start_rollout(actor="test", reason="new model", params=params)
        actions = []
        for i, step in enumerate(["shadow", "canary-10", "canary-50", "full"]):
            result = run_step(svc, setup, state, traffic[step], seed=10 + i)
            actions.append(result["action"])
            assert result["action"] in ("advance", "promote"), (step, result["verdict"])
            state = st.read_state(store, name)
        assert actions == ["advance", "advance", "advance", "promote"]
        assert registry_aliases(client, name) == {"champion": setup["v2"], "previous": setup["v1"]}
        tags = client.get_model_version(name, setup["v2"]).tags
        assert tags["canary.status"] == "promoted" and tags["promoted.by"] == "test-dag"
        svc.wait_for(lambda s: s["models"]["champion"] == setup["v2"], what="new champion served")

        # a bad challenger (ranking inverted) is stopped at the first step that sees it: shadow
        set_alias(uri, name, "challenger", setup["bad"])
        svc.wait_for(lambda s: s["models"]["challenger"] == setup["bad"], what="bad challenger loaded")
        state = controller.start_rollout(actor="test", params=params)
        result = run_step(svc, setup, state, 400, seed=20)
        assert result["action"] == "rollback", result["verdict"]
        failed = {k for k, m in result["verdict"]["metrics"].items() if m["verdict"] == "fail"}
        assert failed & {"f1", "agreement", "score_shift", "flag_rate"}, result["verdict"]
        state = st.read_state(store, name)
        assert (state.status, state.weight) == (st.ROLLED_BACK, 0)
        tags = client.get_model_version(name, setup["bad"]).tags
        assert tags["canary.failed_step"] == "shadow" and "failed" in tags["canary.failed_reason"]
        assert registry_aliases(client, name) == {"champion": setup["v2"], "previous": setup["v1"]}
        svc.wait_for(lambda s: s["models"]["challenger"] is None, what="challenger unloaded")

    # manual rollback (no rollout running): champion <- previous, recorded with who and why
    assert controller.rollback(actor="oncall", reason="pager", params=params)["aliases"]["champion"] == setup["v1"]
    events = controller.history_events(params=params)
    kinds = [e["event"] for e in events if e["source"] == "canary-log"]
    for expected in (
        "rollout started",
        "advanced to canary-10",
        "promoted to champion",
        "rolled back",
        "champion rolled back to previous (manual)",
    ):
        assert expected in kinds, kinds
    assert any(e["source"] == "version-tags" and e["actor"] == "oncall" for e in events)
    assert all(e["actor"] for e in events if e["source"] == "canary-log")
    status = controller.status(params=params)
    assert status["state"]["status"] == "rolled_back" and "rolled_back" in status["note"]
    assert history.read_events(store)


def registry_aliases(client, name):
    return {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}
