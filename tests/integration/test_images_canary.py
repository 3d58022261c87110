"""The canary judges an image classifier's rollout: real POST /classify traffic through the scoring
service app (champion, challenger, shadow copies, the prediction log in the lake), evaluated by the one
controller and analysis. An equally good retrain goes from shadow to champion; a model that answers one
class whatever the photo is rolled back at the shadow step, for its class agreement."""

from __future__ import annotations

import copy
import io
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipelines.canary import analysis, controller, history
from pipelines.canary import state as st
from pipelines.canary.images import build_image_sample
from pipelines.canary.stages import AnalysisConfig, Step
from pipelines.images import generator
from pipelines.images.contract import load_image_contract
from pipelines.images.decode import decode_image

NAME = "fruit-canary-classifier"  # its own registered model: test_images.py's aliases stay untouched
DATASET = "fruit_photos"
CLASSES = list(generator.CLASSES)


def jpeg(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def photos(seed: int, per_class: int, size: int) -> tuple[list[bytes], np.ndarray]:
    files = [jpeg(generator.fruit_image(c, i, size=size, seed=seed)) for c in CLASSES for i in range(per_class)]
    return files, np.repeat(CLASSES, per_class)


def fit_classifier(seed: int):
    """The model family of pipelines.images.model (IncrementalPCA -> scaler -> logistic regression on the
    contract's 32x32 RGB pixels, decoded by silver's function), on 360 generated photos of its own."""
    from sklearn.decomposition import IncrementalPCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    contract = load_image_contract(DATASET)
    files, y = photos(seed, 30, 40)
    x = np.stack(
        [np.frombuffer(decode_image(f, contract.width, contract.height).pixels, np.uint8) for f in files]
    ).astype(np.float32)
    return Pipeline(
        [
            ("pca", IncrementalPCA(n_components=30, batch_size=60)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=500, random_state=seed)),
        ]
    ).fit(x, y)


def one_class(model, label: str):
    """The same pipeline with its classifier broken: every photo gets ``label`` (p ~ 0.83)."""
    broken = copy.deepcopy(model)
    clf = broken.named_steps["clf"]
    clf.coef_[:] = 0.0
    clf.intercept_[:] = np.where(clf.classes_ == label, 4.0, 0.0)
    return broken


def register(model, tracking_uri: str, note: str) -> str:
    """Logged as train_and_log_images logs a classifier (skops, the contract's signature) and registered
    by register_image_version (which tags it model_kind=classifier)."""
    import mlflow.sklearn

    import mlflow
    from pipelines.images import model as image_model
    from pipelines.training import SKOPS_TRUSTED_TYPES

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("image-canary-tests")
    with mlflow.start_run(run_name=note) as run:
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=image_model._signature(load_image_contract(DATASET)),
            serialization_format="skops",
            skops_trusted_types=SKOPS_TRUSTED_TYPES,
            pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
        )
    result = image_model.ImageTrainResult(
        run_id=run.info.run_id,
        model_uri=info.model_uri,
        model_id=getattr(info, "model_id", None),
        dataset=DATASET,
        model_name=NAME,
        metrics={"accuracy": float("nan")},
        baseline_metrics={"accuracy": float("nan")},
        partitions=[],
        snapshot={},
    )
    return image_model.register_image_version(result, tracking_uri=tracking_uri)


@pytest.fixture(scope="module")
def classifiers(settings):
    uri = settings.mlflow_tracking_uri
    first = fit_classifier(seed=1)
    versions = {
        "v1": register(first, uri, "good-1"),
        "v2": register(fit_classifier(seed=2), uri, "good-2"),  # a retrain on other photos: equally good
        "broken": register(one_class(first, "banana"), uri, "always-banana"),
    }
    from mlflow import MlflowClient

    MlflowClient(uri, registry_uri=uri).set_registered_model_alias(NAME, "champion", versions["v1"])
    return versions


def test_image_sample_pairs_the_same_photos_and_judges_accuracy_where_labelled():
    """Pure: shadow pairs join on request and photo; a rejected upload is nobody's error, a failed call
    is the model's; labels (when someone records them) make accuracy decide."""
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    state = st.RolloutState(status=st.RUNNING, rollout_id="r1", step_name="shadow", step_started_at=t0.isoformat())
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(300):
        truth = CLASSES[i % len(CLASSES)]
        champion_says = truth if rng.random() < 0.9 else CLASSES[(i + 1) % len(CLASSES)]
        challenger_says = truth if rng.random() < 0.6 else CLASSES[(i + 2) % len(CLASSES)]  # worse
        base = {"request_id": f"q{i}", "content_sha256": f"h{i}", "rollout_id": "r1", "step": "shadow"}
        base.update(ts=pd.Timestamp(t0 + timedelta(seconds=i)), latency_ms=3.0, compute_ms=1.0, error=None)
        rows.append({**base, "role": "champion", "served": True, "label": champion_says, "confidence": 0.8})
        rows.append({**base, "role": "challenger", "served": False, "label": challenger_says, "confidence": 0.7})
        labels.append({"request_id": f"q{i}", "label": truth, "ts": base["ts"]})
    bad = {**rows[0], "request_id": "x", "content_sha256": "hx", "label": None, "confidence": None, "compute_ms": None}
    rows.append({**bad, "error": "rejected:not_an_image:...:..."})  # the upload's fault: not counted
    rows.append({**bad, "request_id": "y", "role": "challenger", "error": "ValueError: boom"})  # the model's
    log = pd.DataFrame(rows)
    sample = build_image_sample(log, pd.DataFrame(labels), state, now=t0 + timedelta(hours=1))
    assert sample.kind == analysis.CLASSIFIER and sample.paired.n == 300
    assert sample.champion.n == 300 and sample.challenger.n == 301 and sample.challenger.error.sum() == 1
    assert len(sample.champion.labels) == 300 and (sample.paired.labelled()).all()

    step = Step("shadow", 0, "challenger", min_requests=100, bake_seconds=0)
    cfg = AnalysisConfig(min_labels=100)
    verdict = analysis.analyze_step(sample, step, cfg)
    acc = verdict.metrics["accuracy"]
    assert verdict.verdict == "fail" and acc.verdict == "fail", verdict.summary()
    assert acc.champion == pytest.approx(0.9, abs=0.05) and acc.challenger == pytest.approx(0.6, abs=0.07)
    assert any(r.startswith("accuracy failed") for r in verdict.reasons)
    # without labels accuracy is unmeasured and does not hold the step
    unlabelled = analysis.analyze_step(build_image_sample(log, pd.DataFrame(), state), step, cfg)
    assert unlabelled.metrics["accuracy"].verdict == "inconclusive"
    assert not unlabelled.metrics["accuracy"].blocking and "unmeasured" in unlabelled.metrics["accuracy"].detail


def drive(http, images, files: list[bytes], start: int, total: int, challenger: int = 0) -> Counter:
    """POST /classify until ``total`` answers, ``challenger`` of them by the challenger (150 phones, sticky),
    then wait for the shadow copies and write the prediction log."""
    roles: Counter = Counter()
    i = start
    while sum(roles.values()) < total or roles["challenger"] < challenger:
        r = http.post(
            "/classify",
            content=files[i % len(files)],
            headers={"content-type": "image/jpeg", "x-client-id": f"phone-{i % 150}"},
        )
        assert r.status_code == 200, r.text
        roles[r.json()["role"]] += 1
        i += 1
        assert i - start < 3000, roles
    http.portal.call(images.flush)
    return roles


def test_good_image_challenger_is_promoted_and_a_one_class_challenger_rolled_back(
    classifiers, settings, store, monkeypatch
):
    from starlette.testclient import TestClient

    from mlflow import MlflowClient
    from pipelines.serving.app import create_app
    from pipelines.serving.config import serving_settings
    from pipelines.settings import load_params

    uri = settings.mlflow_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    params = copy.deepcopy(load_params())
    params["canary"]["model_name"] = NAME
    params["canary"]["experiment"] = "image-canary-tests"
    for step in params["canary"]["steps"]:
        step.update(min_requests=40, bake_minutes=0)
    client.set_registered_model_alias(NAME, "challenger", classifiers["v2"])
    assert client.get_model_version(NAME, classifiers["v2"]).tags["model_kind"] == "classifier"

    monkeypatch.setenv("PLATFORM_SERVING_IMAGE_MODEL", NAME)
    cfg = serving_settings(load_params(settings.params_file))
    cfg.poll_seconds = 3600  # the test reloads aliases and rollout state itself, at each step
    files, _ = photos(seed=9, per_class=10, size=64)  # photos neither model saw
    quiet = lambda _: None  # noqa: E731
    with TestClient(create_app(settings, cfg, store)) as http:
        images = http.app.state.images
        state = controller.start_rollout(actor="test", reason="retrained on new photos", params=params)
        plan = {"shadow": (40, 0), "canary-10": (40, 40), "canary-50": (40, 40), "full": (40, 40)}
        results, sent = {}, 0
        for step, (total, by_challenger) in plan.items():
            images.manager.poll_once()
            assert (images.manager.rollout.step_name, images.manager.get("challenger").version) == (
                step,
                classifiers["v2"],
            )
            if step == "shadow":  # not a photo: refused (422) and counted as no model's error
                refused = http.post("/classify", content=b"notes", headers={"content-type": "image/jpeg"})
                assert refused.status_code == 422
            sent += sum(drive(http, images, files, sent, total, by_challenger).values())
            results[step] = controller.evaluate_step(actor="test-dag", params=params, progress=quiet)
        actions = [r["action"] for r in results.values()]
        assert actions == ["advance", "advance", "advance", "promote"], {
            k: r["verdict"]["reasons"] for k, r in results.items()
        }
        shadow = results["shadow"]["verdict"]
        assert shadow["kind"] == "classifier"
        assert set(shadow["metrics"]) == {"error_rate", "latency_p99", "confidence_shift", "agreement", "accuracy"}
        agreement = shadow["metrics"]["agreement"]
        # two equally good retrains agree on about half the photos: kappa, not raw agreement, decides
        assert agreement["verdict"] == "pass" and agreement["n_challenger"] >= 40 and agreement["statistic"] > 0.3
        assert shadow["metrics"]["error_rate"]["champion"] == 0.0
        assert "compute time" in shadow["metrics"]["latency_p99"]["test"]
        assert shadow["metrics"]["accuracy"]["verdict"] == "inconclusive"  # /classify records no labels
        canary10 = results["canary-10"]["verdict"]["metrics"]
        assert canary10["agreement"]["n_challenger"] >= 40 and "Wilcoxon" in canary10["confidence_shift"]["test"]
        for step, r in results.items():
            m = r["verdict"]["metrics"]
            print(
                f"good retrain at {step}: kappa {m['agreement']['statistic']:.3f} (classes agree on "
                f"{m['agreement']['challenger']:.1%} of {m['agreement']['n_challenger']} photos), mean confidence "
                f"{m['confidence_shift']['champion']:.3f} -> {m['confidence_shift']['challenger']:.3f}"
            )
        aliases = {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}
        assert aliases == {"champion": classifiers["v2"], "previous": classifiers["v1"]}
        assert client.get_model_version(NAME, classifiers["v2"]).tags["canary.status"] == "promoted"
        run = client.get_run(st.read_state(store, NAME).mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.tags["model_kind"] == "classifier"
        assert "agreement.statistic" in run.data.metrics

        # a challenger that answers "banana" to every photo: stopped at the shadow step
        client.set_registered_model_alias(NAME, "challenger", classifiers["broken"])
        images.manager.poll_once()
        state = controller.start_rollout(actor="test", reason="a broken build", params=params)
        images.manager.poll_once()
        assert images.manager.get("challenger").version == classifiers["broken"]
        drive(http, images, files, sent, 60)
        result = controller.evaluate_step(actor="test-dag", params=params, progress=quiet)
        assert result["action"] == "rollback", result["verdict"]
        agreement = result["verdict"]["metrics"]["agreement"]
        assert agreement["verdict"] == "fail" and abs(agreement["statistic"]) < 0.1, agreement
        print(f"one-class challenger: {result['verdict']['reasons']}")
        state = st.read_state(store, NAME)
        assert (state.status, state.weight) == (st.ROLLED_BACK, 0) and "agreement failed" in state.reason
        tags = client.get_model_version(NAME, classifiers["broken"]).tags
        assert tags["canary.failed_step"] == "shadow" and "agreement failed" in tags["canary.failed_reason"]
        assert "challenger" not in client.get_registered_model(NAME).aliases
        assert client.get_run(state.mlflow_run_id).info.status == "FAILED"
        images.manager.poll_once()
        r = http.post("/classify", content=files[0], headers={"content-type": "image/jpeg", "x-client-id": "phone-1"})
        assert (r.json()["role"], r.json()["model_version"]) == ("champion", classifiers["v2"])
        assert images.manager.get("challenger") is None

    events = [e for e in history.read_events(store) if e.get("model_name") == NAME]
    kinds = [e["event"] for e in events]
    for expected in ("rollout started", "advanced to canary-10", "promoted to champion", "rolled back"):
        assert expected in kinds, kinds
    assert controller.status(params=params)["state"]["status"] == "rolled_back"
