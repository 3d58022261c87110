"""Seeded IoT telemetry simulator with labelled faults, in the iot_telemetry contract's delivered shape."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import pandas as pd

FAULT_TYPES = ("spike", "stuck", "drift", "dropout")
COLUMNS = ("ts", "device", "co", "humidity", "light", "lpg", "motion", "smoke", "temp", "fault")
SECONDS_PER_DAY = 86_400
# Fault labels by code; code 0 is a normal reading (delivered as "").
_LABELS = np.array(["", *FAULT_TYPES], dtype=object)
_SPIKE, _STUCK, _DRIFT, _DROPOUT = 1, 2, 3, 4
# Fixed salt so device baselines depend on the seed only, not on the day generated.
_BASELINE_SALT = 0xD1CE


def simulate_telemetry(
    start_date: dt.date, days: int, devices: int = 4, freq_seconds: int = 60, seed: int = 42
) -> pd.DataFrame:
    """Telemetry for `days` event dates from `start_date`, one reading per device every `freq_seconds`.

    Each day is generated from its own seed (seed, date ordinal), so the result equals the
    concatenation of `simulate_day_csv` for each day: landing day by day or all at once agree.
    """
    _check_args(days, devices, freq_seconds)
    parts = [_simulate_day(start_date + dt.timedelta(days=i), devices, freq_seconds, seed) for i in range(days)]
    if not parts:
        return _frame(_empty_day())
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return _frame(merged)


def simulate_day_csv(day: dt.date, devices: int, freq_seconds: int, seed: int) -> bytes:
    """One event date as CSV bytes (header + rows), booleans written as true/false like the source dataset."""
    _check_args(1, devices, freq_seconds)
    frame = _frame(_simulate_day(day, devices, freq_seconds, seed))
    for col in ("light", "motion"):
        frame[col] = np.where(frame[col].to_numpy(), "true", "false")
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode("utf-8")


def _check_args(days: int, devices: int, freq_seconds: int) -> None:
    if days < 0:
        raise ValueError(f"days={days}: must be >= 0")
    if devices < 1:
        raise ValueError(f"devices={devices}: must be >= 1")
    if not 1 <= freq_seconds <= SECONDS_PER_DAY:
        raise ValueError(f"freq_seconds={freq_seconds}: must be between 1 and {SECONDS_PER_DAY}")


def _frame(cols: dict[str, np.ndarray]) -> pd.DataFrame:
    frame = pd.DataFrame({c: cols[c] for c in COLUMNS})
    frame["device"] = frame["device"].astype("str")
    frame["fault"] = frame["fault"].astype("str")
    return frame


def _empty_day() -> dict[str, np.ndarray]:
    floats = np.empty(0, dtype=np.float64)
    return {
        "ts": np.empty(0, dtype=np.int64),
        "device": np.empty(0, dtype=object),
        "co": floats,
        "humidity": floats,
        "light": np.empty(0, dtype=bool),
        "lpg": floats,
        "motion": np.empty(0, dtype=bool),
        "smoke": floats,
        "temp": floats,
        "fault": np.empty(0, dtype=object),
    }


def _device_baselines(devices: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, _BASELINE_SALT])
    return {
        "temp": rng.uniform(19.0, 25.0, devices),
        "temp_amp": rng.uniform(2.0, 5.0, devices),
        "humidity": rng.uniform(45.0, 70.0, devices),
        "humidity_amp": rng.uniform(5.0, 12.0, devices),
        "co": rng.uniform(0.003, 0.006, devices),
        "lpg_ratio": rng.uniform(1.4, 1.7, devices),
        "smoke_ratio": rng.uniform(3.6, 4.2, devices),
        "phase_hours": rng.uniform(-1.5, 1.5, devices),
        "lit": rng.random(devices) < 0.7,  # some devices sit in rooms that stay dark
        "motion_rate": rng.uniform(0.005, 0.03, devices),
    }


def _simulate_day(day: dt.date, devices: int, freq_seconds: int, seed: int) -> dict[str, np.ndarray]:
    base = _device_baselines(devices, seed)
    rng = np.random.default_rng([seed, day.toordinal()])
    n = -(-SECONDS_PER_DAY // freq_seconds)
    offsets = np.arange(n, dtype=np.int64) * freq_seconds
    midnight = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())
    shape = (devices, n)

    hours = offsets / 3600.0 - base["phase_hours"][:, None]
    diurnal = np.sin(2 * np.pi * (hours - 9.0) / 24.0)  # peaks mid-afternoon
    daytime = (hours % 24 >= 7) & (hours % 24 < 19)
    slow = 0.5 * np.sin(2 * np.pi * offsets / SECONDS_PER_DAY * 3 + rng.uniform(0, 2 * np.pi, (devices, 1)))

    temp = base["temp"][:, None] + base["temp_amp"][:, None] * diurnal + slow + rng.normal(0, 0.2, shape)
    humidity = base["humidity"][:, None] - base["humidity_amp"][:, None] * diurnal + rng.normal(0, 0.8, shape)
    co = base["co"][:, None] * (1 + 0.15 * diurnal + rng.normal(0, 0.05, shape))
    co = np.clip(co, 0.0005, None)
    lpg = co * base["lpg_ratio"][:, None] * (1 + rng.normal(0, 0.02, shape))
    smoke = co * base["smoke_ratio"][:, None] * (1 + rng.normal(0, 0.03, shape))
    draws = rng.random(shape)
    light = np.where(base["lit"][:, None], daytime & (draws < 0.95), draws < 0.02)
    motion = rng.random(shape) < base["motion_rate"][:, None] * np.where(daytime, 2.0, 0.3)

    fault = np.zeros(shape, dtype=np.int8)
    for device, kind, start, length, magnitude in _fault_events(rng, devices, n):
        rows = slice(start, start + length)
        fault[device, rows] = kind
        if kind == _SPIKE:
            temp[device, rows] += magnitude
        elif kind == _STUCK:  # the temperature/humidity sensor freezes on its last reading
            temp[device, rows] = temp[device, start]
            humidity[device, rows] = humidity[device, start]
        elif kind == _DRIFT:
            temp[device, rows] += np.linspace(0.0, magnitude, length)
        else:  # dropout: the sensor reports its floor value, which gold features can see
            temp[device, rows] = 0.0
            humidity[device, rows] = 0.0
    humidity = np.clip(humidity, 0.0, 100.0)

    names = np.array([f"device-{i + 1:02d}" for i in range(devices)], dtype=object)
    # Transposed so rows are time-major (all devices at t0, then t1, ...) like a real landing file.
    return {
        "ts": np.broadcast_to(midnight + offsets, shape).T.ravel(),
        "device": np.broadcast_to(names[:, None], shape).T.ravel(),
        "co": np.round(co, 7).T.ravel(),
        "humidity": np.round(humidity, 2).T.ravel(),
        "light": light.T.ravel(),
        "lpg": np.round(lpg, 7).T.ravel(),
        "motion": motion.T.ravel(),
        "smoke": np.round(smoke, 7).T.ravel(),
        "temp": np.round(temp, 3).T.ravel(),
        "fault": _LABELS[fault.T.ravel()],
    }


def _fault_events(rng: np.random.Generator, devices: int, n: int) -> list[tuple[int, int, int, int, float]]:
    """Non-overlapping (device, kind, start, length, magnitude) events, about 3% of rows in all.

    Every fault type occurs at least once per day so that any day can serve as evaluation data.
    """
    kinds_by_device: list[list[int]] = []
    for _ in range(devices):
        kinds = [_SPIKE] * (1 + rng.poisson(2.0 * min(1.0, n / 1440)))
        kinds += [k for k, p in ((_STUCK, 0.6), (_DRIFT, 0.6), (_DROPOUT, 0.5)) if rng.random() < p]
        kinds_by_device.append(kinds)
    for kind in (_SPIKE, _STUCK, _DRIFT, _DROPOUT):
        if not any(kind in kinds for kinds in kinds_by_device):
            kinds_by_device[int(rng.integers(devices))].append(kind)

    events = []
    for device, kinds in enumerate(kinds_by_device):
        kinds = list(rng.permutation(kinds))[:n]  # a coarse day cannot hold more events than rows
        segment = n // len(kinds)
        for i, kind in enumerate(kinds):
            length = {
                _SPIKE: int(rng.integers(1, 4)),
                _STUCK: max(3, round(rng.uniform(0.01, 0.02) * n)),
                _DRIFT: max(5, round(rng.uniform(0.015, 0.03) * n)),
                _DROPOUT: max(2, round(rng.uniform(0.004, 0.01) * n)),
            }[int(kind)]
            length = max(1, min(length, segment))
            start = i * segment + int(rng.integers(0, segment - length + 1))
            sign = 1.0 if rng.random() < 0.75 else -1.0
            magnitude = sign * (rng.uniform(10.0, 25.0) if kind == _SPIKE else rng.uniform(4.0, 10.0))
            events.append((device, int(kind), start, length, magnitude))
    return events


def stream_readings(start_date: dt.date, days: int, devices: int = 4, freq_seconds: int = 60, seed: int = 42):
    """The same telemetry as `simulate_telemetry`, as the messages a device sends: one dict per
    reading, time-major (all devices at t0, then t1, ...), each with ``seq``, the device's own
    counter from 0 (MQTT has no sequence numbers: a receiver recognises redeliveries by it).

    Booleans and the fault label are as in the landed CSV (true/false, "" for normal)."""
    _check_args(days, devices, freq_seconds)
    seqs: dict[str, int] = {}
    for i in range(days):
        cols = _simulate_day(start_date + dt.timedelta(days=i), devices, freq_seconds, seed)
        records = _frame(cols).to_dict("records")
        for record in records:
            device = record["device"]
            seq = seqs.get(device, 0)
            seqs[device] = seq + 1
            yield {
                "device": device,
                "seq": seq,
                "ts": int(record["ts"]),
                "co": float(record["co"]),
                "humidity": float(record["humidity"]),
                "light": bool(record["light"]),
                "lpg": float(record["lpg"]),
                "motion": bool(record["motion"]),
                "smoke": float(record["smoke"]),
                "temp": float(record["temp"]),
                "fault": record["fault"],
            }
