"""NAB (Numenta Anomaly Benchmark) scoring, written from the published method and NAB's scorer.

The method (Lavin & Ahmad 2015; NAB v1.1 ``nab/sweeper.py``), as implemented here:

* Each file's first ``min(floor(0.15 * n), 0.15 * 5000)`` rows are probationary: never scored.
* A *detection* is a row whose anomaly score is ``>= threshold``.
* Every row gets a "sweep score" as if it were detected. Inside a window ``[a, b]`` (row indices,
  matched by timestamp) of width ``w = b - a + 1``, row ``i`` sits at relative position
  ``x = -(b - i + 1) / w`` (``-1`` at the window start) and earns ``tp * S(x) / S(-1)`` where
  ``S(x) = 2 * sigmoid(-5 x) - 1``. Outside windows, a row after a window whose last row is ``b``
  and width ``w`` sits at ``x = (i - b) / (w - 1)`` and costs ``fp * S(x)`` (``S = -1`` beyond
  ``x > 3``); a row before any window costs ``-fp``.
* A file's raw score is the sum of its detected rows' sweep scores outside windows, plus, for each
  window with at least one scored row, the sweep score of its first detection (the largest one,
  since ``S`` falls across a window), or ``-fn`` when nothing in it is detected.
* One threshold per detector and profile for the whole corpus: the distinct score that maximises the
  summed raw score over all files (ties go to the highest threshold, as NAB's stable sort does).
* ``normalised = 100 * (raw - null) / (perfect - null)`` over the corpus, where *null* never fires
  and *perfect* fires on the first scored row of every window (its start), both scored by the same
  scorer. (NAB itself takes perfect = number of windows * tp: the same unless a window starts inside a
  probationary period.)

TP/FP/FN/TN are NAB's row counts over the scored rows (a window's rows all count as TP or FN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "PROBATION_PERCENT",
    "PROFILES",
    "CorpusFile",
    "CorpusScore",
    "CostMatrix",
    "EventMetrics",
    "FileScore",
    "detectors_in",
    "event_metrics",
    "load_corpus",
    "load_detector_scores",
    "load_profiles",
    "load_published_scores",
    "normalised_scores",
    "optimise_threshold",
    "probation_length",
    "scaled_sigmoid",
    "score_file",
    "windows_to_labels",
]

PROBATION_PERCENT = 0.15
#: NAB starts its threshold sweep here: "nothing detected" for scores in [0, 1].
_NO_DETECTION_THRESHOLD = 1.1

Window = tuple[pd.Timestamp, pd.Timestamp]
WindowLike = tuple[object, object]
FileInput = tuple[np.ndarray | Sequence[object], Sequence[WindowLike], np.ndarray]


@dataclass(frozen=True)
class CostMatrix:
    """A NAB application profile's weights (``tn`` is carried for completeness: NAB never uses it)."""

    tp: float
    fp: float
    fn: float
    tn: float = 1.0


PROFILES: dict[str, CostMatrix] = {
    "standard": CostMatrix(tp=1.0, fp=0.11, fn=1.0, tn=1.0),
    "reward_low_FP_rate": CostMatrix(tp=1.0, fp=0.22, fn=1.0, tn=1.0),
    "reward_low_FN_rate": CostMatrix(tp=1.0, fp=0.11, fn=2.0, tn=1.0),
}


def load_profiles(path: Path | str) -> dict[str, CostMatrix]:
    """Read NAB's ``config/profiles.json`` (``{name: {"CostMatrix": {"tpWeight": ...}}}``)."""
    raw = json.loads(Path(path).read_text())
    out: dict[str, CostMatrix] = {}
    for name, spec in raw.items():
        cm = spec["CostMatrix"]
        out[name] = CostMatrix(
            tp=float(cm["tpWeight"]),
            fp=float(cm["fpWeight"]),
            fn=float(cm["fnWeight"]),
            tn=float(cm.get("tnWeight", 1.0)),
        )
    return out


# --------------------------------------------------------------------------------------------- corpus


@dataclass
class CorpusFile:
    """One NAB series with its labelled windows."""

    name: str  # "category/file.csv", as in NAB's labels
    category: str
    timestamps: np.ndarray  # datetime64[ns]
    values: np.ndarray  # float64
    windows: list[Window]


def load_corpus(root: Path | str) -> list[CorpusFile]:
    """Load ``root/data/<category>/<file>.csv`` with ``root/labels/combined_windows.json``, sorted by name."""
    root = Path(root)
    labels: dict[str, list[list[str]]] = json.loads((root / "labels" / "combined_windows.json").read_text())
    files: list[CorpusFile] = []
    for path in sorted((root / "data").glob("*/*.csv")):
        name = path.relative_to(root / "data").as_posix()
        if name not in labels:
            raise ValueError(f"{name}: data file has no entry in labels/combined_windows.json")
        frame = pd.read_csv(path)
        files.append(
            CorpusFile(
                name=name,
                category=path.parent.name,
                timestamps=_as_datetime64(frame["timestamp"]),
                values=frame["value"].to_numpy(dtype=np.float64),
                windows=[(pd.Timestamp(a), pd.Timestamp(b)) for a, b in labels[name]],
            )
        )
    return sorted(files, key=lambda f: f.name)


def detectors_in(root: Path | str) -> list[str]:
    """Detectors with per-row results under ``root/results`` (sorted)."""
    results = Path(root) / "results"
    if not results.is_dir():
        return []
    return sorted(d.name for d in results.iterdir() if d.is_dir() and any(d.glob(f"*/{d.name}_*.csv")))


def load_detector_scores(root: Path | str, detector: str) -> dict[str, np.ndarray]:
    """Per-row ``anomaly_score`` of ``detector`` from ``root/results/<detector>/<category>/<detector>_<file>.csv``."""
    base = Path(root) / "results" / detector
    prefix = f"{detector}_"
    out: dict[str, np.ndarray] = {}
    for path in sorted(base.glob(f"*/{prefix}*.csv")):
        name = f"{path.parent.name}/{path.name[len(prefix) :]}"
        out[name] = pd.read_csv(path, usecols=["anomaly_score"])["anomaly_score"].to_numpy(dtype=np.float64)
    if not out:
        raise FileNotFoundError(f"no per-row results for detector {detector!r} under {base}")
    return out


def load_published_scores(root: Path | str, detector: str, profile: str) -> pd.DataFrame:
    """NAB's own ``<detector>_<profile>_scores.csv`` (per-file raw scores), without its ``Totals`` row."""
    frame = pd.read_csv(Path(root) / "results" / detector / f"{detector}_{profile}_scores.csv")
    return frame[frame["File"] != "Totals"].reset_index(drop=True)


# --------------------------------------------------------------------------------------------- scoring


def probation_length(n_rows: int, probation_percent: float = PROBATION_PERCENT) -> int:
    """Index of the first scored row: NAB's ``min(floor(p * n), p * 5000)``, rounded up (rows ``i >= it``)."""
    return int(math.ceil(min(math.floor(probation_percent * n_rows), probation_percent * 5000)))


def scaled_sigmoid(x: np.ndarray | float) -> np.ndarray:
    """NAB's ``2 * sigmoid(-5 x) - 1``, and ``-1`` for ``x > 3``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        val = 2.0 * (1.0 / (1.0 + np.exp(5.0 * x))) - 1.0
    return np.where(x > 3.0, -1.0, val)


_MAX_TP = float(scaled_sigmoid(-1.0))


@dataclass(frozen=True)
class FileScore:
    """A file's NAB raw score at one threshold, with NAB's row counts over the scored rows."""

    score: float
    tp: int
    fp: int
    fn: int
    tn: int
    total: int  # scored rows (tp + fp + fn + tn), as NAB's current sweeper counts them


@dataclass(frozen=True)
class _Sweep:
    """A file's threshold-independent parts: per-row sweep score and window membership."""

    sweep: np.ndarray  # float64, NAB's weighted score per row if it were detected
    window: np.ndarray  # int64, window index per row, -1 outside any window
    scored: np.ndarray  # bool, past the probationary period
    starts: np.ndarray  # int64 row index of each window's first row
    n_windows_scored: int  # windows with at least one scored row (the others cost nothing)


def _as_datetime64(timestamps: object) -> np.ndarray:
    return np.asarray(pd.to_datetime(timestamps), dtype="datetime64[ns]")


def _window_bounds(ts: np.ndarray, windows: Iterable[WindowLike]) -> np.ndarray:
    """Row index ``[first, last]`` of each window that holds rows, as NAB's sweeper finds them.

    NAB walks the rows in file order (a few NAB files have duplicate or out-of-order timestamps): a
    window opens on the first row, after the previous window, whose timestamp equals its start and
    closes on the first row from there whose timestamp equals its end. Windows whose bounds are not
    row timestamps fall back to the rows from the first at or after the start up to the last before
    the first row past the end.
    """
    spans = sorted((pd.Timestamp(a).to_datetime64(), pd.Timestamp(b).to_datetime64()) for a, b in windows)
    bounds: list[tuple[int, int]] = []
    lo = 0
    for a, b in spans:
        if b < a:
            raise ValueError(f"window ends before it starts: {a} > {b}")
        rest = ts[lo:]
        hit = np.flatnonzero(rest == a)
        if hit.size == 0:
            hit = np.flatnonzero(rest >= a)
            if hit.size == 0:
                break
        first = lo + int(hit[0])
        rest = ts[first:]
        hit = np.flatnonzero(rest == b)
        last = first + int(hit[0]) if hit.size else first + int(np.argmax(np.append(rest > b, True))) - 1
        if last < first:
            continue
        bounds.append((first, last))
        lo = last + 1
    return np.asarray(bounds, dtype=np.int64).reshape(-1, 2)


def _sweep(
    timestamps: np.ndarray | Sequence[object],
    windows: Sequence[WindowLike],
    profile: CostMatrix,
    probation_percent: float,
) -> _Sweep:
    ts = _as_datetime64(timestamps)
    n = len(ts)
    bounds = _window_bounds(ts, windows)
    starts, ends = bounds[:, 0], bounds[:, 1]
    widths = (ends - starts + 1).astype(np.float64)
    idx = np.arange(n)

    k = np.searchsorted(starts, idx, side="right") - 1  # last window starting at or before i
    inside = np.zeros(n, dtype=bool)
    if len(ends):
        inside = (k >= 0) & (idx <= ends[np.clip(k, 0, None)])
    window = np.where(inside, k, -1)

    sweep = np.empty(n, dtype=np.float64)
    ki = k[inside]
    pos = -(ends[ki] - idx[inside] + 1) / widths[ki]
    sweep[inside] = scaled_sigmoid(pos) * profile.tp / _MAX_TP

    out = ~inside
    kp = np.searchsorted(ends, idx[out], side="left") - 1  # last window ending before i
    after = kp >= 0
    past = np.full(len(kp), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):  # a 1-row window: NAB divides by zero; treat as far
        past[after] = (idx[out][after] - ends[kp[after]]) / (widths[kp[after]] - 1.0)
    past[after & ~np.isfinite(past)] = np.inf
    unweighted = np.where(after, scaled_sigmoid(past), -1.0)
    sweep[out] = unweighted * profile.fp

    scored = idx >= probation_length(n, probation_percent)
    n_windows_scored = int(np.unique(window[scored & inside]).size)
    return _Sweep(sweep=sweep, window=window, scored=scored, starts=starts, n_windows_scored=n_windows_scored)


def _score_sweep(sw: _Sweep, scores: np.ndarray, threshold: float, profile: CostMatrix) -> FileScore:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != sw.sweep.shape:
        raise ValueError(f"{len(scores)} anomaly scores for {len(sw.sweep)} timestamps")
    detected = sw.scored & (scores >= threshold)
    inside = sw.window >= 0
    fp_rows = detected & ~inside
    tp_rows = detected & inside
    fp_score = float(sw.sweep[fp_rows].sum())
    win_ids, first = np.unique(sw.window[tp_rows], return_index=True)  # rows are in time order
    tp_score = float(np.maximum(sw.sweep[tp_rows][first], -profile.fn).sum())
    fn_score = -profile.fn * (sw.n_windows_scored - len(win_ids))
    n_in = int((sw.scored & inside).sum())
    n_out = int(sw.scored.sum()) - n_in
    tp, fp = int(tp_rows.sum()), int(fp_rows.sum())
    return FileScore(
        score=fp_score + tp_score + fn_score, tp=tp, fp=fp, fn=n_in - tp, tn=n_out - fp, total=n_in + n_out
    )


def score_file(
    timestamps: np.ndarray | Sequence[object],
    windows: Sequence[WindowLike],
    scores: np.ndarray,
    threshold: float,
    profile: CostMatrix,
    probation_percent: float = PROBATION_PERCENT,
) -> FileScore:
    """NAB raw score of one file: detections are rows with ``score >= threshold`` (as NAB's sweeper)."""
    return _score_sweep(_sweep(timestamps, windows, profile, probation_percent), scores, threshold, profile)


def _deltas(sw: _Sweep, scores: np.ndarray, profile: CostMatrix) -> tuple[np.ndarray, np.ndarray, float]:
    """Scored rows' scores and each one's change to the file score when the threshold drops to it.

    A row outside windows adds its sweep score. Inside a window only a "record" row, scoring strictly
    above every earlier row of the window, becomes the first detection when the threshold falls to its
    score; it replaces the next record in time (the first detection until then) or, for the window's
    highest-scoring record, the missed-window ``-fn``. Returns (scores, deltas, base score).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != sw.sweep.shape:
        raise ValueError(f"{len(scores)} anomaly scores for {len(sw.sweep)} timestamps")
    keep = sw.scored & ~np.isnan(scores)
    s = scores[keep]
    win = sw.window[keep]
    sweep = sw.sweep[keep]
    delta = np.where(win < 0, sweep, 0.0)
    for w in np.unique(win[win >= 0]):
        rows = np.flatnonzero(win == w)
        ws = s[rows]
        prev_max = np.maximum.accumulate(np.concatenate(([-np.inf], ws[:-1])))
        rec = rows[ws > prev_max]
        gains = np.maximum(sweep[rec], -profile.fn)
        # Falling thresholds meet the records latest (highest) first; each replaces the next one in time.
        delta[rec] = gains - np.append(gains[1:], -profile.fn)
    return s, delta, -profile.fn * sw.n_windows_scored


def _optimise(prepared: Sequence[tuple[_Sweep, np.ndarray]], profile: CostMatrix) -> tuple[float, float]:
    parts = [_deltas(sw, scores, profile) for sw, scores in prepared]
    base = float(sum(p[2] for p in parts))
    s = np.concatenate([p[0] for p in parts]) if parts else np.empty(0)
    d = np.concatenate([p[1] for p in parts]) if parts else np.empty(0)
    order = np.argsort(-s, kind="stable")
    s, d = s[order], d[order]
    totals = base + np.cumsum(d)
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if len(s) else np.empty(0, dtype=np.int64)
    top = float(s[0]) if len(s) else 0.0
    none = _NO_DETECTION_THRESHOLD if top < _NO_DETECTION_THRESHOLD else float(np.nextafter(top, np.inf))
    thresholds = np.concatenate(([none], s[ends]))
    candidates = np.concatenate(([base], totals[ends]))
    best = int(np.argmax(candidates))  # first maximum = highest threshold, as NAB's stable sort
    return float(thresholds[best]), float(candidates[best])


def optimise_threshold(
    files: Sequence[FileInput],
    profile: CostMatrix,
    probation_percent: float = PROBATION_PERCENT,
) -> tuple[float, float]:
    """The threshold maximising the summed raw score over ``files`` (``(timestamps, windows, scores)``).

    Sweeps every distinct score of all files together, as NAB's optimiser does. Returns
    ``(threshold, summed raw score)``; if detecting nothing is best the threshold is above every score
    (1.1 for scores in [0, 1]).
    """
    prepared = [(_sweep(ts, wins, profile, probation_percent), sc) for ts, wins, sc in files]
    return _optimise(prepared, profile)


@dataclass(frozen=True)
class CorpusScore:
    """A detector's NAB score over a corpus under one profile."""

    threshold: float
    normalised: float  # 100 * (raw - null) / (perfect - null)
    raw: float  # summed raw score at ``threshold``
    null: float  # summed raw score of the detector that never fires
    perfect: float  # summed raw score of one detection on the first scored row of every window
    per_file: dict[str, FileScore]


def normalised_scores(
    files_with_scores: Sequence[tuple[CorpusFile, np.ndarray]] | Mapping[str, tuple[CorpusFile, np.ndarray]],
    profile: CostMatrix,
    threshold: float | None = None,
    probation_percent: float = PROBATION_PERCENT,
) -> CorpusScore:
    """Score ``(CorpusFile, anomaly scores)`` pairs: optimise the threshold (unless given), normalise.

    Raises ``ValueError`` if no file has a scored window (the normalisation is then undefined).
    """
    pairs = list(files_with_scores.values()) if isinstance(files_with_scores, Mapping) else list(files_with_scores)
    prepared = [(f, _sweep(f.timestamps, f.windows, profile, probation_percent), np.asarray(s)) for f, s in pairs]
    if threshold is None:
        threshold, _ = _optimise([(sw, s) for _, sw, s in prepared], profile)
    per_file: dict[str, FileScore] = {}
    raw = null = perfect = 0.0
    for f, sw, s in prepared:
        per_file[f.name] = fs = _score_sweep(sw, s, threshold, profile)
        raw += fs.score
        null += _score_sweep(sw, np.zeros(len(s)), np.inf, profile).score
        ideal = np.zeros(len(s))  # fires on each window's first scored row (its start, unless in probation)
        first_scored = int(np.argmax(sw.scored)) if sw.scored.any() else len(s)
        ideal[[i for i in np.maximum(sw.starts, first_scored) if i < len(s) and sw.window[i] >= 0]] = 1.0
        perfect += _score_sweep(sw, ideal, 1.0, profile).score
    if perfect == null:
        raise ValueError("no scored anomaly window in these files: the normalised NAB score is undefined")
    return CorpusScore(
        threshold=float(threshold),
        normalised=100.0 * (raw - null) / (perfect - null),
        raw=raw,
        null=null,
        perfect=perfect,
        per_file=per_file,
    )


# --------------------------------------------------------------------------------------------- events


def windows_to_labels(timestamps: np.ndarray | Sequence[object], windows: Sequence[WindowLike]) -> np.ndarray:
    """Boolean per row: the timestamp lies inside some window ``[start, end]`` (both ends included)."""
    ts = _as_datetime64(timestamps)
    labels = np.zeros(len(ts), dtype=bool)
    for a, b in windows:
        labels |= (ts >= pd.Timestamp(a).to_datetime64()) & (ts <= pd.Timestamp(b).to_datetime64())
    return labels


@dataclass(frozen=True)
class EventMetrics:
    """Window-level detection metrics of a boolean alarm series."""

    windows_total: int  # windows with at least one scored row
    windows_detected: int  # ... with at least one flagged row
    mean_lead_time_s: float | None  # window end minus first flagged row, over detected windows
    median_lead_time_s: float | None
    false_alarm_rows: int  # flagged scored rows outside every window
    false_alarm_events: int  # runs of consecutive such rows
    false_alarms_per_day: float | None  # events per day of scored span (None if the span is empty)
    scored_days: float

    @property
    def detection_rate(self) -> float | None:
        return self.windows_detected / self.windows_total if self.windows_total else None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Numeric fields (None ones left out), e.g. for ``mlflow.log_metrics``."""
        out = {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if v is not None}
        if self.detection_rate is not None:
            out[f"{prefix}detection_rate"] = self.detection_rate
        return out


def event_metrics(
    timestamps: np.ndarray | Sequence[object],
    windows: Sequence[WindowLike],
    flags: np.ndarray,
    probation_percent: float = 0.0,
) -> EventMetrics:
    """Event-level view of ``flags`` (one bool per row, rows in time order) against labelled windows.

    Rows before ``probation_length(n, probation_percent)`` are ignored (none by default; pass 0.15
    for NAB's probationary period). Works for series without windows (0 of 0, lead times None).
    """
    ts = _as_datetime64(timestamps)
    flags = np.asarray(flags, dtype=bool)
    if flags.shape != ts.shape:
        raise ValueError(f"{len(flags)} flags for {len(ts)} timestamps")
    scored = np.arange(len(ts)) >= probation_length(len(ts), probation_percent)
    alarms = flags & scored
    inside = np.zeros(len(ts), dtype=bool)
    total = 0
    leads: list[float] = []
    for a, b in windows:
        start, end = pd.Timestamp(a).to_datetime64(), pd.Timestamp(b).to_datetime64()
        in_w = (ts >= start) & (ts <= end)
        inside |= in_w
        if not (in_w & scored).any():
            continue
        total += 1
        hits = np.flatnonzero(in_w & alarms)
        if hits.size:
            leads.append(float((end - ts[hits[0]]) / np.timedelta64(1, "s")))
    false_rows = alarms & ~inside
    events = int(np.count_nonzero(false_rows & ~np.concatenate(([False], false_rows[:-1]))))
    scored_ts = ts[scored]
    days = float((scored_ts.max() - scored_ts.min()) / np.timedelta64(1, "D")) if scored_ts.size else 0.0
    return EventMetrics(
        windows_total=total,
        windows_detected=len(leads),
        mean_lead_time_s=float(np.mean(leads)) if leads else None,
        median_lead_time_s=float(np.median(leads)) if leads else None,
        false_alarm_rows=int(false_rows.sum()),
        false_alarm_events=events,
        false_alarms_per_day=events / days if days > 0 else None,
        scored_days=days,
    )
