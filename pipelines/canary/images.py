"""An image classifier's rollout as the canary sees it: /classify's prediction log in, the analysis's samples out.

The controller judges every rollout with one state machine and ``analysis.analyze_step``; this module is
what differs for a classifier: which registry versions are classifiers, how the step's traffic is read
(``image_predictions/date=<d>/``, one row per photo and model call) and how it becomes a
``StepSample`` of kind ``classifier`` (classes and top-1 confidences, shadow pairs joined on the same
request and photo), and how ``platform canary --dataset <image dataset>`` finds its model.

A version is a classifier when its registry tags say so: ``model_kind=classifier``, set by
``pipelines.images.model.register_image_version`` (versions registered before that tag carry the
image ``model_family`` tag, which counts too). The kind travels with the version, whatever name it is
registered under (the contract's ``model_name``, ``canary.model_name``) and whichever process asks (the
DAG's worker does not have the scoring service's ``PLATFORM_SERVING_IMAGE_MODEL``).
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from pipelines.canary import analysis
from pipelines.canary import state as st

MODEL_KIND_TAG = "model_kind"
# an upload that is not a usable image is refused before any model sees it (422): the client's error,
# whichever model its key routed to, so it counts for neither model's error rate
REJECTED = "rejected:"


def model_kind(tags: dict[str, str]) -> str:
    """``analysis.CLASSIFIER`` or ``analysis.ANOMALY`` from a model version's tags."""
    from pipelines.images.model import MODEL_FAMILY

    if tags.get(MODEL_KIND_TAG) == analysis.CLASSIFIER or tags.get("model_family") == MODEL_FAMILY:
        return analysis.CLASSIFIER
    return analysis.ANOMALY


def rollout_kind(client, state: st.RolloutState) -> str:
    """The kind of both versions of a rollout; a champion and a challenger of different kinds cannot be
    compared (their logs and predictions differ), so that is an error naming both."""
    from mlflow.exceptions import MlflowException

    kinds = {}
    for role, version in (("challenger", state.challenger_version), ("champion", state.champion_version)):
        try:
            kinds[role] = model_kind(dict(client.get_model_version(state.model_name, version).tags or {}))
        except MlflowException as exc:
            if role == "challenger" or getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            kinds[role] = kinds["challenger"]  # a deleted champion version: the challenger's kind decides
    if kinds["champion"] != kinds["challenger"]:
        raise ValueError(
            f"{state.model_name}: champion v{state.champion_version} is {kinds['champion']} but challenger "
            f"v{state.challenger_version} is {kinds['challenger']}; the canary compares models of one kind: "
            "roll this rollout back (platform canary rollback) and register a challenger of the champion's kind"
        )
    return kinds["challenger"]


# --------------------------------------------------------------------------- the sample (pure)


def _class_codes(*columns: pd.Series) -> dict[str, int]:
    names = sorted({str(v) for col in columns for v in col.dropna()})
    return {name: i for i, name in enumerate(names)}


def build_image_sample(
    predictions: pd.DataFrame, labels: pd.DataFrame, state: st.RolloutState, now: datetime | None = None
) -> analysis.StepSample:
    """The step's traffic from ``image_predictions`` rows (pure: frames in, arrays out).

    ``labels``: ``request_id``, ``label`` (the photo's true class) and ``ts``, the latest per request
    winning; empty when nobody labelled the photos (accuracy is then unmeasured). A shadow pair is the
    champion's and the challenger's answer to the same request with the same photo (content hash)."""
    now = now or datetime.now(UTC)
    p, started = st.rows_of_step(predictions, state)
    p = p[~p["error"].fillna("").str.startswith(REJECTED)]
    truth = pd.DataFrame(columns=["request_id", "true_label"])
    if len(labels):
        truth = labels.sort_values("ts").drop_duplicates("request_id", keep="last")
        truth = truth[["request_id", "label"]].rename(columns={"label": "true_label"})
    codes = _class_codes(p["label"], truth["true_label"])

    def code(values: pd.Series) -> np.ndarray:
        return values.map(lambda v: codes.get(str(v), -1) if pd.notna(v) else -1).to_numpy(dtype=int)

    def role_sample(role: str) -> tuple[analysis.RoleSample, pd.DataFrame]:
        rows = p[p["role"] == role]
        # a client may reuse a request id: one answer per request, photo and role
        ok = rows[rows["error"].isna()].drop_duplicates(["request_id", "content_sha256"])
        lab = ok.merge(truth, on="request_id", how="inner")
        return analysis.RoleSample(
            latency_ms=rows["latency_ms"].to_numpy(dtype=float),  # one row = one model call
            compute_ms=rows["compute_ms"].to_numpy(dtype=float),  # null for a failed call
            error=rows["error"].notna().to_numpy(),
            score=ok["confidence"].to_numpy(dtype=float),
            flagged=np.zeros(0, dtype=bool),
            labels=code(lab["true_label"]),
            labelled_classes=code(lab["label"]),
        ), ok

    champion, champ_ok = role_sample("champion")
    challenger, chal_ok = role_sample("challenger")
    both = champ_ok.merge(chal_ok, on=["request_id", "content_sha256"], suffixes=("_a", "_b"))
    both = both.merge(truth, on="request_id", how="left")
    paired = None
    if len(both):
        paired = analysis.PairedSample(
            champion_score=both["confidence_a"].to_numpy(dtype=float),
            challenger_score=both["confidence_b"].to_numpy(dtype=float),
            labels=code(both["true_label"]),
            champion_class=code(both["label_a"]),
            challenger_class=code(both["label_b"]),
        )
    return analysis.StepSample(
        champion,
        challenger,
        elapsed_seconds=(now - started.to_pydatetime()).total_seconds(),
        paired=paired,
        kind=analysis.CLASSIFIER,
    )


# --------------------------------------------------------------------------- I/O


def read_image_step_traffic(store, state: st.RolloutState) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(image_predictions rows since the step started, feedback labels). /classify records no feedback
    labels yet, so the second frame is empty and accuracy is unmeasured."""
    from pipelines.images.serving import read_image_predictions

    since = datetime.fromisoformat(state.step_started_at)
    return read_image_predictions(store, since), pd.DataFrame(columns=["request_id", "label", "ts"])


def image_dataset_params(name: str, params: dict) -> dict | None:
    """params.yaml as an image dataset's canary sees it (``registry.model_name`` its contract's
    registered classifier), or None when ``name`` is no image dataset."""
    from pipelines.images.contract import image_contract_files, load_image_contract

    if name not in image_contract_files():
        return None
    model_name = load_image_contract(name).registered_model
    merged = copy.deepcopy(params)
    merged.setdefault("registry", {})["model_name"] = model_name
    merged["dataset"] = {"name": name, "grain": "image", "model_name": model_name}
    return merged
