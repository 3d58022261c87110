"""Silver: bronze rows typed, unit-normalised and deduplicated per the contract; rule breakers quarantined.

Every bronze row ends in exactly one place: silver, quarantine (with the first `rule` it broke and a
`reason` listing every rule it broke), or collapsed into an identical delivery of the same reading.
The number collapsed is in `silver.attrs["collapsed_duplicates"]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.contracts import EPOCH_SECONDS, Contract, convert_units
from pipelines.layers.bronze import LINEAGE_COLUMNS, PARSE_ERROR_COLUMN

SILVER_LINEAGE = ("_source_key", "_source_line")
QUARANTINE_EXTRA = ("rule", "reason")
# Device clocks run a little ahead; beyond this a reading "from the future" is a clock or parsing bug.
FUTURE_TOLERANCE = timedelta(minutes=5)
_TRUE = frozenset({"true", "1", "t", "yes", "y"})
_FALSE = frozenset({"false", "0", "f", "no", "n"})
_MISSING = frozenset({"", "nan", "na", "n/a", "null", "none"})
# A reading time after this is a unit or parsing bug (epoch milliseconds read as seconds give the
# year 58181), never a reading: it is quarantined, and bronze never files it under such a date.
LATEST_PLAUSIBLE = pd.Timestamp("2100-01-01", tz="UTC")
_EPOCH_UNITS = (("milliseconds", 1e3), ("microseconds", 1e6), ("nanoseconds", 1e9))
# Device ids are names a person reads in a report: printable, and bounded so one runaway field
# (a 10 KB id) cannot bloat every key, index and log line downstream.
DEVICE_MAX_CHARS = 200
_MISSING_SPELLINGS = pa.array(
    sorted({v for m in _MISSING for v in (m, m.upper(), m.capitalize())} | {"NaN", "N/a"}), pa.large_string()
)
_MISSING_TOKENS = pa.array(sorted(_MISSING), pa.large_string())
_TRUE_TOKENS = pa.array(sorted(_TRUE), pa.large_string())
_FALSE_TOKENS = pa.array(sorted(_FALSE), pa.large_string())


@dataclass(frozen=True)
class Rule:
    """A contract rule checked on typed (silver-shaped) rows; the quality module reuses these."""

    name: str  # "range:temp", "not_null:ts", "finite:co", "future_timestamp"
    column: str
    description: str  # what must hold, e.g. "temp within physical range [-40, 125] celsius"
    # True where a row breaks the rule, as a numpy bool array (a missing value breaks only not_null):
    # numpy, not a pandas Series, because a stream's micro-batch checks ~25 rules a pass and pandas'
    # per-call overhead was most of their cost.
    test: Callable[[pd.DataFrame], np.ndarray]
    explanation: str  # follows "<column>=<value> " in a quarantine reason
    # The bounds a value must lie in, when the rule is a range: the GX silver suite builds its
    # between-expectations from these, so quarantine and gate share one definition.
    min_value: float | str | None = None
    max_value: float | str | None = None
    quoted: bool = False  # show the value as a bounded repr (ids with NUL bytes or 10 KB of text)

    def violations(self, frame: pd.DataFrame) -> pd.Series:
        """True where a row of `frame` breaks the rule."""
        return pd.Series(self.test(frame), index=frame.index)

    def reasons(self, frame: pd.DataFrame, mask: pd.Series) -> pd.Series:
        values = frame.loc[mask, self.column].astype(object).where(frame.loc[mask, self.column].notna(), "<missing>")
        shown = values.astype(str)
        if self.quoted:
            shown = shown.map(lambda v: repr(v[:80]) + (f"... ({len(v)} characters)" if len(v) > 80 else ""))
        return f"{self.column}=" + shown + f" {self.explanation}"


def silver_rules(
    contract: Contract,
    *,
    now: datetime | None = None,
    partition: str | None = None,
    future_tolerance: timedelta = FUTURE_TOLERANCE,
    grain: str = "day",
    device_pattern: str | None = None,
) -> list[Rule]:
    """The contract's row rules, in the order quarantine reports them. Ranges come only from the contract.

    With `partition` (an event date, YYYY-MM-DD), rows whose event date is another day break
    `outside_partition`: bronze routes records by event date, so such a row was misrouted and is
    quarantined rather than published into a partition it does not belong to. Device ids must be
    printable and at most DEVICE_MAX_CHARS long, and match `device_pattern` (default: the contract's
    `entity.pattern`), matched in ASCII mode.
    """
    rules: list[Rule] = []
    ts, device = contract.event_time.column, contract.entity.column
    required = [device, ts] + [c.name for c in contract.columns if c.required]
    for col in required:
        rules.append(
            Rule(
                name=f"not_null:{col}",
                column=col,
                description=f"{col} is present",
                test=lambda f, c=col: np.asarray(pd.isna(f[c].array), dtype=bool),
                explanation=f"is required by contract {contract.name!r}",
            )
        )
    if contract.entity.source is not None:
        rules += _device_rules(contract, device_pattern or getattr(contract.entity, "pattern", None))
    for spec in contract.columns:
        if spec.type != "float64":
            continue
        col = spec.name
        rules.append(
            Rule(
                name=f"finite:{col}",
                column=col,
                description=f"{col} is finite",
                test=lambda f, c=col: np.isinf(_floats(f[c])),
                explanation="is infinite; sensors cannot report infinity",
            )
        )
        if spec.range is not None:
            lo, hi = spec.range
            bounds = f"[{lo:g}, {hi:g}] {spec.unit or ''}".rstrip()
            rules.append(
                Rule(
                    name=f"range:{col}",
                    column=col,
                    description=f"{col} within physical range {bounds}",
                    test=lambda f, c=col, lo=lo, hi=hi: _outside(_floats(f[c]), lo, hi),
                    explanation=f"outside physical range {bounds}",
                    min_value=lo,
                    max_value=hi,
                )
            )
    limit = pd.Timestamp(now or datetime.now(UTC)) + future_tolerance
    limit = limit.tz_localize("UTC") if limit.tzinfo is None else limit.tz_convert("UTC")
    rules.append(
        Rule(
            name="future_timestamp",
            column=ts,
            description=f"{ts} not after ingestion time (+{future_tolerance})",
            test=lambda f: _times(f[ts]) > limit.to_datetime64(),
            explanation=(
                f"is later than ingestion time + {future_tolerance} ({limit.isoformat()}); check the device clock"
            ),
            max_value=limit.isoformat(),
        )
    )
    if partition is not None:
        from pipelines.layers.partitioning import partition_bounds

        start, end = partition_bounds(_partition_date(partition), grain)
        span = f"event date {start.date()}" if grain == "day" else f"event month {start.strftime('%Y-%m')}"
        rules.append(
            Rule(
                name="outside_partition",
                column=ts,
                description=f"{ts} in the partition's {span} (UTC)",
                test=lambda f: _outside_span(_times(f[ts]), start, end),
                explanation=(
                    f"is not in the partition's {span} (UTC); land it under its "
                    "own date (the lake will route rows by event date)"
                ),
            )
        )
    return rules


def _device_rules(contract: Contract, pattern: str | None) -> list[Rule]:
    device = contract.entity.column

    def unprintable(f: pd.DataFrame) -> np.ndarray:
        return _per_distinct(f[device], lambda v: not v.isprintable())

    def too_long(f: pd.DataFrame) -> np.ndarray:
        return _per_distinct(f[device], lambda v: len(v) > DEVICE_MAX_CHARS)

    rules = [
        Rule(
            name=f"printable:{device}",
            column=device,
            description=f"{device} holds printable characters only",
            test=unprintable,
            explanation="holds control or other unprintable characters (NUL, tab, newline...); fix the device's id",
            quoted=True,
        ),
        Rule(
            name=f"max_length:{device}",
            column=device,
            description=f"{device} is at most {DEVICE_MAX_CHARS} characters",
            test=too_long,
            explanation=f"is longer than {DEVICE_MAX_CHARS} characters; fix the device's id",
            quoted=True,
        ),
    ]
    if pattern:
        compiled = re.compile(pattern, re.ASCII)  # `\d` is 0-9 only: 'device-٢' is not a device number
        rules.append(
            Rule(
                name=f"pattern:{device}",
                column=device,
                description=f"{device} matches {pattern!r}",
                test=lambda f: _per_distinct(f[device], lambda v: compiled.search(v) is None),
                explanation=f"does not match the contract's device pattern {pattern!r} (ASCII); fix the device's id",
                quoted=True,
            )
        )
    return rules


def _per_distinct(values: pd.Series, broken: Callable[[str], bool]) -> np.ndarray:
    """`broken(value)` per row, evaluated once per distinct non-null value (ids repeat a lot)."""
    text = _arrow_text(values.to_frame("v"), "v", len(values))
    encoded = pc.dictionary_encode(text)
    codes = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), dtype="int64")
    flags = np.array([bool(broken(u)) for u in encoded.dictionary.to_pylist()] + [False], dtype=bool)
    return flags[codes]


def _floats(values: pd.Series) -> np.ndarray:
    return values.to_numpy(dtype="float64", na_value=np.nan)


def _outside(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (values < lo) | (values > hi)  # NaN compares False: a missing value is not_null's business


def _times(values: pd.Series) -> np.ndarray:
    """datetime64[us] in UTC of a time column, NaT where missing (NaT compares False)."""
    return values.to_numpy(dtype="datetime64[us]")


def _outside_span(ts: np.ndarray, start: pd.Timestamp, end: pd.Timestamp) -> np.ndarray:
    return (ts < start.to_datetime64()) | (ts >= end.to_datetime64())  # tz-aware: UTC datetime64


def _partition_date(partition: str) -> str:
    """'2026-01-05' from '2026-01-05' or 'event_date=2026-01-05'."""
    return str(partition).rsplit("=", 1)[-1]


def to_silver(
    bronze: pa.Table | pd.DataFrame,
    contract: Contract,
    *,
    now: datetime | None = None,
    partition: str | None = None,
    grain: str = "day",
    device_pattern: str | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(silver, quarantine) from a bronze table. `now` is the ingestion time used for future timestamps.

    `partition` is the event date being built; rows of another date are quarantined as
    `outside_partition` (a guard: bronze already routes each record to its event date's partition,
    so this only catches a misrouted record). Without it the check is skipped.
    A timestamp that parses but is not plausible (another epoch unit, before the contract's
    `event_time.earliest`, after LATEST_PLAUSIBLE) breaks `plausible_time:<ts>`, its reason naming the likely cause.
    """
    raw = bronze.to_pandas() if isinstance(bronze, pa.Table) else bronze.reset_index(drop=True)
    delivered = [c for c in raw.columns]
    typed, type_errors = type_bronze(raw, contract)

    rule_names = pd.Series(pd.NA, index=raw.index, dtype="object")
    reasons: dict[int, list[str]] = {}  # only rows that broke a rule: usually few

    def record(mask: pd.Series, name: str, why: pd.Series) -> None:
        mask = mask.fillna(False).astype(bool)
        if not mask.any():
            return
        rule_names[mask & rule_names.isna()] = name
        for i, text in why.items():
            reasons.setdefault(i, []).append(text)

    malformed = raw[PARSE_ERROR_COLUMN].notna() if PARSE_ERROR_COLUMN in raw else pd.Series(False, index=raw.index)
    record(malformed, "parse_error", "malformed line: " + raw.loc[malformed, PARSE_ERROR_COLUMN].astype(str))
    # A malformed line has no fields to check; reporting each as missing would bury the real reason.
    type_errors = {c: m & ~malformed for c, m in type_errors.items()}
    et = contract.event_time
    for col, mask in type_errors.items():
        why = (
            col
            + "="
            + raw.loc[mask, _source_of(contract, col)].astype(str).map(repr)
            + f" is not a valid {_type_name(contract, col)}"
        )
        if col == et.column and mask.any():
            why += _time_format_hints(raw.loc[mask, et.source].astype(str), et)
        record(mask, f"type:{col}", why)
    implausible = typed.attrs.pop("implausible_time", None)
    if implausible is not None:
        implausible = implausible & ~malformed
        if implausible.any():
            record(
                implausible,
                f"plausible_time:{et.column}",
                _implausible_time_reasons(raw.loc[implausible, et.source].astype(str), et),
            )
            # not "missing" either: the reason above says what the value is
            type_errors[et.column] = type_errors.get(et.column, implausible & False) | implausible
    for rule in silver_rules(contract, now=now, partition=partition, grain=grain, device_pattern=device_pattern):
        mask = rule.violations(typed).fillna(False).astype(bool) & ~malformed
        # A value that failed to parse is already reported as type:<col>; don't also call it missing.
        if rule.name.startswith("not_null:") and rule.column in type_errors:
            mask &= ~type_errors[rule.column]
        record(mask, rule.name, rule.reasons(typed, mask))

    failed = rule_names.notna()
    valid = typed[~failed]
    silver, duplicates, collapsed = _deduplicate(valid, contract)

    quarantine = raw[failed].copy()
    quarantine["rule"] = rule_names[failed].astype(str)
    quarantine["reason"] = pd.Series(
        ["; ".join(reasons.get(i, ())) for i in quarantine.index], index=quarantine.index, dtype="str"
    )
    if len(duplicates):
        dup = raw.loc[duplicates.index].copy()
        dup["rule"] = "duplicate_key"
        dup["reason"] = duplicates["reason"]
        quarantine = pd.concat([quarantine, dup])
    quarantine = quarantine.sort_index().reset_index(drop=True)[[*delivered, *QUARANTINE_EXTRA]]
    silver.attrs["collapsed_duplicates"] = collapsed
    return silver, quarantine


def type_bronze(raw: pa.Table | pd.DataFrame, contract: Contract) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """Canonical typed columns for every bronze row, and per column a mask of values that failed to parse.

    Missing values (empty, "NA", "NaN", ...) become null, not type errors; rules decide if null is allowed.
    `raw` is a bronze table (Arrow) or frame. Each column is typed with Arrow compute and numpy, and the
    frame is built once at the end: a live micro-batch of a few hundred readings is typed at a small
    fixed cost (pandas' per-call overhead, paid some 60 times, was 12 ms of it), and a large delivery
    is typed by vectorised kernels.
    """
    n = raw.num_rows if isinstance(raw, pa.Table) else len(raw)
    index = pd.RangeIndex(n) if isinstance(raw, pa.Table) else raw.index
    out: dict[str, Any] = {}
    errors: dict[str, np.ndarray] = {}
    et, entity = contract.event_time, contract.entity

    if entity.source is None:
        out[entity.column] = _str_array(pa.repeat(pa.scalar(entity.constant, pa.large_string()), n))
    else:
        device = _arrow_text(raw, entity.source, n)
        out[entity.column] = _str_array(_null_where(device, _missing(device)))

    micros, errors[et.column], implausible = _event_micros(_arrow_text(raw, et.source, n), et)
    ts = _utc_times(micros)
    out[et.column] = ts

    for spec in contract.columns:
        text = _arrow_text(raw, spec.source, n)
        if spec.type == "float64":
            values, errors[spec.name], _ = _parse_float(text)
            if spec.needs_conversion:
                values = np.asarray(convert_units(values, spec.source_unit, spec.unit), dtype="float64")
            out[spec.name] = values
            continue
        missing = _missing(text)
        if spec.type == "bool":
            truth, falsity = _bool_spellings(text)
            out[spec.name] = pd.arrays.BooleanArray(truth, ~(truth | falsity))
            errors[spec.name] = ~(truth | falsity) & ~missing
        else:
            out[spec.name] = _str_array(_null_where(text, missing))

    out["label"] = _labels(raw, contract, n)
    out["event_date"] = _dates(micros)
    key = _arrow_column(raw, "_source_key")
    out["_source_key"] = _str_array(key) if key is not None else np.full(n, pd.NA, dtype=object)
    line = _arrow_column(raw, "_source_line")
    out["_source_line"] = _int_array(line, n)
    # Ordering for "the latest delivery wins": by delivery, never by when a run happened to execute
    # (a backfill of an original after its correction must not revert it). Absent lineage
    # (hand-built frames) means row order.
    out["_delivery_order"] = delivery_order(raw).to_numpy()
    frame = pd.DataFrame(out, index=index, copy=False)
    errors = {c: pd.Series(m, index=index) for c, m in errors.items() if m.any()}
    if implausible.any():  # parsed, but not a plausible reading time: to_silver names the cause
        frame.attrs["implausible_time"] = pd.Series(implausible, index=index)
    return frame, errors


_STR = pd.Series([], dtype="str").dtype
_UTC_US = pd.DatetimeTZDtype("us", "UTC")
_LANDED_KEY = re.compile(r"/(\d{4}-\d{2}-\d{2})/([^/]+)$")  # s3://landing/<dataset>/<delivery date>/<name>
_LANDED_COPY = re.compile(r"^[^.]*\.(\d+)(?:\.|$)")  # <stem>.<n>.<ext>: the n-th file landed under one name


def delivery_order(raw: pa.Table | pd.DataFrame) -> pd.Series:
    """A sortable text per row saying when its delivery was made: the delivery date (from the landed
    key in `_source_key`), then the landing copy number (`name.2.csv` was landed after `name.csv`),
    then the ingestion time (which orders only what the first two leave equal: streamed readings,
    whose key names no date, fall back to their ingestion date and time).

    Evaluated once per distinct source: a delivery has few files and each row repeats its file's key."""
    n = raw.num_rows if isinstance(raw, pa.Table) else len(raw)
    index = pd.RangeIndex(n) if isinstance(raw, pa.Table) else raw.index
    if not _has_column(raw, "_source_key"):
        return pd.Series(pd.NA, index=index, dtype="object")
    # Distinct (key, ingestion time) pairs first: a delivery's rows repeat a handful of them, and
    # formatting a time per row was most of this function's cost on a large delivery.
    keys = pc.dictionary_encode(pc.fill_null(_arrow_text(raw, "_source_key", n), ""))
    key_codes = np.asarray(keys.indices.to_numpy(zero_copy_only=False), dtype="int64")
    key_uniques = keys.dictionary.to_pylist()
    stamped = raw.column("_ingested_at") if isinstance(raw, pa.Table) and _has_column(raw, "_ingested_at") else None
    if stamped is not None and pa.types.is_timestamp(stamped.type):  # bronze's own column: Arrow's kernels
        if stamped.type.tz is not None:
            stamped = stamped.cast(pa.timestamp(stamped.type.unit, "UTC"))
        encoded = pc.dictionary_encode(stamped.combine_chunks())
        time_codes = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), dtype="int64")
        whens = [t.strftime("%Y-%m-%dT%H:%M:%S.%f") for t in encoded.dictionary.to_pylist()] + [""]
    elif _has_column(raw, "_ingested_at"):
        times = raw["_ingested_at"] if isinstance(raw, pd.DataFrame) else raw.column("_ingested_at").to_pandas()
        time_codes, time_uniques = pd.factorize(pd.to_datetime(times, utc=True))
        whens = pd.Series(time_uniques).dt.strftime("%Y-%m-%dT%H:%M:%S.%f").fillna("").tolist() + [""]
    else:
        time_codes, whens = np.full(n, -1), [""]
    time_index = np.where(time_codes < 0, len(whens) - 1, time_codes)  # NaT: the last, ""
    codes, pair_uniques = pd.factorize(key_codes * len(whens) + time_index)
    orders = []
    for pair in pair_uniques.tolist():
        key, when = str(key_uniques[pair // len(whens)]), whens[pair % len(whens)]
        found = _LANDED_KEY.search(key)
        if found is None:
            orders.append(f"{when[:10]}|{0:06d}|{when}")
            continue
        copy = _LANDED_COPY.match(found.group(2))
        orders.append(f"{found.group(1)}|{int(copy.group(1)) if copy else 1:06d}|{when}")
    return pd.Series(np.array(orders, dtype=object)[codes], index=index, dtype="object")


def _deduplicate(valid: pd.DataFrame, contract: Contract) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Collapse identical re-deliveries; of conflicting ones keep the latest delivered, return the others."""
    keys = list(contract.keys)
    payload = [*contract.measurement_columns, "label"]
    ordered = valid.assign(_position=np.arange(len(valid))).sort_values(
        [*keys, "_delivery_order", "_source_line", "_position"], na_position="first", kind="stable"
    )
    if not _adjacent_keys_repeat(ordered, keys):  # the usual delivery: nothing to collapse or supersede
        silver = ordered[contract.silver_columns + list(SILVER_LINEAGE)].reset_index(drop=True)
        silver["ts"] = silver["ts"].astype("datetime64[us, UTC]")
        return silver, ordered.iloc[0:0].assign(reason=pd.Series(dtype="str")), 0
    exact = ordered.duplicated([*keys, *payload], keep="last")
    collapsed = int(exact.sum())
    ordered = ordered[~exact]
    superseded = ordered.duplicated(keys, keep="last")
    duplicates = ordered[superseded]
    kept = ordered[~superseded]
    if len(duplicates):
        winner = kept.set_index(keys)[["_source_key", "_source_line"]]
        won = winner.reindex(pd.MultiIndex.from_frame(duplicates[keys]))
        duplicates = duplicates.assign(
            reason=(
                f"({keys[0]}, {keys[1]})=("
                + duplicates[keys[0]].astype(str)
                + ", "
                + duplicates[keys[1]].astype(str)
                + ") delivered again with different values; kept the later delivery "
                + won["_source_key"].astype(str).to_numpy()
                + " line "
                + won["_source_line"].astype(str).to_numpy()
            )
        )
    silver = kept[contract.silver_columns + list(SILVER_LINEAGE)].reset_index(drop=True)
    silver["ts"] = silver["ts"].astype("datetime64[us, UTC]")
    return silver, duplicates, collapsed


def _adjacent_keys_repeat(ordered: pd.DataFrame, keys: list[str]) -> bool:
    """Whether any two consecutive rows of a key-sorted frame share their key (nulls equal)."""
    if len(ordered) < 2:
        return False
    same = np.ones(len(ordered) - 1, dtype=bool)
    for key in keys:
        codes = pd.factorize(ordered[key], use_na_sentinel=False)[0]
        same &= codes[1:] == codes[:-1]
    return bool(same.any())


_NAT = np.iinfo(np.int64).min  # NaT as int64


def _has_column(raw: pa.Table | pd.DataFrame, column: str) -> bool:
    return column in (raw.column_names if isinstance(raw, pa.Table) else raw.columns)


def _arrow_column(raw: pa.Table | pd.DataFrame, column: str) -> pa.Array | None:
    """A column of a bronze table or frame as one Arrow array, as stored; None when absent."""
    if isinstance(raw, pa.Table):
        if column not in raw.column_names:
            return None
        values = raw.column(column)
    else:
        if column not in raw:
            return None
        series = raw[column]
        try:
            values = pa.array(series.array, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed objects in a hand-built frame: their text
            values = pa.array(series.astype("str").array)
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _arrow_text(raw: pa.Table | pd.DataFrame, column: str, n: int) -> pa.Array:
    """A delivered column as Arrow text (large_string), all null when the file has no such column."""
    values = _arrow_column(raw, column)
    if values is None:  # optional delivered column absent from this file
        return pa.nulls(n, pa.large_string())
    if values.type == pa.large_string():
        return values
    if pa.types.is_string(values.type) or pa.types.is_null(values.type):
        return values.cast(pa.large_string())
    # bronze's text columns are already text; a hand-built frame's numbers are read as pandas writes them
    series = values.to_pandas() if not isinstance(raw, pd.DataFrame) else raw[column]
    return pa.array(series.astype("str").array).cast(pa.large_string())


def _str_array(values: pa.Array) -> pd.api.extensions.ExtensionArray:
    """pandas' "str" column over Arrow text, without a copy."""
    return pd.arrays.ArrowStringArray(pa.chunked_array([values.cast(pa.large_string())]), dtype=_STR)


def _null_where(values: pa.Array, mask: np.ndarray) -> pa.Array:
    if not mask.any():
        return values
    return pc.if_else(pa.array(mask), pa.scalar(None, values.type), values)


def _int_array(values: pa.Array | None, n: int) -> pd.arrays.IntegerArray:
    """A nullable Int64 column (bronze's `_source_line`)."""
    if values is None:
        return pd.arrays.IntegerArray(np.zeros(n, dtype="int64"), np.ones(n, dtype=bool))
    if not pa.types.is_integer(values.type):
        return pd.array(values.to_pandas(), dtype="Int64")
    nulls = np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    data = pc.fill_null(values.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    return pd.arrays.IntegerArray(np.asarray(data, dtype="int64"), nulls)


def _lowered(text: pa.Array) -> pa.Array:
    """Each value without surrounding blanks, in lower case (what pandas' .str.strip().str.lower()
    does on Arrow text: the same kernels)."""
    return pc.utf8_lower(pc.utf8_trim_whitespace(text))


def _missing(text: pa.Array) -> np.ndarray:
    """Null or a missing-value token, ignoring case and surrounding blanks."""
    token = pc.is_in(_lowered(text), value_set=_MISSING_TOKENS)  # false for null: is_null says it
    return np.asarray(pc.or_(token, pc.is_null(text)).to_numpy(zero_copy_only=False), dtype=bool)


def _bool_spellings(text: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(true, false) masks of the spellings in _TRUE/_FALSE (any case, blanks around); neither: null."""
    lowered = _lowered(text)
    truth = pc.fill_null(pc.is_in(lowered, value_set=_TRUE_TOKENS), False).to_numpy(zero_copy_only=False)
    falsity = pc.fill_null(pc.is_in(lowered, value_set=_FALSE_TOKENS), False).to_numpy(zero_copy_only=False)
    return np.asarray(truth, dtype=bool), np.asarray(falsity, dtype=bool)


def _parse_float(arrow: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float64 values, mask of values that are not numbers, mask of missing values).

    Missing values become null, not errors. Arrow's parser takes the common case (clean numbers,
    usual spellings of missing) in one pass; it accepts a subset of what pandas accepts, so a
    column it rejects (blanks around numbers, an odd spelling of missing, a bad value) is parsed
    again by pandas, which reports the bad values one by one."""
    quick_missing = pc.or_(pc.is_in(arrow, value_set=_MISSING_SPELLINGS), pc.is_null(arrow))
    try:
        parsed = pc.cast(pc.if_else(quick_missing, pa.scalar(None, arrow.type), arrow), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        missing = _missing(arrow)
        series = pd.Series(_str_array(arrow)).where(~missing)
        values = pd.to_numeric(series, errors="coerce").astype("float64").to_numpy()
        return values, np.isnan(values) & ~missing, missing
    values = np.asarray(parsed.to_numpy(zero_copy_only=False), dtype="float64")
    missing = np.asarray(quick_missing.to_numpy(zero_copy_only=False), dtype=bool)
    nan = np.isnan(values) & ~missing
    if nan.any():  # parsed as NaN: "nan" in another case is missing, "-nan" is not a number (as in pandas)
        missing |= nan & _missing(arrow)
    return values, np.isnan(values) & ~missing, missing


def _time_micros(text: pa.Array, source_format: str, timezone: str) -> tuple[np.ndarray, np.ndarray]:
    """(UTC microseconds since the epoch, NaT as `_NAT`; mask of values that are not times)."""
    if source_format == EPOCH_SECONDS:
        seconds, _, missing = _parse_float(text)
        with np.errstate(invalid="ignore", over="ignore"):
            micros = np.round(seconds * 1_000_000)
            valid = np.isfinite(micros) & (np.abs(micros) <= 9.2e18)
        out = np.full(len(micros), _NAT, dtype="int64")
        out[valid] = micros[valid].astype("int64")
    else:
        missing = _missing(text)
        stripped = pd.Series(_str_array(pc.utf8_trim_whitespace(text))).where(~missing)
        ts = pd.to_datetime(stripped, format=source_format, errors="coerce")
        if ts.dt.tz is None:
            ts = ts.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
        out = ts.dt.tz_convert("UTC").astype("datetime64[us, UTC]").to_numpy(dtype="datetime64[us]").view("int64")
    return out, (out == _NAT) & ~missing


def _utc_times(micros: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """A datetime64[us, UTC] column of microseconds (`_NAT`: NaT)."""
    return pd.arrays.DatetimeArray._from_sequence(micros.view("datetime64[us]"), dtype=_UTC_US)


def _dates(micros: np.ndarray) -> np.ndarray:
    """The UTC date of each time, as `Series.dt.date` gives it (datetime.date; NaT where missing)."""
    days = np.where(micros == _NAT, _NAT, micros // 86_400_000_000).view("datetime64[D]")
    dates = days.astype(object)
    missing = micros == _NAT
    if missing.any():
        dates[missing] = pd.NaT
    return dates


def _parse_time(text: pd.Series, source_format: str, timezone: str) -> tuple[pd.Series, pd.Series]:
    """`_time_micros` of a pandas text column: (UTC timestamps, unparseable mask)."""
    micros, unparseable = _time_micros(_arrow_text(text.to_frame("v"), "v", len(text)), source_format, timezone)
    return pd.Series(_utc_times(micros), index=text.index), pd.Series(unparseable, index=text.index)


def _event_micros(text: pa.Array, et) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(UTC microseconds, unparseable mask, implausible mask) of the contract's event time.

    Implausible values (before `et.earliest`, after LATEST_PLAUSIBLE, or epoch numbers too large
    for any timestamp) are NaT, so bronze files them under the delivery date, never under
    the year 58181, and silver quarantines them as `plausible_time`."""
    micros, unparseable = _time_micros(text, et.source_format, et.timezone)
    earliest, latest = (t.value // 1000 for t in _plausible_bounds(et))  # ns -> us
    present = micros != _NAT
    implausible = present & ((micros < earliest) | (micros > latest))
    if et.source_format == EPOCH_SECONDS and unparseable.any():
        seconds, not_number, _ = _parse_float(text)
        too_large = unparseable & ~not_number & np.isfinite(seconds)  # a number beyond datetime64
        implausible |= too_large
        unparseable &= ~too_large
    micros = np.where(implausible, _NAT, micros)
    return micros, unparseable, implausible


def _parse_event_time(text: pd.Series, et) -> tuple[pd.Series, pd.Series, pd.Series]:
    """`_event_micros` of a pandas text column: (UTC timestamps, unparseable, implausible)."""
    micros, unparseable, implausible = _event_micros(_arrow_text(text.to_frame("v"), "v", len(text)), et)
    return (
        pd.Series(_utc_times(micros), index=text.index),
        pd.Series(unparseable, index=text.index),
        pd.Series(implausible, index=text.index),
    )


def _plausible_bounds(et) -> tuple[pd.Timestamp, pd.Timestamp]:
    earliest = pd.Timestamp(getattr(et, "earliest", None) or "2000-01-01")
    earliest = earliest.tz_localize("UTC") if earliest.tzinfo is None else earliest.tz_convert("UTC")
    return earliest, LATEST_PLAUSIBLE


def _implausible_time_reasons(text: pd.Series, et) -> pd.Series:
    """Why each (parseable) timestamp is not plausible, naming the likely unit when it is one."""
    earliest, latest = _plausible_bounds(et)
    lo, hi = earliest.timestamp(), latest.timestamp()
    shown = et.column + "=" + text.map(repr)
    if et.source_format == EPOCH_SECONDS:
        seconds = pd.to_numeric(text.str.strip(), errors="coerce").astype("float64")
    else:
        ts, _ = _parse_time(text, et.source_format, et.timezone)
        seconds = ts.astype("int64").astype("float64") / 1e6
    reasons = pd.Series(f" is after {latest.date()}: not a plausible reading time", index=text.index)
    if et.source_format == EPOCH_SECONDS:
        unknown = pd.Series(True, index=text.index)
        for unit, factor in _EPOCH_UNITS:
            as_seconds = seconds / factor
            fits = unknown & (as_seconds >= lo) & (as_seconds <= hi)
            if fits.any():
                when = _utc_text(as_seconds[fits])
                reasons[fits] = (
                    f" looks like epoch {unit} (" + when + f"); the contract declares {EPOCH_SECONDS}: "
                    f"deliver seconds, or write a contract for this source"
                )
                unknown &= ~fits
    before = seconds < lo
    if before.any():
        reasons[before] = (
            " is "
            + _utc_text(seconds[before])
            + f", before the contract's earliest plausible time {et.earliest} (a device clock reset?); "
            "fix the device clock, or set event_time.earliest in the contract if such readings are real"
        )
    return shown + reasons


def _utc_text(seconds: pd.Series) -> pd.Series:
    return pd.to_datetime((seconds * 1e6).round().astype("int64"), unit="us", utc=True).dt.strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def _time_format_hints(text: pd.Series, et) -> pd.Series:
    """A hint after "is not a valid timestamp" when the value is a timestamp in another format."""
    hints = pd.Series("", index=text.index)
    stripped = text.str.strip()
    iso = pd.to_datetime(stripped, format="ISO8601", errors="coerce", utc=True)
    hints[iso.notna()] = f" (looks like an ISO 8601 date-time; the contract declares {et.source_format!r})"
    if et.source_format != EPOCH_SECONDS:
        numbers = pd.to_numeric(stripped, errors="coerce")
        lo, hi = (t.timestamp() for t in _plausible_bounds(et))
        for unit, factor in (("seconds", 1.0), *_EPOCH_UNITS):
            fits = iso.isna() & (numbers / factor >= lo) & (numbers / factor <= hi)
            hints[fits] = f" (looks like epoch {unit}; the contract declares {et.source_format!r})"
    return hints


def _labels(raw: pa.Table | pd.DataFrame, contract: Contract, n: int) -> pd.api.extensions.ExtensionArray:
    """The label as delivered (trimmed, lower case), "normal" for the contract's normal values and blanks."""
    if contract.label is None or not _has_column(raw, contract.label.source):
        return _str_array(pa.nulls(n, pa.large_string()))
    text = pc.fill_null(_lowered(_arrow_text(raw, contract.label.source, n)), "")
    normal = pc.is_in(text, value_set=pa.array(sorted(contract.label.normal_values), pa.large_string()))
    return _str_array(pc.if_else(normal, "normal", text))


def _source_of(contract: Contract, column: str) -> str:
    if column == contract.event_time.column:
        return contract.event_time.source
    return contract.column(column).source


def _type_name(contract: Contract, column: str) -> str:
    if column == contract.event_time.column:
        return f"timestamp ({contract.event_time.source_format})"
    return contract.column(column).type


__all__ = ["LINEAGE_COLUMNS", "Rule", "silver_rules", "to_silver", "type_bronze"]
