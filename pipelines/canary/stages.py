"""Canary steps and analysis thresholds as data (Argo Rollouts / Flagger style), from params ``canary``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHADOW_ROLES = ("none", "challenger", "champion")


@dataclass(frozen=True)
class Step:
    """One step: the challenger's traffic weight (percent of devices), who shadows whom, how long to bake.

    ``shadow: challenger`` - the challenger scores a copy of every request, only the champion answers.
    ``shadow: champion``   - the champion scores a copy of every record the challenger answers, so the
                             analysis compares both models on the same records (at 10% the two groups
                             of devices differ more than two good models do; see ``analysis``).
    """

    name: str
    weight: int
    shadow: str = "none"
    min_requests: int = 500
    bake_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 100:
            raise ValueError(f"canary step {self.name!r}: weight {self.weight} must be within 0..100")
        if self.shadow not in SHADOW_ROLES:
            raise ValueError(f"canary step {self.name!r}: shadow {self.shadow!r} must be one of {SHADOW_ROLES}")
        if self.weight == 0 and self.shadow != "challenger":
            raise ValueError(f"canary step {self.name!r}: weight 0 sends the challenger nothing; use shadow")


@dataclass(frozen=True)
class AnalysisConfig:
    """Thresholds of the step analysis. ``alpha`` is family-wise: each of the k tests runs at alpha / k."""

    alpha: float = 0.05
    max_error_rate_increase: float = 0.01  # absolute, challenger minus champion
    max_p99_ratio: float = 1.5  # challenger p99 / champion p99
    min_p99_increase_ms: float = 5.0  # below this a latency difference is noise, whatever the test says
    min_latency_calls: int = 30  # model calls of each model before latency is compared (holds the step)
    psi_fail: float = 0.25  # population stability index of challenger scores vs champion scores
    psi_bins: int = 10
    min_score_rank_correlation: float = 0.5  # paired steps: Spearman's rho of the two models' scores
    min_agreement: float = 0.85  # share of paired records flagged the same way
    max_flag_rate_diff: float = 0.05  # absolute difference of the share of records flagged anomalous
    min_labels: int = 200  # labelled records per model before F1 is compared
    f1_margin: float = 0.02  # challenger F1 may be at most this much lower
    require_labels: bool = False  # true: too few labels holds the step (Inconclusive)
    # classifiers (an image model's rollout, ``pipelines.canary.images``)
    min_class_kappa: float = 0.3  # Cohen's kappa of the two models' classes on the same photos
    max_confidence_shift: float = 0.1  # absolute change of the mean top-1 confidence
    accuracy_margin: float = 0.02  # challenger accuracy on labelled photos may be at most this much lower
    bootstrap: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class CanaryPlan:
    steps: tuple[Step, ...]
    analysis: AnalysisConfig
    model_name: str
    experiment: str = "iot-canary"
    extra: dict[str, Any] = field(default_factory=dict)


DEFAULT_STEPS = (
    Step("shadow", 0, "challenger"),
    Step("canary-10", 10, "champion"),
    Step("canary-50", 50, "champion"),
    Step("full", 100, "champion"),
)


def load_plan(params: dict) -> CanaryPlan:
    """The plan from the whole params.yaml mapping (sections ``canary`` and ``registry``)."""
    cfg = params.get("canary", {}) or {}
    steps = []
    for raw in cfg.get("steps") or []:
        raw = dict(raw)
        if "bake_minutes" in raw:
            raw["bake_seconds"] = float(raw.pop("bake_minutes")) * 60.0
        steps.append(Step(**raw))
    known = set(AnalysisConfig.__dataclass_fields__)
    analysis_raw = cfg.get("analysis", {}) or {}
    unknown = sorted(set(analysis_raw) - known)
    if unknown:
        raise ValueError(f"params.yaml canary.analysis has unknown keys {unknown}; known: {sorted(known)}")
    model_name = cfg.get("model_name") or params.get("registry", {}).get("model_name", "iot-anomaly-detector")
    return CanaryPlan(
        steps=tuple(steps) or DEFAULT_STEPS,
        analysis=AnalysisConfig(**analysis_raw),
        model_name=model_name,
        experiment=cfg.get("experiment", "iot-canary"),
    )
