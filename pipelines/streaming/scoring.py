"""Online scoring: each reading's features by gold's definitions, scored by the champion.

Features come from `pipelines.streaming.features.StreamFeatures`: per device, the readings its
windows hold and the running state of those windows, computed for a whole pass in numpy (a sorted
list for the long window's median), instead of a `to_gold` pass over every device's 4 h tail.
It computes what `to_gold` computes (tests/unit/test_stream_features.py replays simulator and NAB
data through both); the features are then rounded through float32, as gold stores them, so the
champion sees the values it would see reading gold.

Silver's rules come first (`SilverGate`: silver's own typing and rules; `to_silver` itself for a
batch with anything to quarantine): a reading silver would quarantine is not scored and does not
enter the windows, as it never enters gold.

The model per reading follows the canary's routing (`pipelines.serving.routing.route`, sticky per
device, salted by the rollout id) when a rollout is active; with a shadow the other model scores
the same reading too, recorded beside the served score (not alerted on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines.contracts import Contract
from pipelines.layers.bronze import PARSE_ERROR_COLUMN
from pipelines.layers.gold import Window
from pipelines.layers.silver import SILVER_LINEAGE, silver_rules, to_silver, type_bronze
from pipelines.streaming.features import StreamFeatures

log = logging.getLogger("pipelines.streaming")


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
    """Gold features for new silver rows from per-device running state (`StreamFeatures`)."""

    def __init__(self, contract: Contract, window: Window, long_window: Window):
        self.contract, self.window, self.long_window = contract, window, long_window
        self.state = StreamFeatures(contract, window, long_window)

    def features(self, silver: pd.DataFrame) -> pd.DataFrame:
        """device, ts and gold's features (to_gold's names and order) for `silver`, row i for its row i."""
        return self.state.features(silver)

    def warm_up(self, silver: pd.DataFrame) -> None:
        """Start from rows already seen (e.g. read back from bronze after a restart)."""
        self.state.warm_up(silver)


class SilverGate:
    """Silver's verdict on a micro-batch: `to_silver`'s own typing and rules, without its quarantine
    bookkeeping when every row passes (the stream's usual batch).

    A clean batch is typed by silver's `type_bronze` and checked against `silver_rules`; if every row
    parses, breaks no rule and no (device, ts) repeats, those typed rows are exactly what `to_silver`
    returns (the test checks it). Anything else (a malformed line, a type error, a broken rule, a
    repeated key) goes through `to_silver` itself, which quarantines with its rule and reason."""

    def __init__(self, contract: Contract):
        self.contract = contract
        self.keys = list(contract.keys)
        self.columns = [*contract.silver_columns, *SILVER_LINEAGE]
        self.full_batches = 0  # batches that needed to_silver's full path
        self._no_quarantine: dict[tuple[str, ...], pd.DataFrame] = {}

    def split(self, bronze: pa.Table | pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        if not isinstance(bronze, pa.Table):
            bronze = bronze.reset_index(drop=True)
        clean = self._clean(bronze)
        if clean is None:
            self.full_batches += 1
            return to_silver(bronze, self.contract)
        return clean, self._empty_quarantine(bronze)

    def _clean(self, bronze: pa.Table | pd.DataFrame) -> pd.DataFrame | None:
        rows = bronze.num_rows if isinstance(bronze, pa.Table) else len(bronze)
        names = bronze.column_names if isinstance(bronze, pa.Table) else list(bronze.columns)
        if not rows:
            return None
        if PARSE_ERROR_COLUMN in names:
            errors = bronze.column(PARSE_ERROR_COLUMN) if isinstance(bronze, pa.Table) else bronze[PARSE_ERROR_COLUMN]
            if (errors.null_count != rows) if isinstance(bronze, pa.Table) else errors.notna().any():
                return None
        typed, type_errors = type_bronze(bronze, self.contract)
        if type_errors:
            return None
        columns = _Columns(typed)  # each column taken out of the frame once, not once per rule
        for rule in silver_rules(self.contract):
            if rule.test(columns).any():
                return None
        # Sorted by key, and no key twice (a repeated key is to_silver's to settle).
        device, ts = self.keys
        codes, _ = pd.factorize(typed[device], sort=True)
        stamps = typed[ts].to_numpy(dtype="datetime64[us]").view("int64")
        order = np.lexsort((stamps, codes))
        if (
            len(order) > 1
            and ((codes[order][1:] == codes[order][:-1]) & (stamps[order][1:] == stamps[order][:-1])).any()
        ):
            return None
        silver = typed[self.columns].take(order).reset_index(drop=True)
        silver.attrs["collapsed_duplicates"] = 0
        return silver

    def _empty_quarantine(self, bronze: pa.Table | pd.DataFrame) -> pd.DataFrame:
        """The quarantine of a batch with nothing to quarantine: its columns, no rows (one per schema)."""
        names = tuple(bronze.column_names if isinstance(bronze, pa.Table) else bronze.columns)
        empty = self._no_quarantine.get(names)
        if empty is None:
            head = bronze.slice(0, 0).to_pandas() if isinstance(bronze, pa.Table) else bronze.iloc[0:0]
            empty = self._no_quarantine[names] = head.assign(rule=pd.Series(dtype="str"), reason=pd.Series(dtype="str"))
        return empty.copy()


class _Columns(dict):
    """A frame's columns, each taken out of it on first use (what a rule reads of its frame)."""

    def __init__(self, frame: pd.DataFrame):
        super().__init__()
        self.frame = frame

    def __missing__(self, column: str) -> pd.Series:
        series = self[column] = self.frame[column]
        return series


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
    """The model's score for gold rows: its input columns, as float32 rounds them in gold storage.

    The serving path's flat-array scorer (`pipelines.serving.fastpath`, checked equal to the model's
    own predict when the model was loaded) takes the batches it is faster for: scikit-learn's predict
    costs 10-20 ms a call whatever the rows, most of a live pass at a few hundred readings."""
    matrix = gold.reindex(columns=model.columns).to_numpy(dtype="float64")
    matrix = matrix.astype("float32").astype("float64")
    fast = getattr(model, "fast", None)
    if fast is not None and len(matrix) <= fast.max_rows:
        return np.asarray(fast.score(matrix), dtype="float64").ravel()
    return np.asarray(model.estimator.predict(pd.DataFrame(matrix, columns=model.columns)), dtype="float64").ravel()


@dataclass
class ScorerStats:
    batches: int = 0
    readings: int = 0
    silver_rejected: int = 0
    silver_seconds: float = 0.0
    feature_seconds: float = 0.0
    model_seconds: float = 0.0
    output_seconds: float = 0.0  # the scored readings handed to the worker
    silver_full_batches: int = 0  # batches with something to quarantine: to_silver's full path
    late_readings: int = 0  # readings older than their device's latest (inserted into its windows)
    last_error: str = ""
    unscored_no_model: int = 0
    rejected_rules: dict[str, int] = field(default_factory=dict)


class OnlineScorer:
    def __init__(
        self, contract: Contract, window: Window, long_window: Window, models: ModelSource, model_name: str = ""
    ):
        self.contract = contract
        self.features = OnlineFeatures(contract, window, long_window)
        self.silver = SilverGate(contract)
        self.models = models
        self.model_name = model_name
        self.stats = ScorerStats()
        # a streaming detector's per-device states, carried from pass to pass (by its estimator's id)
        self._streams: dict[int, tuple[Any, dict]] = {}

    def score_bronze(self, bronze) -> list[ScoredReading]:
        """Score a micro-batch given as a bronze table (`messages.bronze_table`)."""
        started = time.perf_counter()
        silver, quarantine = self.silver.split(bronze)
        self.stats.silver_seconds += time.perf_counter() - started
        self.stats.silver_full_batches = self.silver.full_batches
        self.stats.silver_rejected += len(quarantine)
        for rule in quarantine["rule"] if len(quarantine) else ():
            self.stats.rejected_rules[rule] = self.stats.rejected_rules.get(rule, 0) + 1
        return self.score_silver(silver)

    def score_silver(self, silver: pd.DataFrame) -> list[ScoredReading]:
        if not len(silver):
            return []
        started = time.perf_counter()
        gold = self.features.features(silver)  # row i is silver's row i
        self.stats.feature_seconds += time.perf_counter() - started
        self.stats.late_readings = self.features.state.late
        self.stats.batches += 1
        self.stats.readings += len(gold)
        champion = self.models.get("champion")
        if champion is None:
            self.stats.unscored_no_model += len(gold)
            return []

        started = time.perf_counter()
        devices = gold["device"].tolist()
        roles = self._roles(devices)
        scores = np.full(len(gold), np.nan)
        versions = np.full(len(gold), "", dtype=object)
        thresholds = np.full(len(gold), np.inf)
        for role in ("champion", "challenger"):
            mask = roles == role
            if not mask.any():
                continue
            model = self.models.get(role)
            if model is None and role == "challenger":
                model = champion  # challenger gone mid-rollout: the champion serves
            if model is None:
                continue
            everyone = bool(mask.all())
            scores[mask] = self._predict(model, gold if everyone else gold[mask])
            thresholds[mask] = model.threshold
            versions[mask] = str(model.version)
        shadow = self._shadow(gold, roles)
        self.stats.model_seconds += time.perf_counter() - started

        # Plain lists, not per-row pandas access: at 5,000 readings a pass, 9 `.iat` lookups a reading
        # cost more than silver, features and the model together.
        started = time.perf_counter()
        if "_source_line" in silver:
            seqs = silver["_source_line"].astype("float64").fillna(-1).to_numpy().astype("int64").tolist()
        else:
            seqs = [-1] * len(gold)
        out = [
            ScoredReading(device, seq, ts, score, threshold, version, role, shade)
            for device, seq, ts, score, threshold, version, role, shade in zip(
                devices,
                seqs,
                gold["ts"].tolist(),
                scores.tolist(),
                thresholds.tolist(),
                versions.tolist(),
                roles.tolist(),
                shadow if shadow else [None] * len(gold),
                strict=True,
            )
        ]
        self.stats.output_seconds += time.perf_counter() - started
        return out

    def _predict(self, model: ModelLike, gold: pd.DataFrame) -> np.ndarray:
        """`predict`, except for a streaming detector (the default family): its per-device state goes on
        from the end of its training rows and from each pass to the next, as online scoring means;
        `StreamingScorer.predict` alone would start every pass from the training state again."""
        from pipelines.training import StreamingScorer

        estimator = getattr(model, "estimator", None)
        if not isinstance(estimator, StreamingScorer):
            return predict(model, gold)
        held = self._streams.get(id(estimator))
        if held is None or held[0] is not estimator:  # a version loaded since: its own training state
            held = self._streams[id(estimator)] = (estimator, estimator.training_states())
        return estimator.continue_streams(held[1], gold[estimator.columns])

    def warm_streams(self, silver: pd.DataFrame) -> dict[str, int]:
        """A streaming-detector model's device states brought up to date after a restart: the readings
        already committed that came after its training rows go through it again, in time order, their
        scores discarded, so the states are what the scorer before the restart had reached (those
        readings are not scored again: the caller marks them seen). Returns readings replayed per role.
        Readings older than the tail given (`warm_tails`: the last two event dates) cannot be replayed:
        a model trained before those starts from its training end plus the tail, and says so."""
        from pipelines.training import StreamingScorer

        replayed: dict[str, int] = {}
        for role in ("champion", "challenger"):
            model = self.models.get(role)
            estimator = getattr(model, "estimator", None)
            if not isinstance(estimator, StreamingScorer):
                continue
            held = self._streams.get(id(estimator))
            if held is None or held[0] is not estimator:
                held = self._streams[id(estimator)] = (estimator, estimator.training_states())
            if not len(silver):
                continue
            until = getattr(estimator, "trained_until_", None)
            if until is None:
                log.info("%s v%s: no training end recorded; its device states start from training", role, model.version)
                continue
            ts = pd.to_datetime(silver["ts"], utc=True)
            rows = silver[ts > pd.Timestamp(until)]
            if len(rows) and ts.min() > pd.Timestamp(until):
                log.warning(
                    "%s v%s: trained until %s but the committed tail starts at %s; readings between are not "
                    "replayed into its device states",
                    role,
                    model.version,
                    until,
                    ts.min().isoformat(),
                )
            if len(rows):
                estimator.continue_streams(held[1], rows[estimator.columns])
            replayed[role] = len(rows)
        return replayed

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
            return np.full(len(devices), "champion", dtype=object)
        routes = {d: route(d, rollout.weight, rollout.rollout_id) for d in set(devices)}  # sticky per device
        return np.array([routes[d] for d in devices], dtype=object)

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
        for i, score in zip(np.flatnonzero(mask), self._predict(model, gold[mask]), strict=True):
            out[i] = {"role": rollout.shadow, "model_version": str(model.version), "score": float(score)}
        return out
