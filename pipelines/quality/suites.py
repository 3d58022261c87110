"""Great Expectations suites, one per lake layer and dataset, built as code from the source contract.

The physical ranges, required columns and keys come from the contract only; the per-dataset
`config` dict only tunes *how strict* a check is (severity, `mostly`, tolerances), never *what*
the valid physical range is.

Config (all keys optional; a key may also be nested under the layer name, e.g.
``{"silver": {"severity": {...}}}``, which wins over the flat key)::

    severity:  {"expect_column_values_to_be_between": "warning",          # every such check
                "expect_column_values_to_be_between:humidity": "warning"}  # one column only
    mostly:    {"expect_column_values_to_be_between": 0.999, "<type>:<column>": 0.99}
    known_devices: ["device-1", ...]     # silver: device must be in this set
    device_pattern: "^device-\\d+$"      # silver: else device must match this regex
                                         # (default: the contract's entity constant if any)
    future_tolerance_seconds: 300        # silver: ts <= now + tolerance
    reference_k: 6                       # gold: mean within reference mean +/- k * reference std
    anomaly_rate: [0.0, 0.5]             # gold: bounds of the is_anomaly rate

GX is imported inside the functions: importing this module stays cheap for DAG parsing.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import great_expectations as gx
    import pandas as pd


def quiet_gx_logging(level: int = logging.WARNING) -> None:
    """Keep GX's own logger at WARNING: when the root logger is at INFO/DEBUG (as in Airflow task
    processes), importing GX alone emits 100+ "Skipping registering function" lines and every
    validation logs store and type-lookup chatter. Must run before the first GX import, and again
    after it: one GX module pins its own logger to INFO when imported."""
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(level)


# Cheap (no GX import) and scoped to GX's logger; call quiet_gx_logging(logging.DEBUG) to debug GX.
quiet_gx_logging()

Layer = Literal["bronze", "silver", "gold"]
LAYERS: tuple[str, ...] = ("bronze", "silver", "gold")

CRITICAL = "critical"
WARNING = "warning"

LINEAGE_COLUMNS: tuple[str, ...] = (
    "_source_key",
    "_source_etag",
    "_source_line",
    "_ingest_run_id",
    "_ingested_at",
)
PARSE_ERROR_COLUMN = "_parse_error"
# Derived by the gold gate (not stored): which features of a row are NaN/inf, null when none is.
NONFINITE_FEATURES_COLUMN = "_nonfinite_features"
# Derived by the gold gate (not stored): one row per feature whose mean left its reference band.
DRIFTED_FEATURES_COLUMN = "_drifted_features"
# Gold columns that are identifiers or labels, not model features.
GOLD_NON_FEATURE_COLUMNS: frozenset[str] = frozenset({"device", "ts", "event_date", "label", "is_anomaly"})


DEFAULT_FUTURE_TOLERANCE_SECONDS = 300.0
DEFAULT_REFERENCE_K = 6.0
DEFAULT_ANOMALY_RATE = (0.0, 0.5)

# Checks that only warn unless the dataset config says otherwise.
_DEFAULT_WARNING_TYPES = frozenset({"expect_column_mean_to_be_between", "expect_table_columns_to_match_set"})

# Contract type -> GX pandas `type_` (ExpectColumnValuesToBeOfType compares dtype.type; "str"
# matches pandas 3's `str` dtype and, value by value, object columns holding Python str).
_SILVER_TYPES = {"float64": "float64", "bool": "bool", "string": "str"}


def _section(config: Mapping[str, Any] | None, layer: str, key: str, default: Any = None) -> Any:
    """A config value for this layer: ``config[layer][key]`` first, then ``config[key]``."""
    if not config:
        return default
    layered = config.get(layer)
    if isinstance(layered, Mapping) and key in layered:
        return layered[key]
    return config.get(key, default)


def _lookup(table: Mapping[str, Any] | None, expectation_type: str, column: str | None) -> Any:
    if not table:
        return None
    if column is not None and f"{expectation_type}:{column}" in table:
        return table[f"{expectation_type}:{column}"]
    return table.get(expectation_type)


class _SuiteBuilder:
    """Adds expectations with severity and `mostly` resolved from the dataset config."""

    def __init__(self, layer: str, dataset: str, config: Mapping[str, Any] | None) -> None:
        self.layer = layer
        self.dataset = dataset
        self.config = config or {}
        self.severity_table = _section(config, layer, "severity", {}) or {}
        self.mostly_table = _section(config, layer, "mostly", {}) or {}
        self.expectations: list = []

    def add(
        self,
        cls: type,
        *,
        column: str | None = None,
        mostly_allowed: bool = False,
        extra_meta: dict | None = None,
        default_severity: str | None = None,
        **kwargs: Any,
    ) -> None:
        expectation_type = _expectation_type(cls)
        severity = _lookup(self.severity_table, expectation_type, column) or default_severity
        if severity is None:
            severity = WARNING if expectation_type in _DEFAULT_WARNING_TYPES else CRITICAL
        if severity not in (CRITICAL, WARNING):
            raise ValueError(
                f"quality config for {self.layer}: severity {severity!r} for {expectation_type}"
                f"{':' + column if column else ''} must be 'critical' or 'warning'"
            )
        if column is not None:
            kwargs["column"] = column
        if mostly_allowed:
            mostly = _lookup(self.mostly_table, expectation_type, column)
            if mostly is not None:
                kwargs["mostly"] = float(mostly)
        meta = {"severity": severity, "layer": self.layer, **(extra_meta or {})}
        # GX 1.x also has a native `severity` field (critical/warning/info): set both so GX's own
        # tooling (get_max_severity_failure, Data Docs) and our gate agree.
        self.expectations.append(cls(severity=severity, meta=meta, **kwargs))

    def suite(self) -> gx.ExpectationSuite:
        import great_expectations as gx

        # Passing the expectations to the constructor (not add_expectation) needs no active GX
        # context: suites can be built and inspected without one.
        return gx.ExpectationSuite(
            name=suite_name(self.layer, self.dataset),
            expectations=self.expectations,
            meta={"layer": self.layer, "dataset": self.dataset},
        )


def _expectation_type(cls: type) -> str:
    from great_expectations.util import camel_to_snake

    return camel_to_snake(cls.__name__)


def suite_name(layer: str, dataset: str) -> str:
    return f"{dataset}.{layer}"


def build_suite(
    layer: Layer,
    contract: Any,
    *,
    config: dict | None = None,
    reference: pd.DataFrame | dict | None = None,
    columns: Iterable[str] | None = None,
    expected_row_count: int | None = None,
    now: dt.datetime | None = None,
) -> gx.ExpectationSuite:
    """The expectation suite for one layer of one dataset.

    `columns` (gold) are the partition's columns: every one that is not an identifier or label
    is a feature to check; without it the features are taken from `reference`, else the
    contract's float64 columns, and the label-balance check assumes `is_anomaly` exists.
    `expected_row_count` (bronze) adds the check that the partition has as many rows as the
    source file has data lines. `now`
    (silver) is the clock for the no-future-timestamps check (default: the current UTC time).
    """
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}: expected one of {', '.join(LAYERS)}")
    builder = _SuiteBuilder(layer, contract.name, config)
    if layer == "bronze":
        _bronze(builder, contract, expected_row_count, columns)
    elif layer == "silver":
        _silver(builder, contract, now)
    else:
        _gold(builder, contract, reference, columns)
    return builder.suite()


def _entity_column(contract: Any) -> str:
    entity = getattr(contract, "entity", None)
    return getattr(entity, "column", None) or "device"


def _time_column(contract: Any) -> str:
    event_time = getattr(contract, "event_time", None)
    return getattr(event_time, "column", None) or "ts"


def _bronze(b: _SuiteBuilder, contract: Any, expected_row_count: int | None, columns: Iterable[str] | None) -> None:
    import great_expectations.expectations as gxe

    # Bronze keeps the delivered header, so the check is on the *source* column names.
    required = getattr(contract, "required_source_columns", None)
    if required is None:
        required = [getattr(c, "source", c.name) for c in contract.columns if getattr(c, "required", True)]
    for name in required:
        b.add(gxe.ExpectColumnToExist, column=name)
    b.add(gxe.ExpectTableRowCountToBeBetween, min_value=1)
    if expected_row_count is not None:
        b.add(gxe.ExpectTableRowCountToEqual, value=int(expected_row_count))
    for name in LINEAGE_COLUMNS:
        b.add(gxe.ExpectColumnValuesToNotBeNull, column=name)
    # Columns the contract does not know are kept in bronze as delivered and ignored by silver;
    # this check (a warning unless configured otherwise) makes them visible in the report.
    known = getattr(contract, "source_columns", None)
    if known is not None:
        if columns is not None:  # an optional column (e.g. the label) may be absent: not a finding
            present = set(columns)
            known = [c for c in known if c in present or c in required]
        b.add(
            gxe.ExpectTableColumnsToMatchSet,
            column_set=[*known, PARSE_ERROR_COLUMN, *LINEAGE_COLUMNS],
            exact_match=True,
        )


def _silver(b: _SuiteBuilder, contract: Any, now: dt.datetime | None) -> None:
    import great_expectations.expectations as gxe

    device, ts = _entity_column(contract), _time_column(contract)
    keys = list(getattr(contract, "keys", None) or [device, ts])

    b.add(gxe.ExpectColumnValuesToBeOfType, column=device, type_="str")
    # "Timestamp" is the scalar type of tz-aware datetime64 columns: a naive ts column fails.
    b.add(gxe.ExpectColumnValuesToBeOfType, column=ts, type_="Timestamp")
    for col in contract.columns:
        gx_type = _SILVER_TYPES.get(str(col.type))
        if gx_type is not None:
            b.add(gxe.ExpectColumnValuesToBeOfType, column=col.name, type_=gx_type)
    # Ranges and the clock check come from the same rules that fill the quarantine (one definition:
    # the contract, through pipelines.layers.silver.silver_rules), so gate and quarantine agree.
    rules = _silver_row_rules(b, contract, now)
    for rule in rules:
        if rule.name.startswith("range:"):
            b.add(
                gxe.ExpectColumnValuesToBeBetween,
                column=rule.column,
                mostly_allowed=True,
                min_value=rule.min_value,
                max_value=rule.max_value,
                extra_meta={"rule": rule.name},
            )
    label = getattr(contract, "label", None)
    label_column = getattr(label, "column", None) or "label"
    # Nulls are skipped: a delivery without labels has an all-null label column.
    b.add(gxe.ExpectColumnValuesToBeOfType, column=label_column, type_="str")
    b.add(gxe.ExpectColumnValuesToNotBeNull, column="event_date")

    for key in keys:
        b.add(gxe.ExpectColumnValuesToNotBeNull, column=key)
    if len(keys) > 1:
        b.add(gxe.ExpectCompoundColumnsToBeUnique, column_list=keys)
    else:
        b.add(gxe.ExpectColumnValuesToBeUnique, column=keys[0])

    (future,) = [r for r in rules if r.name == "future_timestamp"]
    b.add(
        gxe.ExpectColumnValuesToBeBetween,
        column=ts,
        max_value=future.max_value,
        extra_meta={"rule": future.name},
    )

    known = _section(b.config, "silver", "known_devices")
    pattern = _section(b.config, "silver", "device_pattern")
    constant = getattr(getattr(contract, "entity", None), "constant", None)
    if known:
        b.add(gxe.ExpectColumnValuesToBeInSet, column=device, mostly_allowed=True, value_set=list(known))
    elif pattern:
        b.add(gxe.ExpectColumnValuesToMatchRegex, column=device, mostly_allowed=True, regex=pattern)
    elif constant is not None:
        b.add(gxe.ExpectColumnValuesToBeInSet, column=device, value_set=[constant])


def _silver_row_rules(b: _SuiteBuilder, contract: Any, now: dt.datetime | None) -> list:
    from pipelines.layers.silver import silver_rules

    tolerance = float(_section(b.config, "silver", "future_tolerance_seconds", DEFAULT_FUTURE_TOLERANCE_SECONDS))
    return silver_rules(contract, now=now, future_tolerance=dt.timedelta(seconds=tolerance))


def gold_feature_columns(columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c not in GOLD_NON_FEATURE_COLUMNS and not c.startswith("_")]


def _finite_mostly(b: _SuiteBuilder) -> float | None:
    """`mostly` for the all-features-finite check: its own key, else the strictest of the per-feature
    keys it replaces (NaN was expect_column_values_to_not_be_null, inf ..._to_be_between). It is now
    the fraction of *rows* whose features are all finite, so it is at least as strict as before."""
    own = _lookup(b.mostly_table, "expect_column_values_to_be_null", NONFINITE_FEATURES_COLUMN)
    if own is not None:
        return float(own)
    legacy = [
        _lookup(b.mostly_table, t, None)
        for t in ("expect_column_values_to_not_be_null", "expect_column_values_to_be_between")
    ]
    legacy = [float(v) for v in legacy if v is not None]
    return max(legacy) if legacy else None


def nonfinite_features(df: pd.DataFrame, features: Iterable[str] | None = None) -> pd.Series:
    """Per gold row: None when every feature is finite, else which features are NaN/inf, e.g.
    ``"device-01 2026-01-05 00:04:00+00:00: temp_zscore=nan, hour_sin=inf"`` (the gate's examples).

    Vectorised over the feature matrix; strings are built for the offending rows only.
    """
    import numpy as np
    import pandas as pd

    features = [c for c in (gold_feature_columns(df.columns) if features is None else features) if c in df]
    out = pd.Series(None, index=df.index, dtype=object)
    if not features or not len(df):
        return out
    bad_columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in features:
        values = df[name].to_numpy(dtype="float64", na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            bad_columns[name] = (bad, values)
    if not bad_columns:
        return out
    any_bad = np.logical_or.reduce([bad for bad, _ in bad_columns.values()])
    described = np.full(int(any_bad.sum()), "", dtype=object)
    for name, (bad, values) in bad_columns.items():
        here = bad[any_bad]
        text = np.char.add(f"{name}=", values[bad].astype(str)).astype(object)
        sep = np.where(described[here] == "", "", ", ").astype(object)
        described[here] = described[here] + sep + text
    where = [c for c in ("device", "ts") if c in df]
    if where:
        rows = df.loc[any_bad, where].astype(str)
        prefix = rows.iloc[:, 0].to_numpy(dtype=object)
        for c in where[1:]:
            prefix = prefix + " " + rows[c].to_numpy(dtype=object)
        described = prefix + ": " + described
    out[any_bad] = described
    return out


def reference_k(config: Mapping[str, Any] | None) -> float:
    """Width of the drift band in reference standard deviations (``quality.<dataset>.gold.reference_k``)."""
    return float(_section(config, "gold", "reference_k", DEFAULT_REFERENCE_K))


def drifted_features(df: pd.DataFrame, reference: dict[str, Any] | None, k: float) -> pd.Series:
    """Per gold row: None, except one row per feature whose mean (over its finite values) is outside
    the reference band ``mean +/- max(k * std, rounding noise)``; that row says which feature, its
    mean, the band and where the band came from. Rows are only carriers of the messages: the
    expectation's unexpected count is the number of drifting features."""
    import numpy as np
    import pandas as pd

    out = pd.Series(None, index=df.index, dtype=object)
    if not reference or not reference.get("features") or not len(df):
        return out
    messages = []
    for name, stats in reference["features"].items():
        if name not in df:
            continue  # a missing feature is the column-set check's finding
        values = df[name].to_numpy(dtype="float64", na_value=np.nan)
        values = values[np.isfinite(values)]
        if not values.size:
            continue  # no finite value: the finiteness check's finding
        mean, ref_mean, ref_std = float(values.mean()), float(stats["mean"]), float(stats["std"])
        # A constant reference feature would give a zero-width band: allow rounding noise.
        half_width = max(k * ref_std, 1e-9 * max(1.0, abs(ref_mean)))
        if not ref_mean - half_width <= mean <= ref_mean + half_width:
            messages.append(
                f"{name}: mean {mean:.6g} outside [{ref_mean - half_width:.6g}, {ref_mean + half_width:.6g}] "
                f"(reference mean {ref_mean:.6g}, std {ref_std:.6g}, k {k:g}, {stats.get('rows', '?')} rows)"
            )
    if len(messages) > len(out):  # fewer rows than drifting features: the last row holds the rest
        messages[len(out) - 1 :] = ["; ".join(messages[len(out) - 1 :])]
    out.iloc[: len(messages)] = messages
    return out


def reference_profile(gold: pd.DataFrame) -> dict[str, Any]:
    """What the drift check needs of a reference gold partition: its columns and, per feature,
    mean, std and count of its finite values. Stored in the gold manifest, so the next
    partition's gate reads a few hundred bytes instead of the whole previous partition."""
    import numpy as np

    features = {}
    for name in gold_feature_columns(gold.columns):
        values = gold[name].to_numpy(dtype="float64", na_value=np.nan)
        values = values[np.isfinite(values)]
        if values.size:
            features[name] = {"mean": float(values.mean()), "std": float(values.std()), "rows": int(values.size)}
    return {"columns": list(gold.columns), "features": features}


def combine_profiles(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """One profile from the profiles of disjoint parts of a partition (device buckets): pooled
    mean and population std of each feature, as if computed over the whole partition."""
    import math

    if len(profiles) == 1:
        return profiles[0]
    features: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(n for p in profiles for n in p["features"]):
        parts = [p["features"][name] for p in profiles if name in p["features"]]
        rows = sum(part["rows"] for part in parts)
        mean = sum(part["mean"] * part["rows"] for part in parts) / rows
        second = sum((part["std"] ** 2 + part["mean"] ** 2) * part["rows"] for part in parts) / rows
        features[name] = {"mean": mean, "std": math.sqrt(max(second - mean**2, 0.0)), "rows": rows}
    return {"columns": profiles[0]["columns"], "features": features}


def _gold(
    b: _SuiteBuilder, contract: Any, reference: pd.DataFrame | dict | None, columns: Iterable[str] | None
) -> None:
    import great_expectations.expectations as gxe

    if reference is not None and not isinstance(reference, dict):
        reference = reference_profile(reference)
    has_labels = True
    if columns is not None:
        columns = list(columns)
        features: Iterable[str] = gold_feature_columns(columns)
        has_labels = "is_anomaly" in columns
    elif reference is not None:
        features = gold_feature_columns(reference["columns"])
    else:
        features = [c.name for c in contract.columns if str(c.type) == "float64"]
    features = list(features)

    # Structure: rows exist, the entity/time keys are set and unique, every expected feature exists.
    b.add(gxe.ExpectTableRowCountToBeBetween, min_value=1)
    for key in ("device", "ts"):
        b.add(gxe.ExpectColumnValuesToNotBeNull, column=key)
    b.add(gxe.ExpectCompoundColumnsToBeUnique, column_list=["device", "ts"])
    if reference is not None:
        # Every feature of the reference is still there (one table-level check, not one per feature;
        # the reference's features, not the partition's own: those would exist by definition).
        b.add(
            gxe.ExpectTableColumnsToMatchSet,
            column_set=gold_feature_columns(reference.get("columns") or features),
            exact_match=False,
            default_severity=_lookup(b.severity_table, "expect_column_to_exist", None) or CRITICAL,
        )

    # NaN and +/-inf in any feature, in one expectation over the whole feature matrix: the gate
    # adds the derived column (see `nonfinite_features`), null where every feature is finite and
    # naming the offending features and values elsewhere. One check instead of two per feature
    # keeps the gate's cost flat in the number of features (GX's per-expectation overhead, not
    # the data, dominated the ~150-expectation suite).
    mostly = _finite_mostly(b)
    b.add(
        gxe.ExpectColumnValuesToBeNull,
        column=NONFINITE_FEATURES_COLUMN,
        extra_meta={"rule": "features_finite", "features": features},
        **({"mostly": mostly} if mostly is not None else {}),
    )

    if reference is not None and reference["features"]:
        # Drift: each feature's mean within the reference mean +/- k std, in one expectation over a
        # derived column (see `drifted_features`): one row per drifting feature, naming it, its mean
        # and its band. One check instead of one per feature: GX's per-expectation cost, not the
        # data, made the ~100-expectation suite the largest part of a gold task (0.75 s per bucket).
        k = reference_k(b.config)
        b.add(
            gxe.ExpectColumnValuesToBeNull,
            column=DRIFTED_FEATURES_COLUMN,
            # severity of the per-feature mean checks this replaces, when the config names it
            default_severity=_lookup(b.severity_table, "expect_column_mean_to_be_between", None) or WARNING,
            extra_meta={"rule": "features_within_reference", "k": k, "features": len(reference["features"])},
        )

    if has_labels:
        lo, hi = _section(b.config, "gold", "anomaly_rate", DEFAULT_ANOMALY_RATE)
        b.add(
            gxe.ExpectColumnMeanToBeBetween,
            column="is_anomaly",
            min_value=float(lo),
            max_value=float(hi),
        )
