"""Event-date partitioning: which daily partition each delivered record belongs to."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from pipelines.contracts import Contract

UNPARSEABLE = None  # records whose event time can't be read stay with their delivery date


def event_dates(batch: pa.Table | pa.RecordBatch, contract: Contract) -> pd.Series:
    """ISO event date (UTC) per record, parsed exactly as silver parses it; None when unreadable."""
    # One parser for both layers, so bronze never files a record under a date silver disagrees with.
    from pipelines.layers.silver import _parse_time

    et = contract.event_time
    if et.source not in batch.schema.names:
        return pd.Series([UNPARSEABLE] * batch.num_rows, dtype="object")
    text = batch.column(et.source).to_pandas().astype("str")
    ts, _ = _parse_time(text, et.source_format, et.timezone)
    dates = ts.dt.strftime("%Y-%m-%d")
    return dates.astype("object").where(ts.notna(), UNPARSEABLE)


def split_by_event_date(table: pa.Table, contract: Contract, delivery_date: str) -> dict[str, pa.Table]:
    """Group a delivered batch by event date; unreadable timestamps go to the delivery's own date,
    where silver quarantines them with the rule they break (nothing is dropped)."""
    import numpy as np

    if table.num_rows == 0:
        return {}
    et = contract.event_time
    days = None
    if et.source_format == "epoch_seconds" and et.source in table.schema.names:
        days = _epoch_day_numbers(table.column(et.source))
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


def _epoch_day_numbers(column):
    """Days since 1970 per record, vectorised in Arrow/numpy for clean epoch-second columns
    (the common case). None when any value needs the shared parser's judgement."""
    import numpy as np
    import pyarrow.compute as pc

    try:
        seconds = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        return None
    values = seconds.to_numpy(zero_copy_only=False)
    if seconds.null_count or not np.isfinite(values).all() or np.abs(values).max(initial=0) > 9.2e12:
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
