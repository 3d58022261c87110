"""Gold's features for streamed readings: per-device running state instead of re-running `to_gold`.

`to_gold` (pipelines/layers/gold.py) is the definition; this module computes the same numbers for
each new reading from what its device's windows hold, a pass (`features`: a micro-batch of silver
rows, many devices, a few readings each) at a time:

- the pool: every device's held readings (time, raw and forward-filled values, delta, flat flag,
  flags) in numpy arrays, one row per device; a device holds what its windows can reach, twice over
  for late readings (`_kept_from`), and drops the rest when its row fills (`_make_room`);
- readings that come after their device's latest (the stream's usual case) go through `_in_order`
  together: forward fill, delta and flat flag for the whole pass in a few numpy calls, then every
  reading's short window as one (column, reading, window) block gathered from the pool, masked where
  a window is shorter (a device's first readings, duration windows: the starts are a vectorised
  bisection of the device's times), for mean, std (two-pass, gold's epsilon and constant-window
  rules), min, max, z-score and flat count;
- the long window's median stays a sorted list per device and column kept with bisect (the leaving
  values out, the new one in: ~1 µs a reading and column, the largest part of a pass); numpy's
  partition or sort of each reading's gathered 240 values costs more (~3.5 / ~1.5 µs a row);
- a device whose readings in a pass include one at or before its latest (late or re-sent) takes the
  per-reading path for that pass: its row unpacked into lists (`_Readings`), each reading through
  `_append` or `_late`, packed back.

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


class _Readings:
    """One device's held readings as Python lists, for the per-reading path (late readings, warm-up):
    unpacked from the pool, updated one reading at a time, packed back."""

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


class _Device:
    """A device's place in the pool (`slot`), the sorted values of its latest long window (one list
    per numeric column, for the median) and whether the pool still holds its first reading."""

    __slots__ = ("slot", "ranked", "origin")

    def __init__(self, slot: int, numeric: int):
        self.slot = slot
        self.ranked: list[list[float]] = [[] for _ in range(numeric)]
        self.origin = True


class StreamFeatures:
    """Gold's features for each new silver row, from per-device state (see the module docstring)."""

    def __init__(self, contract: Contract, window: Window = 15, long_window: Window = 240):
        self.contract = contract
        self.device, self.ts = contract.entity.column, contract.event_time.column
        self.numeric = list(contract.numeric_columns)
        self.bool_columns = list(contract.bool_columns)
        self.short, self.long = _Span.of(window), _Span.of(long_window)
        self.names = feature_names(contract)
        self._names_index = pd.Index(self.names)
        self.devices: dict[str, _Device] = {}
        self.late = 0  # readings older than their device's latest: inserted, state rebuilt
        self.beyond_history = 0  # late readings whose windows reach past what is kept (approximate)
        # The pool: every device's held readings, one row (slot) per device, `cap` readings a row.
        # Count windows need 2 x the longer window (see _kept_from) plus room for a few passes;
        # duration windows start there too and the rows widen when a device needs more.
        counts = [s.count for s in (self.short, self.long) if s.count is not None]
        self._cap = 0
        self._resize(64, 4 * max(counts, default=256) + 64)

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
        out = pd.DataFrame(matrix, columns=self._names_index, copy=False)  # a ready Index: 10x faster
        out.insert(0, "ts", silver[self.ts].astype("datetime64[us, UTC]").array)
        out.insert(0, "device", _as_str(silver[self.device]).array)
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
            dev = _Readings(len(self.numeric), len(self.bool_columns))
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
            self._store(self._device(name), dev)

    def _columns(self, silver: pd.DataFrame):
        """Rows in (device, ts) order as plain arrays: the order, devices, ns times, numbers, flags."""
        devices = _as_str(silver[self.device]).to_numpy(dtype=object)
        stamps = silver[self.ts]
        if not isinstance(stamps.dtype, pd.DatetimeTZDtype):
            stamps = stamps.astype("datetime64[ns, UTC]")
        ts = stamps.to_numpy(dtype="datetime64[ns]").view("int64")  # UTC
        codes, _ = pd.factorize(devices)  # any order of devices groups them
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
                    silver[c].to_numpy(dtype="float64", na_value=np.nan)
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
        """Features (rows x `names`, hour columns left 0) of readings given per device in time order.

        Devices whose readings in this call all come after their latest go through `_in_order`, all
        together; a device with a late or repeated reading goes through the per-reading path."""
        rows = len(ts)
        out = np.zeros((rows, len(self.names)))
        if not rows:
            return out
        bounds = np.flatnonzero(np.r_[True, devices[1:] != devices[:-1], True])
        starts, ends = bounds[:-1], bounds[1:]
        devs = [self._device(name) for name in devices[starts].tolist()]
        slots = np.fromiter((d.slot for d in devs), dtype=np.int64, count=len(devs))
        held = self._held[slots]
        after = np.empty(rows, dtype=bool)
        after[1:] = ts[1:] > ts[:-1]
        after[starts] = (held == 0) | (ts[starts] > self._ts[slots, np.maximum(held - 1, 0)])
        in_order = np.logical_and.reduceat(after, starts)
        if in_order.all():
            out[:] = self._in_order(devs, slots, starts, ends, ts, numbers, flags)
            return out
        for g in np.flatnonzero(~in_order).tolist():
            lo, hi = int(starts[g]), int(ends[g])
            out[lo:hi] = self._per_reading(devs[g], ts[lo:hi], numbers[lo:hi], flags[lo:hi])
        take = np.flatnonzero(in_order)
        if len(take):
            sizes = ends[take] - starts[take]
            rows_in = np.repeat(starts[take] - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))
            new_starts = np.cumsum(sizes) - sizes
            out[rows_in] = self._in_order(
                [devs[g] for g in take.tolist()],
                slots[take],
                new_starts,
                new_starts + sizes,
                ts[rows_in],
                numbers[rows_in],
                flags[rows_in],
            )
        return out

    def _per_reading(self, device: _Device, ts: np.ndarray, numbers: np.ndarray, flags: np.ndarray) -> np.ndarray:
        """One device's readings of a call, one at a time (`_append` / `_late`) on its list form."""
        dev = self._unpack(device)
        out: list[float] = []
        number_rows, flag_rows = numbers.tolist(), flags.tolist()
        for i, t in enumerate(ts.tolist()):
            if dev.ts and t <= dev.ts[-1]:
                self._late(dev, t, number_rows[i], flag_rows[i], out)
            else:
                self._append(dev, t, number_rows[i], flag_rows[i], out)
        self._store(device, dev)
        return np.array(out, dtype="float64").reshape(len(ts), len(self.names))

    def _in_order(self, devs, slots, starts, ends, ts, numbers, flags) -> np.ndarray:
        """Features of readings that all come after their device's latest, every device at once."""
        n_num, n_bool = len(self.numeric), len(self.bool_columns)
        rows, groups = len(ts), len(devs)
        sizes = ends - starts
        for g in np.flatnonzero(self._held[slots] + sizes > self._cap).tolist():
            self._make_room(devs[g], int(sizes[g]))
        cap, width = self._cap, len(self._held) * self._cap
        held = self._held[slots]
        group = np.repeat(np.arange(groups), sizes)
        base = slots[group] * cap  # the reading's device row in the flattened pool
        pos = held[group] + np.arange(rows) - starts[group]  # its index in that row
        at = base + pos
        values_pool = self._values.reshape(n_num, width)

        # Forward fill, delta, flat: each device's readings behind its previous value (0.0 before any).
        known = held > 0
        seeds = values_pool[:, slots * cap + np.maximum(held - 1, 0)].T
        seeds[~known] = 0.0
        seats = starts + np.arange(groups)  # where each seed sits in `ext`
        new = np.arange(rows) + group + 1  # where each reading sits in `ext`
        ext = np.insert(numbers, starts, seeds, axis=0)
        line = np.arange(rows + groups)[:, None]
        filled = np.take_along_axis(ext, np.maximum.accumulate(np.where(np.isnan(ext), 0, line), axis=0), axis=0)
        x = filled[new]
        delta = x - filled[new - 1]
        firsts = starts[~known]  # a device's first reading: no previous one
        delta[firsts] = 0.0
        flat = delta == 0
        flat[firsts] = False
        # Flags: forward filled from the device's last known flag (NaN: none yet, then 0.0).
        bext = np.insert(flags, starts, self._bool_last[slots], axis=0)
        last = np.maximum.accumulate(np.where(np.isnan(bext), -1, line), axis=0)[new]
        bits = np.take_along_axis(bext, np.maximum(last, 0), axis=0)
        bits[last < seats[group][:, None]] = np.nan
        self._bool_last[slots] = bits[ends - 1]

        self._ts.reshape(-1)[at] = ts
        self._raw.reshape(n_num, width)[:, at] = numbers.T
        values_pool[:, at] = x.T
        self._deltas.reshape(n_num, width)[:, at] = delta.T
        self._flats.reshape(n_num, width)[:, at] = flat.T
        self._bools.reshape(n_bool, width)[:, at] = flags.T
        self._held[slots] = held + sizes

        # The short window of every reading as a (column, reading, window) block; shorter windows
        # (a device's first readings, duration windows) are padded and masked.
        short = self._window_starts(self.short, base, pos)
        count = pos - short + 1
        span = int(count.max())
        cells = pos[:, None] - np.arange(span - 1, -1, -1)
        full = bool((cells >= short[:, None]).all())
        cells = base[:, None] + np.maximum(cells, short[:, None])  # padding repeats the window's first cell
        window = np.take(values_pool, cells, axis=1)
        repeats = np.take(self._flats.reshape(n_num, width), cells, axis=1)
        xs = x.T
        lo, hi = window.min(axis=-1), window.max(axis=-1)
        if full:
            mean = window.sum(axis=-1) / count
            spread = window - mean[..., None]
            flat_count = repeats.sum(axis=-1, dtype="float64")
        else:
            mask = np.arange(span)[None, :] >= (span - count)[:, None]
            mean = np.where(mask, window, 0.0).sum(axis=-1) / count
            spread = np.where(mask, window - mean[..., None], 0.0)
            flat_count = (repeats & mask).sum(axis=-1, dtype="float64")
        std = np.sqrt((spread * spread).sum(axis=-1) / np.maximum(count - 1, 1))
        constant = lo == hi  # gold's kernels: the value itself and a std of exactly 0
        mean = np.where(constant, xs, mean)
        std = np.where(constant | ~(std > _STD_EPSILON * (1.0 + np.abs(mean))), 0.0, std)
        zscore = np.divide(xs - mean, std, out=np.zeros_like(std), where=std > 0)

        # The long window's median: each device's sorted list, one reading at a time.
        long_ = self._window_starts(self.long, base, pos)
        previous = np.empty(rows, dtype=np.int64)
        previous[1:] = long_[:-1]
        previous[starts] = self._long_start[slots]
        self._long_start[slots] = long_[ends - 1]
        gone = long_ - previous  # readings leaving the long window at each reading
        total = int(gone.sum())
        leaving = values_pool[:, np.repeat(base + previous - (np.cumsum(gone) - gone), gone) + np.arange(total)]
        median = self._medians(devs, starts.tolist(), ends.tolist(), xs.tolist(), leaving.tolist(), gone.tolist())

        out = np.zeros((rows, len(self.names)))
        numeric = out[:, : 9 * n_num].reshape(rows, n_num, 9)
        for k, feature in enumerate((xs, mean, std, lo, hi, delta.T, zscore, flat_count, xs - median)):
            numeric[:, :, k] = feature.T
        out[:, 9 * n_num : 9 * n_num + n_bool] = np.nan_to_num(bits, nan=0.0)
        return out

    def _medians(self, devs, starts, ends, xs, leaving, gone) -> np.ndarray:
        """Medians of each reading's long window: per column and device, the values leaving the
        window out of the device's sorted list and the new one in (bisect), then the middle.
        About 1 µs a reading and column: the largest part of a pass, still far below numpy's
        partition or sort of every reading's gathered window (~3.5 µs / ~1.5 µs a row of 240)."""
        medians = np.empty((len(xs), len(gone)))
        drop_at, put = bisect_left, insort
        spans = list(zip(starts, ends, strict=True))
        for c, (values, left) in enumerate(zip(xs, leaving, strict=True)):
            out: list[float] = []
            keep = out.append
            k = 0
            for dev, (lo, hi) in zip(devs, spans, strict=True):
                ranked = dev.ranked[c]
                for x, n in zip(values[lo:hi], gone[lo:hi], strict=True):
                    if n == 1:  # a full count window: one reading leaves as one comes
                        del ranked[drop_at(ranked, left[k])]
                        k += 1
                    elif n:
                        for v in left[k : k + n]:
                            del ranked[drop_at(ranked, v)]
                        k += n
                    put(ranked, x)
                    m = len(ranked)
                    h = m >> 1
                    keep(ranked[h] if m & 1 else (ranked[h - 1] + ranked[h]) * 0.5)
            medians[c] = out
        return medians

    def _window_starts(self, span: _Span, base: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """For readings at `pos` of their device's pool row (`base` in the flat pool), the index of
        the first reading in their window: `_Span.start`, vectorised (a bisection for durations)."""
        if span.width is None:
            return np.maximum(pos - span.count + 1, 0)
        stamps = self._ts.reshape(-1)
        after = stamps[base + pos] - span.width
        lo, hi = np.zeros_like(pos), pos.copy()
        while True:
            active = lo < hi
            if not active.any():
                return lo
            mid = (lo + hi) >> 1
            later = stamps[base + mid] > after
            hi = np.where(active & later, mid, hi)
            lo = np.where(active & ~later, mid + 1, lo)

    # -- the pool --------------------------------------------------------------------------------
    def _resize(self, slots: int, cap: int) -> None:
        """(Re)allocate the pool for `slots` devices of `cap` readings each, keeping what it holds."""
        n_num, n_bool = len(self.numeric), len(self.bool_columns)
        old = None if not self._cap else (self._ts, self._raw, self._values, self._deltas, self._flats, self._bools)
        used, width = (len(self._held), self._cap) if old else (0, 0)
        self._ts = np.zeros((slots, cap), dtype=np.int64)
        self._raw, self._values, self._deltas = (np.zeros((n_num, slots, cap)) for _ in range(3))
        self._flats = np.zeros((n_num, slots, cap), dtype=bool)
        self._bools = np.zeros((n_bool, slots, cap))
        if old:
            self._ts[:used, :width] = old[0]
            for new, before in zip(
                (self._raw, self._values, self._deltas, self._flats, self._bools), old[1:], strict=True
            ):
                new[:, :used, :width] = before
            held, long_start, bool_last = self._held, self._long_start, self._bool_last
        else:
            held, long_start, bool_last = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, n_bool))
        self._held = np.zeros(slots, dtype=np.int64)
        self._long_start = np.zeros(slots, dtype=np.int64)
        self._bool_last = np.full((slots, n_bool), np.nan)
        self._held[:used], self._long_start[:used], self._bool_last[:used] = held, long_start, bool_last
        self._cap = cap

    def _device(self, name: str) -> _Device:
        dev = self.devices.get(name)
        if dev is None:
            slot = len(self.devices)
            if slot == len(self._held):
                self._resize(2 * slot, self._cap)
            dev = self.devices[name] = _Device(slot, len(self.numeric))
        return dev

    def _make_room(self, device: _Device, incoming: int) -> None:
        """Room for `incoming` readings in the device's row: drop what no window can reach any more
        (as `_kept_from` keeps after a warm-up), widen every row if that is not enough."""
        s, n = device.slot, int(self._held[device.slot])
        drop = self._kept_from(self._ts[s, :n].tolist()) if n else 0
        if drop:
            keep = n - drop
            self._ts[s, :keep] = self._ts[s, drop:n].copy()
            for pool in (self._raw, self._values, self._deltas, self._flats, self._bools):
                pool[:, s, :keep] = pool[:, s, drop:n].copy()
            self._held[s] = keep
            self._long_start[s] -= drop
            device.origin = False
        if self._held[s] + incoming > self._cap:
            self._resize(len(self._held), max(2 * self._cap, int(self._held[s]) + incoming))

    def _unpack(self, device: _Device) -> _Readings:
        """The device's held readings as lists, with the running state of its latest windows."""
        s, n = device.slot, int(self._held[device.slot])
        dev = _Readings(len(self.numeric), len(self.bool_columns))
        dev.ts = self._ts[s, :n].tolist()
        dev.raw = self._raw[:, s, :n].tolist()
        dev.values = self._values[:, s, :n].tolist()
        dev.deltas = self._deltas[:, s, :n].tolist()
        dev.flats = self._flats[:, s, :n].astype(np.int64).tolist()
        dev.bools = self._bools[:, s, :n].tolist()
        dev.origin = device.origin
        self._rebuild(dev)
        return dev

    def _store(self, device: _Device, dev: _Readings) -> None:
        """Put a device's list form (after `_rebuild`, `_append` or `_late`) back into the pool."""
        s, n = device.slot, len(dev.ts)
        if n > self._cap:
            self._resize(len(self._held), max(2 * self._cap, n))
        self._ts[s, :n] = dev.ts
        for pool, columns in (
            (self._raw, dev.raw),
            (self._values, dev.values),
            (self._deltas, dev.deltas),
            (self._flats, dev.flats),
            (self._bools, dev.bools),
        ):
            for c, column in enumerate(columns):
                pool[c, s, :n] = column
        self._held[s] = n
        self._long_start[s] = dev.long_start
        device.ranked, device.origin = dev.ranked, dev.origin
        for b, column in enumerate(dev.bools):
            known = [v for v in column if v == v]
            if known:
                self._bool_last[s, b] = known[-1]
            elif dev.origin:
                self._bool_last[s, b] = np.nan

    def _append(self, dev: _Readings, t: int, numbers: list[float], flags: list[float], out: list[float]) -> None:
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

    def _bool_features(self, dev: _Readings, end: int) -> list[float]:
        out = []
        for column in dev.bools:
            value = column[end]
            k = end
            while value != value and k > 0:  # forward fill (rare: a missing flag)
                k -= 1
                value = column[k]
            out.append(0.0 if value != value else value)
        return out

    def _late(self, dev: _Readings, t: int, numbers: list[float], flags: list[float], out: list[float]) -> None:
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

    def _refill(self, dev: _Readings, c: int, p: int) -> None:
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

    def _rebuild(self, dev: _Readings) -> None:
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

    def _compact(self, dev: _Readings) -> None:
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


def _as_str(column: pd.Series) -> pd.Series:
    return column if column.dtype == "str" else column.astype("str")


def _hour_features(ts: np.ndarray) -> np.ndarray:
    """hour_sin, hour_cos of ns times, with `to_gold`'s arithmetic: its seconds since midnight are
    microseconds (silver's resolution) / 1e6 (pandas' total_seconds), then 2 pi seconds / 86,400."""
    seconds = (ts // 1000 % 86_400_000_000) / 1_000_000
    angle = 2 * np.pi * seconds / 86_400.0
    return np.column_stack([np.sin(angle), np.cos(angle)])
