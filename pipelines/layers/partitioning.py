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
    if table.num_rows == 0:
        return {}
    dates = event_dates(table, contract).fillna(delivery_date).to_numpy()
    out: dict[str, pa.Table] = {}
    for day in sorted(set(dates)):
        mask = pa.array(dates == day)
        out[day] = table.filter(mask)
    return out
