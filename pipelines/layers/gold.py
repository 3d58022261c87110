"""Gold: model-ready features per device from silver rows, computed from past and current readings only.

Rolling statistics restart at each partition unless the caller passes `warmup`: the last few silver
rows before the partition (at least `window - 1` per device). Warm-up rows feed the rolling windows
and the previous-reading delta, and are dropped from the output.

Missing readings (null in silver) are carried forward from the device's previous reading; a device
whose first readings are missing gets 0.0 until its first reading, since nothing earlier is known.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.contracts import Contract

META_COLUMNS = ("device", "ts", "event_date", "label", "is_anomaly")
ROLLING_SUFFIXES = ("roll_mean", "roll_std", "roll_min", "roll_max")
# Rolling std of a constant run comes out as ~1e-9 from float cancellation; treat it as exactly 0.
_STD_EPSILON = 1e-9
# Long-horizon baseline, in readings per device (4 h at the simulator's one reading a minute).
LONG_WINDOW = 240


def warmup_rows(window: int, long_window: int = LONG_WINDOW) -> int:
    """Rows per device a caller should pass as ``warmup`` so no feature restarts at a partition edge."""
    return max(window, long_window)


def to_gold(
    silver: pd.DataFrame,
    contract: Contract,
    window: int = 15,
    warmup: pd.DataFrame | None = None,
    long_window: int = LONG_WINDOW,
) -> pd.DataFrame:
    """Features per (device, ts): raw value, rolling mean/std/min/max, delta, z-score, flat-line count,
    long-horizon deviation; hour_sin/cos.

    - ``{col}_flat_count``: readings in the last ``window`` whose value equals the previous reading
      (a stuck sensor repeats its last value exactly; live sensors jitter);
    - ``{col}_long_dev``: value minus the median of the last ``long_window`` readings (a slow drift
      hides inside the short window but stands out against hours of history).

    Numeric columns are those of the contract that are not entirely null in `silver`; booleans become 0/1.
    """
    if window < 1 or long_window < 1:
        raise ValueError(f"window={window}, long_window={long_window}: both must be >= 1 reading")
    device, ts = contract.entity.column, contract.event_time.column
    frame = silver.assign(_warmup=False)
    if warmup is not None and len(warmup):
        # Only rows strictly before the partition: anything later would leak the future into features.
        earlier = warmup[warmup[ts] < silver[ts].min()] if len(silver) else warmup.iloc[0:0]
        frame = pd.concat([earlier.assign(_warmup=True), frame], ignore_index=True)
    frame = frame.sort_values([device, ts], kind="stable").reset_index(drop=True)
    groups = frame.groupby(device, sort=False)

    features: dict[str, pd.Series] = {}
    for col in contract.numeric_columns:
        if col not in silver or silver[col].isna().all():
            continue
        value = groups[col].ffill().fillna(0.0).astype("float64")
        by_device = value.groupby(frame[device], sort=False)
        rolling = by_device.rolling(window, min_periods=1)
        mean = rolling.mean().reset_index(level=0, drop=True).sort_index()
        std = rolling.std().reset_index(level=0, drop=True).sort_index().fillna(0.0)
        std = std.where(std > _STD_EPSILON * (1.0 + mean.abs()), 0.0)
        features[col] = value
        features[f"{col}_roll_mean"] = mean
        features[f"{col}_roll_std"] = std
        features[f"{col}_roll_min"] = rolling.min().reset_index(level=0, drop=True).sort_index()
        features[f"{col}_roll_max"] = rolling.max().reset_index(level=0, drop=True).sort_index()
        features[f"{col}_delta"] = by_device.diff().fillna(0.0)
        zscore = (value - mean) / std.where(std > 0)
        features[f"{col}_zscore"] = zscore.fillna(0.0)
        # the first reading of a device has no previous one: not counted as flat
        repeated = (by_device.diff() == 0).astype("float64")
        flat = repeated.groupby(frame[device], sort=False).rolling(window, min_periods=1).sum()
        features[f"{col}_flat_count"] = flat.reset_index(level=0, drop=True).sort_index()
        long_median = by_device.rolling(long_window, min_periods=1).median()
        features[f"{col}_long_dev"] = value - long_median.reset_index(level=0, drop=True).sort_index()
    for col in contract.bool_columns:
        if col not in silver or silver[col].isna().all():
            continue
        filled = groups[col].ffill().astype("float64").fillna(0.0)
        features[col] = filled

    seconds = (frame[ts] - frame[ts].dt.floor("D")).dt.total_seconds()
    angle = 2 * np.pi * seconds / 86_400.0
    features["hour_sin"] = np.sin(angle)
    features["hour_cos"] = np.cos(angle)

    label = frame["label"] if "label" in frame else pd.Series(pd.NA, index=frame.index, dtype="str")
    event_date = frame["event_date"] if "event_date" in frame else frame[ts].dt.date
    gold = pd.DataFrame(
        {
            "device": frame[device].astype("str"),
            "ts": frame[ts].astype("datetime64[us, UTC]"),
            "event_date": event_date,
            "label": label.astype("str"),
            "is_anomaly": anomaly_flags(label),
        }
        | {name: pd.Series(values, index=frame.index).astype("float64") for name, values in features.items()}
    )
    return gold[~frame["_warmup"].to_numpy()].reset_index(drop=True)


def anomaly_flags(label: pd.Series) -> pd.Series:
    """1 for a labelled fault, 0 for "normal", <NA> where the label is unknown (Int8)."""
    flags = pd.Series(pd.NA, index=label.index, dtype="Int8")
    known = label.notna()
    flags[known] = (label[known] != "normal").astype("int8")
    return flags


def feature_columns(gold: pd.DataFrame) -> list[str]:
    """Every column that is not metadata, in gold's column order (stable for a given contract and data)."""
    return [c for c in gold.columns if c not in META_COLUMNS]
