"""Online scoring: each reading's features by gold's own definitions, scored by the champion.

Features are not re-implemented for the stream: `OnlineFeatures` keeps, per device, the tail of
recent silver rows that gold's windows can reach (the longer of `window` and `long_window`, and at
least the last reading, which the delta and the forward fill read) and calls
`pipelines.layers.gold.to_gold` on tail + new rows, keeping the new rows. The same function on the
same rows gives the same features as the batch gold job; they are then rounded through float32,
as gold stores them, so the champion sees exactly the values it would see reading gold.

Silver's rules come first (`to_silver` on the micro-batch): a reading silver would quarantine is
not scored and does not enter the tail, as it never enters gold.

The model per reading follows the canary's routing (`pipelines.serving.routing.route`, sticky per
device, salted by the rollout id) when a rollout is active; with a shadow the other model scores
the same reading too, recorded beside the served score (not alerted on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipelines.contracts import Contract
from pipelines.layers.gold import Window, to_gold, window_seconds
from pipelines.layers.silver import to_silver


@dataclass
class ScoredReading:
    device: str
    seq: int
    ts: pd.Timestamp
    score: float
    threshold: float
    model_version: str
    role: str  # champion | challenger
    shadow: dict[str, Any] | None = None  # {"role", "model_version", "score"} when shadowing

    @property
    def is_anomaly(self) -> bool:
        return self.score >= self.threshold


class OnlineFeatures:
    """Gold features for new silver rows, warmed up by each device's tail of earlier rows."""

    def __init__(self, contract: Contract, window: Window, long_window: Window):
        self.contract, self.window, self.long_window = contract, window, long_window
        self.device, self.ts = contract.entity.column, contract.event_time.column
        spans = [window_seconds(w) for w in (window, long_window)]
        self.span = pd.Timedelta(seconds=max(s for s in spans if s is not None)) if any(spans) else None
        self.rows = max([int(w) for w in (window, long_window) if not isinstance(w, str)] or [1])
        self.tail: pd.DataFrame | None = None  # silver rows, sorted by (device, ts)

    def features(self, silver: pd.DataFrame) -> pd.DataFrame:
        """Gold rows (to_gold's layout) for `silver`, in (device, ts) order."""
        if not len(silver):
            return silver.iloc[0:0]
        columns = [
            c
            for c in (
                self.device,
                self.ts,
                *self.contract.numeric_columns,
                *self.contract.bool_columns,
                "label",
                "event_date",
            )
            if c in silver
        ]
        new = silver[columns].assign(_new=True)
        devices = new[self.device].unique()
        tail = self.tail
        if tail is not None and len(tail):
            own = tail[tail[self.device].isin(devices)]
            frame = pd.concat([own.assign(_new=False), new], ignore_index=True)
        else:
            frame = new.reset_index(drop=True)
        frame = frame.sort_values([self.device, self.ts], kind="stable").reset_index(drop=True)
        # Every row is passed as silver (none as warm-up): to_gold's warm-up keeps only rows before
        # the *batch's* earliest time, and a micro-batch spans devices whose clocks differ.
        gold = to_gold(frame.drop(columns="_new"), self.contract, self.window, long_window=self.long_window)
        is_new = frame["_new"].to_numpy()
        self._keep_tail(frame.drop(columns="_new"), devices)
        return gold[is_new].reset_index(drop=True)

    def warm_up(self, silver: pd.DataFrame) -> None:
        """Start from rows already seen (e.g. read back from bronze after a restart)."""
        if not len(silver):
            return
        columns = [
            c
            for c in (
                self.device,
                self.ts,
                *self.contract.numeric_columns,
                *self.contract.bool_columns,
                "label",
                "event_date",
            )
            if c in silver
        ]
        frame = silver[columns].sort_values([self.device, self.ts], kind="stable").reset_index(drop=True)
        self._keep_tail(frame, frame[self.device].unique())

    def _keep_tail(self, frame: pd.DataFrame, devices) -> None:
        """Each device's rows that a later reading's windows can still reach."""
        last = frame.groupby(self.device, sort=False)[self.ts].transform("max")
        keep = np.zeros(len(frame), dtype=bool)
        if self.span is not None:
            keep |= (frame[self.ts] > last - self.span - pd.Timedelta(seconds=1)).to_numpy()
        position = frame.groupby(self.device, sort=False).cumcount(ascending=False).to_numpy()
        keep |= position < self.rows  # count windows, and always the device's last reading
        kept = frame[keep]
        if self.tail is not None and len(self.tail):
            others = self.tail[~self.tail[self.device].isin(devices)]
            kept = pd.concat([others, kept], ignore_index=True).sort_values([self.device, self.ts], kind="stable")
        self.tail = kept.reset_index(drop=True)


class ModelLike(Protocol):
    version: str
    columns: list[str]
    threshold: float
    estimator: Any


class ModelSource(Protocol):
    """What the scorer needs of `pipelines.serving.models.ModelManager` (or a fixed model in tests)."""

    def get(self, role: str) -> ModelLike | None: ...


class FixedModels:
    """A ModelSource with a champion (and optionally a challenger) that never change."""

    def __init__(self, champion: ModelLike, challenger: ModelLike | None = None, rollout: Any = None):
        self.models = {"champion": champion, "challenger": challenger}
        self.rollout = rollout

    def get(self, role: str) -> ModelLike | None:
        return self.models.get(role)


def predict(model: ModelLike, gold: pd.DataFrame) -> np.ndarray:
    """The model's score for gold rows: its input columns, as float32 rounds them in gold storage."""
    matrix = gold.reindex(columns=model.columns).to_numpy(dtype="float64")
    matrix = matrix.astype("float32").astype("float64")
    return np.asarray(model.estimator.predict(pd.DataFrame(matrix, columns=model.columns)), dtype="float64").ravel()


@dataclass
class ScorerStats:
    batches: int = 0
    readings: int = 0
    silver_rejected: int = 0
    silver_seconds: float = 0.0
    feature_seconds: float = 0.0
    model_seconds: float = 0.0
    last_error: str = ""
    unscored_no_model: int = 0
    rejected_rules: dict[str, int] = field(default_factory=dict)


class OnlineScorer:
    def __init__(
        self, contract: Contract, window: Window, long_window: Window, models: ModelSource, model_name: str = ""
    ):
        self.contract = contract
        self.features = OnlineFeatures(contract, window, long_window)
        self.models = models
        self.model_name = model_name
        self.stats = ScorerStats()

    def score_bronze(self, bronze) -> list[ScoredReading]:
        """Score a micro-batch given as a bronze table (`messages.bronze_table`)."""
        started = time.perf_counter()
        silver, quarantine = to_silver(bronze, self.contract)
        self.stats.silver_seconds += time.perf_counter() - started
        self.stats.silver_rejected += len(quarantine)
        for rule in quarantine["rule"] if len(quarantine) else ():
            self.stats.rejected_rules[rule] = self.stats.rejected_rules.get(rule, 0) + 1
        return self.score_silver(silver)

    def score_silver(self, silver: pd.DataFrame) -> list[ScoredReading]:
        if not len(silver):
            return []
        device, ts = self.contract.entity.column, self.contract.event_time.column
        started = time.perf_counter()
        gold = self.features.features(silver)
        self.stats.feature_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.readings += len(gold)
        champion = self.models.get("champion")
        if champion is None:
            self.stats.unscored_no_model += len(gold)
            return []
        # seq of each gold row: silver keeps it as _source_line; (device, ts) is silver's key.
        seqs = silver.set_index([device, ts])["_source_line"] if "_source_line" in silver else None
        keys = pd.MultiIndex.from_arrays([gold["device"], gold["ts"]])
        seq_values = seqs[~seqs.index.duplicated(keep="last")].reindex(keys).to_numpy() if seqs is not None else None

        started = time.perf_counter()
        roles = self._roles(gold["device"].tolist())
        scores = np.full(len(gold), np.nan)
        versions: list[str] = [""] * len(gold)
        thresholds = np.full(len(gold), np.inf)
        used: dict[str, Any] = {}
        for role in ("champion", "challenger"):
            mask = roles == role
            model = self.models.get(role) if mask.any() else None
            if model is None and role == "challenger" and mask.any():
                model, mask = champion, mask  # challenger gone mid-rollout: the champion serves
            if model is None or not mask.any():
                continue
            scores[mask] = predict(model, gold[mask])
            thresholds[mask] = model.threshold
            for i in np.flatnonzero(mask):
                versions[i] = str(model.version)
            used[role] = model
        shadow = self._shadow(gold, roles)
        self.stats.model_seconds += time.perf_counter() - started
        out = []
        for i in range(len(gold)):
            seq = seq_values[i] if seq_values is not None else -1
            out.append(
                ScoredReading(
                    device=gold["device"].iat[i],
                    seq=int(seq) if seq == seq and seq is not None else -1,
                    ts=gold["ts"].iat[i],
                    score=float(scores[i]),
                    threshold=float(thresholds[i]),
                    model_version=versions[i],
                    role=str(roles[i]),
                    shadow=shadow[i] if shadow else None,
                )
            )
        return out

    def _rollout(self):
        rollout = getattr(self.models, "rollout", None)
        if rollout is None or not getattr(rollout, "active", False):
            return None
        if self.model_name and getattr(rollout, "model_name", self.model_name) != self.model_name:
            return None
        return rollout

    def _roles(self, devices: list[str]) -> np.ndarray:
        from pipelines.serving.routing import route

        rollout = self._rollout()
        if rollout is None or not rollout.weight or self.models.get("challenger") is None:
            return np.array(["champion"] * len(devices), dtype=object)
        return np.array([route(d, rollout.weight, rollout.rollout_id) for d in devices], dtype=object)

    def _shadow(self, gold: pd.DataFrame, roles: np.ndarray) -> list[dict | None] | None:
        """With a shadow, the other model scores the same readings (the canary compares models on
        the same records): `challenger` shadows the champion's readings, `champion` the challenger's."""
        rollout = self._rollout()
        if rollout is None or rollout.shadow not in ("challenger", "champion"):
            return None
        other = {"challenger": "champion", "champion": "challenger"}
        model = self.models.get(rollout.shadow)
        mask = roles == other[rollout.shadow]
        if model is None or not mask.any():
            return None
        out: list[dict | None] = [None] * len(gold)
        for i, score in zip(np.flatnonzero(mask), predict(model, gold[mask]), strict=True):
            out[i] = {"role": rollout.shadow, "model_version": str(model.version), "score": float(score)}
        return out
