"""Event-time partitioning: which partition (a day, or a month for long histories) each record belongs to.

A partition is named by the ISO date it starts on: ``2026-01-05`` for a day, ``2013-12-01`` for the
month of December 2013 when the dataset's ``grain`` is ``month``.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from pipelines.contracts import Contract

UNPARSEABLE = None  # records whose event time can't be read stay with their delivery date
GRAINS = ("day", "month")


def _check_grain(grain: str) -> None:
    if grain not in GRAINS:
        raise ValueError(f"grain={grain!r}: use one of {GRAINS} (datasets.<name>.grain in params.yaml)")


def partition_of(date: str, grain: str = "day") -> str:
    """The partition an ISO event date belongs to."""
    _check_grain(grain)
    return date if grain == "day" else f"{date[:7]}-01"


def partition_bounds(partition: str, grain: str = "day") -> tuple[pd.Timestamp, pd.Timestamp]:
    """[start, end) of a partition in UTC."""
    _check_grain(grain)
    start = pd.Timestamp(partition).tz_localize("UTC")
    if grain == "day":
        return start, start + pd.Timedelta(days=1)
    return start, start + pd.DateOffset(months=1)


def next_partition(partition: str, grain: str = "day") -> str:
    return partition_bounds(partition, grain)[1].date().isoformat()


def previous_partition(partition: str, grain: str = "day") -> str:
    start = pd.Timestamp(partition)
    prev = start - (pd.Timedelta(days=1) if grain == "day" else pd.DateOffset(months=1))
    return prev.date().isoformat()


def event_dates(batch: pa.Table | pa.RecordBatch, contract: Contract) -> pd.Series:
    """ISO event date (UTC) per record, parsed exactly as silver parses it; None when unreadable."""
    # One parser for both layers, so bronze never files a record under a date silver disagrees with.
    # Implausible times (another epoch unit, a 1970 clock reset) count as unreadable: they stay
    # with the delivery, where silver quarantines them, instead of creating partitions like 58181-12-20.
    from pipelines.layers.silver import _parse_event_time

    et = contract.event_time
    if et.source not in batch.schema.names:
        return pd.Series([UNPARSEABLE] * batch.num_rows, dtype="object")
    text = batch.column(et.source).to_pandas().astype("str")
    ts, _, _ = _parse_event_time(text, et)
    dates = ts.dt.strftime("%Y-%m-%d")
    return dates.astype("object").where(ts.notna(), UNPARSEABLE)


def split_by_event_date(
    table: pa.Table, contract: Contract, delivery_date: str, grain: str = "day"
) -> dict[str, pa.Table]:
    """Group a delivered batch by event-time partition; unreadable timestamps go to the delivery's
    own partition, where silver quarantines them with the rule they break (nothing is dropped)."""
    by_day = _split_by_day(table, contract, delivery_date)
    if grain == "day":
        return by_day
    _check_grain(grain)
    grouped: dict[str, list[pa.Table]] = {}
    for day, part in by_day.items():
        grouped.setdefault(partition_of(day, grain), []).append(part)
    return {p: parts[0] if len(parts) == 1 else pa.concat_tables(parts) for p, parts in sorted(grouped.items())}


def _split_by_day(table: pa.Table, contract: Contract, delivery_date: str) -> dict[str, pa.Table]:
    import numpy as np

    if table.num_rows == 0:
        return {}
    et = contract.event_time
    days = None
    if et.source_format == "epoch_seconds" and et.source in table.schema.names:
        from pipelines.layers.silver import _plausible_bounds

        earliest, latest = _plausible_bounds(et)
        days = _epoch_day_numbers(table.column(et.source), earliest.timestamp(), latest.timestamp())
    if days is None:  # the shared parser's path: any format, messy values
        dates = event_dates(table, contract).fillna(delivery_date).to_numpy()
        return {day: table.filter(pa.array(dates == day)) for day in sorted(set(dates))}
    unique = np.unique(days)
    if len(unique) == 1:  # the usual delivery: one day, no copy
        return {str(np.datetime64(int(unique[0]), "D")): table}
    out: dict[str, pa.Table] = {}
    for day in unique:
        name = str(np.datetime64(int(day), "D"))
        out[name] = table.filter(pa.array(days == day))
    return out


def _epoch_day_numbers(column, earliest: float, latest: float):
    """Days since 1970 per record, vectorised in Arrow/numpy for clean epoch-second columns
    (the common case). None when any value needs the shared parser's judgement, including a
    value outside the plausible [earliest, latest] seconds."""
    import numpy as np
    import pyarrow.compute as pc

    try:
        seconds = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        return None
    values = seconds.to_numpy(zero_copy_only=False)
    if seconds.null_count or not np.isfinite(values).all():
        return None
    if len(values) and (values.min() < earliest or values.max() > latest):
        return None
    return np.floor(values / 86400).astype("int64")


def plan_device_buckets(rows_per_device: dict[str | None, int], max_rows: int) -> list[list[str | None]]:
    """Devices grouped into buckets of about `max_rows` rows, in sorted device order, each device
    in exactly one bucket (a device larger than `max_rows` gets a bucket of its own). Rows without
    a device go into the first bucket, where silver quarantines them.

    Contiguous ranges of sorted devices keep the concatenated output of the buckets in the same
    (device, ts) order as one unbucketed pass would produce."""
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: a bucket must hold at least one row")
    named = sorted(d for d in rows_per_device if d is not None)
    buckets: list[list[str | None]] = [[None]] if None in rows_per_device else [[]]
    filled = rows_per_device.get(None, 0)
    for device in named:
        rows = rows_per_device[device]
        if buckets[-1] and filled + rows > max_rows:
            buckets.append([])
            filled = 0
        buckets[-1].append(device)
        filled += rows
    return [b for b in buckets if b]
