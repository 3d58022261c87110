"""HTM-style anomaly likelihood (Ahmad et al. 2017), as streaming per-series state.

A raw anomaly score in [0, 1] (e.g. a predictor's surprise) is turned into the probability that
its recent average is unusual given the raw scores of the recent past: the short-term average
(``averaging_window`` readings) is compared with a normal distribution fitted to the moving averages
of the last ``history`` raw scores, re-fitted every ``reestimation_period`` readings. Consecutive
"red" likelihoods are damped to "yellow" so that one event gives one spike. Reported as NAB's log
scale: ``log(1 - likelihood) / log(1e-10)``, 0.5 meaning a tail probability of about 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_LOG_DENOM = -23.02585084720009  # log(1 - 0.9999999999)


@dataclass
class LikelihoodConfig:
    learning_period: int = 300
    estimation_samples: int = 300
    history: int = 8640
    reestimation_period: int = 100
    averaging_window: int = 10
    min_mean: float = 0.03
    min_variance: float = 0.0003
    red: float = 0.99999
    yellow: float = 0.999


@dataclass
class LikelihoodState:
    iteration: int = 0
    raw: list = field(default_factory=list)  # last ``history`` raw scores
    values: list = field(default_factory=list)  # last ``history`` readings (flat-series check)
    mean: float = math.nan
    stdev: float = math.nan
    avg_window: list = field(default_factory=list)  # last ``averaging_window`` raw scores
    avg_total: float = 0.0
    prev_tail: float = 1.0


def _moving_average(x: np.ndarray, w: int) -> np.ndarray:
    c = np.cumsum(np.concatenate(([0.0], x)))
    n = np.arange(1, len(x) + 1)
    lo = np.maximum(n - w, 0)
    return (c[n] - c[lo]) / np.minimum(n, w)


def tail_probability(x: float, mean: float, stdev: float) -> float:
    if x < mean:
        x = 2 * mean - x
    return 0.5 * math.erfc((x - mean) / stdev / math.sqrt(2.0))


def log_likelihood(likelihood: float) -> float:
    return math.log(1.0000000001 - likelihood) / _LOG_DENOM


def likelihood_update(cfg: LikelihoodConfig, st: LikelihoodState, value: float, raw: float) -> float:
    """Log-scaled anomaly likelihood of this reading (0 until the distribution is first fitted)."""
    if st.iteration < cfg.learning_period + cfg.estimation_samples:
        out = 0.0
    else:
        if math.isnan(st.mean) or st.iteration % cfg.reestimation_period == 0:
            _estimate(cfg, st)
        # moving average including this raw score
        st.avg_window.append(raw)
        st.avg_total += raw
        if len(st.avg_window) > cfg.averaging_window:
            st.avg_total -= st.avg_window.pop(0)
        avg = st.avg_total / len(st.avg_window)
        tail = tail_probability(avg, st.mean, st.stdev)
        red = 1.0 - cfg.red
        filtered = tail
        if tail <= red and st.prev_tail <= red:
            filtered = 1.0 - cfg.yellow
        st.prev_tail = tail
        out = log_likelihood(1.0 - filtered)
    st.raw.append(raw)
    st.values.append(value)
    if len(st.raw) > cfg.history:
        del st.raw[0]
        del st.values[0]
    st.iteration += 1
    return out


def _estimate(cfg: LikelihoodConfig, st: LikelihoodState) -> None:
    raw = np.asarray(st.raw, dtype=float)
    shifted_out = max(0, st.iteration - cfg.history)
    skip = min(st.iteration, max(0, cfg.learning_period - shifted_out))
    avgs = _moving_average(raw, cfg.averaging_window)
    w = cfg.averaging_window
    st.avg_window = raw[-w:].tolist()
    st.avg_total = float(np.sum(st.avg_window))
    if len(avgs) <= skip or np.ptp(np.asarray(st.values[skip:], dtype=float)) == 0:
        st.mean, st.stdev = 0.5, 1e3
        return
    data = avgs[skip:]
    mean = float(np.mean(data))
    var = float(np.var(data))
    st.mean = max(mean, cfg.min_mean)
    st.stdev = math.sqrt(max(var, cfg.min_variance))
