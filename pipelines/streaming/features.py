"""Gold's features one reading at a time: per-device running state instead of re-running `to_gold`.

`to_gold` (pipelines/layers/gold.py) is the definition; this module computes the same numbers for
each new reading from what a device's windows hold, in O(window) small C-level steps per reading:

- the short window (count or duration) is a slice of the device's buffered readings: mean, std
  (two-pass over the slice, with gold's epsilon), min, max, z-score and the flat-line count;
- the long window's median comes from a sorted list kept up to date with bisect (insert the new
  value, remove the ones leaving the window): O(log n) search plus a memmove of ~240 pointers;
- delta and forward fill read the device's previous reading; a device's first reading has none.

Gold's rolling kernels restart their running sums at each partition and the float rounding of an
online sum depends on where it started, so neither gold nor this module is bit-exact against the
other; both agree to far below float32's resolution, which is how gold is stored and what the model
sees (tests/unit/test_stream_features.py replays simulator data and the NAB series through both).

A reading older than its device's latest (a late or re-sent message) is inserted where its time
belongs, its features are computed from the readings around it, and the device's running state is
rebuilt, so later readings see it as gold would. A reading with the time of one already held replaces
it (silver keeps the latest delivery of a key). Readings already scored are not re-scored.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipelines.contracts import Contract
from pipelines.layers.gold import _STD_EPSILON, Window, window_seconds

_NUMERIC_SUFFIXES = (
    "",
    "_roll_mean",
    "_roll_std",
    "_roll_min",
    "_roll_max",
    "_delta",
    "_zscore",
    "_flat_count",
    "_long_dev",
)


def feature_names(contract: Contract) -> list[str]:
    """Gold's feature columns for a contract, in `to_gold`'s order (every numeric and bool column)."""
    names = [f"{col}{suffix}" for col in contract.numeric_columns for suffix in _NUMERIC_SUFFIXES]
    return [*names, *contract.bool_columns, "hour_sin", "hour_cos"]


@dataclass(frozen=True)
class _Span:
    """A window as gold reads it: `width` ns for a duration ((t - width, t]), `count` readings otherwise."""

    width: int | None
    count: int | None

    @classmethod
    def of(cls, window: Window) -> _Span:
        seconds = window_seconds(window)
        if seconds is None:
            if int(window) < 1:
                raise ValueError(f"window={window}: a count of readings must be >= 1")
            return cls(None, int(window))
        return cls(int(seconds * 1e9), None)  # as gold's time_window_starts rounds it

    def start(self, ts: list[int], end: int, lo: int = 0) -> int:
        """Index of the first reading in the window that ends at `end` (inclusive), not before `lo`."""
        if self.width is not None:
            return bisect_right(ts, ts[end] - self.width, lo, end)
        return max(end - self.count + 1, lo)


class _Device:
    """One device's buffered readings (ascending time) and the running state of its latest windows."""

    __slots__ = ("ts", "raw", "values", "bools", "deltas", "flats", "short_start", "long_start", "ranked", "origin")

    def __init__(self, numeric: int, bools: int):
        self.ts: list[int] = []  # ns since the epoch
        self.raw: list[list[float]] = [[] for _ in range(numeric)]  # as delivered (NaN: missing)
        self.values: list[list[float]] = [[] for _ in range(numeric)]  # forward-filled, 0.0 before the first
        self.bools: list[list[float]] = [[] for _ in range(bools)]  # raw 0/1/NaN
        self.deltas: list[list[float]] = [[] for _ in range(numeric)]  # 0.0 on the device's first reading
        self.flats: list[list[int]] = [[] for _ in range(numeric)]  # 1 where the value repeats the previous one
        self.short_start = 0
        self.long_start = 0
        self.ranked: list[list[float]] = [[] for _ in range(numeric)]  # long window's values, sorted
        self.origin = True  # index 0 is the device's first reading (nothing was dropped before it)


class StreamFeatures:
    """Gold's features for each new silver row, from per-device state (see the module docstring)."""

    def __init__(self, contract: Contract, window: Window = 15, long_window: Window = 240):
        self.contract = contract
        self.device, self.ts = contract.entity.column, contract.event_time.column
        self.numeric = list(contract.numeric_columns)
        self.bool_columns = list(contract.bool_columns)
        self.short, self.long = _Span.of(window), _Span.of(long_window)
        self.names = feature_names(contract)
        self.devices: dict[str, _Device] = {}
        self.late = 0  # readings older than their device's latest: inserted, state rebuilt
        self.beyond_history = 0  # late readings whose windows reach past what is kept (approximate)

    # -- the frame interface ---------------------------------------------------------------------
    def features(self, silver: pd.DataFrame) -> pd.DataFrame:
        """Gold's key columns (device, ts) and features (`names`, in `to_gold`'s order) for `silver`,
        row i for silver's row i. Each device's readings are taken in time order; their windows hold
        the device's earlier readings, from previous calls too."""
        if not len(silver):
            return pd.DataFrame(columns=["device", "ts", *self.names])
        order, devices, ts, numbers, flags = self._columns(silver)
        matrix = np.empty((len(silver), len(self.names)))
        matrix[order] = self.update_arrays(devices, ts, numbers, flags)
        matrix[order, -2:] = _hour_features(ts)
        out = pd.DataFrame(matrix, columns=self.names, copy=False)
        out.insert(0, "ts", silver[self.ts].astype("datetime64[us, UTC]").to_numpy())
        out.insert(0, "device", silver[self.device].astype("str").to_numpy(dtype=object))
        return out

    def warm_up(self, silver: pd.DataFrame) -> None:
        """Start from rows already seen (read back from bronze after a restart): each device's
        readings that later windows can reach become its state; nothing is scored."""
        if not len(silver):
            return
        _, devices, ts, numbers, flags = self._columns(silver)
        values = numbers.copy()
        bounds = np.flatnonzero(np.r_[True, devices[1:] != devices[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            name = str(devices[lo])
            if name in self.devices:  # already streaming: warm-up rows are older news
                continue
            block = values[lo:hi]
            filled = pd.DataFrame(block).ffill().fillna(0.0).to_numpy()
            deltas = np.vstack([np.zeros((1, block.shape[1])), np.diff(filled, axis=0)])
            repeats = np.vstack([np.zeros((1, block.shape[1]), dtype=int), (deltas[1:] == 0).astype(int)])
            stamps = ts[lo:hi].tolist()
            keep = self._kept_from(stamps)
            dev = _Device(len(self.numeric), len(self.bool_columns))
            dev.ts = stamps[keep:]
            dev.origin = keep == 0
            for c in range(len(self.numeric)):
                dev.raw[c] = block[keep:, c].tolist()
                dev.values[c] = filled[keep:, c].tolist()
                dev.deltas[c] = deltas[keep:, c].tolist()
                dev.flats[c] = repeats[keep:, c].tolist()
            bits = pd.DataFrame(flags[lo:hi]).ffill().to_numpy()  # what was before the kept rows
            for b in range(len(self.bool_columns)):
                dev.bools[b] = bits[keep:, b].tolist()
            self._rebuild(dev)
            self.devices[name] = dev

    def _columns(self, silver: pd.DataFrame):
        """Rows in (device, ts) order as plain arrays: the order, devices, ns times, numbers, flags."""
        devices = silver[self.device].astype("str").to_numpy(dtype=object)
        ts = silver[self.ts].astype("datetime64[ns, UTC]").to_numpy(dtype="datetime64[ns]").astype("int64")
        codes, _ = pd.factorize(devices, sort=True)
        order = np.lexsort((ts, codes))
        numbers = (
            np.column_stack(
                [
                    silver[c].to_numpy(dtype="float64", na_value=np.nan)
                    if c in silver
                    else np.full(len(silver), np.nan)
                    for c in self.numeric
                ]
            )
            if self.numeric
            else np.zeros((len(silver), 0))
        )
        flags = (
            np.column_stack(
                [
                    silver[c].astype("float64").to_numpy(dtype="float64", na_value=np.nan)
                    if c in silver
                    else np.full(len(silver), np.nan)
                    for c in self.bool_columns
                ]
            )
            if self.bool_columns
            else np.zeros((len(silver), 0))
        )
        return order, devices[order], ts[order], numbers[order], flags[order]

    # -- the running state ---------------------------------------------------------------------
    def update_arrays(self, devices, ts: np.ndarray, numbers: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """Features (rows x `names`, hour columns left 0) of readings given per device in time order."""
        n_num, n_bool = len(self.numeric), len(self.bool_columns)
        width = len(self.names)
        out: list[float] = []  # one flat list: a list per row would be 5,000 containers a pass for the GC
        state = self.devices
        stamps = ts.tolist()
        number_cells = numbers.ravel().tolist()
        flag_cells = flags.ravel().tolist()
        for i, name in enumerate(devices.tolist()):
            dev = state.get(name)
            if dev is None:
                dev = state[name] = _Device(n_num, n_bool)
            t = stamps[i]
            values = number_cells[i * n_num : (i + 1) * n_num]
            bits = flag_cells[i * n_bool : (i + 1) * n_bool]
            if dev.ts and t <= dev.ts[-1]:
                self._late(dev, t, values, bits, out)
            else:
                self._append(dev, t, values, bits, out)
        return np.array(out, dtype="float64").reshape(len(stamps), width)

    def _append(self, dev: _Device, t: int, numbers: list[float], flags: list[float], out: list[float]) -> None:
        """The in-order path: one reading after the device's latest."""
        first = not dev.ts
        ts = dev.ts
        ts.append(t)
        end = len(ts) - 1
        # Windows of the new reading: both starts only move forward.
        old_long = dev.long_start
        dev.short_start = self.short.start(ts, end, dev.short_start)
        dev.long_start = self.long.start(ts, end, old_long)
        for c, x in enumerate(numbers):
            raw, values = dev.raw[c], dev.values[c]
            raw.append(x)
            if x != x:  # missing: carried forward from the previous reading (0.0 before any)
                x = values[-1] if values else 0.0
            values.append(x)
            if first:
                delta, flat = 0.0, 0
            else:
                delta = x - values[-2]
                flat = 1 if delta == 0 else 0
            dev.deltas[c].append(delta)
            dev.flats[c].append(flat)
            ranked = dev.ranked[c]
            for j in range(old_long, dev.long_start):
                del ranked[bisect_left(ranked, values[j])]
            insort(ranked, x)
            out += self._numeric_features(values, dev.flats[c], dev.short_start, end, delta, ranked)
        for b, flag in enumerate(flags):
            dev.bools[b].append(flag)
        out += self._bool_features(dev, end)
        out += (0.0, 0.0)  # hour_sin, hour_cos: filled per batch, vectorised as gold computes them
        self._compact(dev)

    def _numeric_features(
        self, values: list[float], flats: list[int], start: int, end: int, delta: float, ranked: list[float]
    ) -> tuple[float, ...]:
        window = values[start : end + 1]
        x = values[end]
        lo, hi = min(window), max(window)
        n = len(window)
        if lo == hi:  # a constant window: gold's kernels return the value itself and a std of exactly 0
            mean, std = x, 0.0
        else:
            mean = math.fsum(window) / n
            std = math.sqrt(sum([(v - mean) * (v - mean) for v in window]) / (n - 1))
            if not std > _STD_EPSILON * (1.0 + abs(mean)):
                std = 0.0
        zscore = (x - mean) / std if std > 0 else 0.0
        m = len(ranked)
        median = ranked[m // 2] if m % 2 else (ranked[m // 2 - 1] + ranked[m // 2]) / 2
        flat_count = float(sum(flats[start : end + 1]))
        return (x, mean, std, lo, hi, delta, zscore, flat_count, x - median)

    def _bool_features(self, dev: _Device, end: int) -> list[float]:
        out = []
        for column in dev.bools:
            value = column[end]
            k = end
            while value != value and k > 0:  # forward fill (rare: a missing flag)
                k -= 1
                value = column[k]
            out.append(0.0 if value != value else value)
        return out

    def _late(self, dev: _Device, t: int, numbers: list[float], flags: list[float], out: list[float]) -> None:
        """A reading at or before the device's latest: put it where its time belongs (a repeated time
        replaces the held reading, the latest delivery wins as in silver), refresh the readings after
        it that read it (forward fill, delta, flat), rebuild the running state; features at its place."""
        self.late += 1
        ts = dev.ts
        p = bisect_left(ts, t)
        replace = p < len(ts) and ts[p] == t
        if not replace:
            ts.insert(p, t)
        for c, x in enumerate(numbers):
            columns = (dev.raw[c], dev.values[c], dev.deltas[c], dev.flats[c])
            if replace:
                dev.raw[c][p] = x
            else:
                dev.raw[c].insert(p, x)
                for column in columns[1:]:
                    column.insert(p, 0)
            self._refill(dev, c, p)
        for b, flag in enumerate(flags):
            if replace:
                dev.bools[b][p] = flag
            else:
                dev.bools[b].insert(p, flag)
        short = self.short.start(ts, p)
        long_ = self.long.start(ts, p)
        if (short == 0 or long_ == 0) and not dev.origin:
            self.beyond_history += 1
        for c in range(len(self.numeric)):
            values = dev.values[c]
            ranked = sorted(values[long_ : p + 1])
            out += self._numeric_features(values, dev.flats[c], short, p, dev.deltas[c][p], ranked)
        out += self._bool_features(dev, p)
        out += (0.0, 0.0)
        self._rebuild(dev)

    def _refill(self, dev: _Device, c: int, p: int) -> None:
        """Forward fill, delta and flat flag of column `c` from index `p` on, as far as they change."""
        raw, values, deltas, flats = dev.raw[c], dev.values[c], dev.deltas[c], dev.flats[c]
        for k in range(p, len(raw)):
            x = raw[k]
            if x != x:
                x = values[k - 1] if k > 0 else 0.0
            changed = values[k] != x or k <= p + 1
            values[k] = x
            if k == 0:
                delta, flat = (0.0, 0) if dev.origin else (deltas[0], flats[0])
            else:
                delta = x - values[k - 1]
                flat = 1 if delta == 0 else 0
            deltas[k], flats[k] = delta, flat
            if not changed:
                break

    def _rebuild(self, dev: _Device) -> None:
        """The running state of the device's latest windows, from its buffered readings."""
        if not dev.ts:
            return
        end = len(dev.ts) - 1
        dev.short_start = self.short.start(dev.ts, end)
        dev.long_start = self.long.start(dev.ts, end)
        dev.ranked = [sorted(values[dev.long_start :]) for values in dev.values]

    def _kept_from(self, ts: list[int]) -> int:
        """First reading to keep of a device's readings: its latest windows, and as much again for
        late readings (their windows start earlier)."""
        end = len(ts) - 1
        start = min(self.short.start(ts, end), self.long.start(ts, end))
        return max(0, start - (end - start + 1))

    def _compact(self, dev: _Device) -> None:
        """Drop readings no window can reach any more, once they outnumber the windows' own (amortised)."""
        start = min(dev.short_start, dev.long_start)
        held = len(dev.ts) - start
        if start <= 2 * held + 64:
            return
        drop = start - held  # keep one window's worth before the windows, for late readings
        del dev.ts[:drop]
        for columns in (dev.raw, dev.values, dev.deltas, dev.flats, dev.bools):
            for column in columns:
                del column[:drop]
        dev.short_start -= drop
        dev.long_start -= drop
        dev.origin = False


def _hour_features(ts: np.ndarray) -> np.ndarray:
    """hour_sin, hour_cos of ns times, with `to_gold`'s arithmetic: its seconds since midnight are
    microseconds (silver's resolution) / 1e6 (pandas' total_seconds), then 2 pi seconds / 86,400."""
    seconds = (ts // 1000 % 86_400_000_000) / 1_000_000
    angle = 2 * np.pi * seconds / 86_400.0
    return np.column_stack([np.sin(angle), np.cos(angle)])
