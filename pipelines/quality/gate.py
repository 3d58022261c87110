"""Quality gates: validate one lake partition with its layer's GX suite and block on critical failures.

One GX context per process (ephemeral unless the caller passes its own, e.g. a file context with a
Data Docs site), one pandas datasource, one dataframe asset + batch definition per dataset/layer.
GX is imported lazily so `import pipelines.quality` stays cheap for Airflow DAG parsing.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.quality.suites import (
    CRITICAL,
    DRIFTED_FEATURES_COLUMN,
    NONFINITE_FEATURES_COLUMN,
    WARNING,
    Layer,
    build_suite,
    drifted_features,
    gold_feature_columns,
    nonfinite_features,
    quiet_gx_logging,
    reference_k,
    reference_profile,
    suite_name,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

DATASOURCE_NAME = "lake"
BATCH_DEFINITION_NAME = "partition"
EXAMPLES_PER_EXPECTATION = 5
# SUMMARY gives unexpected counts and a few unexpected values without COMPLETE's per-row index
# lists, which cost time and memory on large partitions.
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 20}

_context: Any = None
# (id(context), suite name) -> (context, what the suite was built from, its validation definition):
# bronze gates every record batch of a file with the same suite, so it is stored once, not per batch.
_definitions: dict[tuple[int, str], tuple[Any, Any, Any]] = {}


class QualityGateError(RuntimeError):
    """A partition failed at least one critical expectation; `result` holds the full report."""

    def __init__(self, message: str, result: GateResult) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self):  # picklable with its result: it crosses from a bucket worker to the task
        return type(self), (self.args[0], self.result), self.__dict__


@dataclass
class ExpectationOutcome:
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_between"
    column: str | None  # column (or "a,b" for compound checks); None for table-level checks
    success: bool
    severity: str  # "critical" | "warning"
    unexpected_count: int
    unexpected_percent: float
    examples: list  # a few unexpected values (or the observed value of an aggregate check)
    kwargs: dict = field(default_factory=dict)  # the rule: min_value, max_value, value_set, ...
    observed_value: Any = None
    error: str | None = None  # GX raised while evaluating (e.g. the column is missing)

    def describe(self) -> str:
        where = f" on column {self.column!r}" if self.column else ""
        rule = ", ".join(
            f"{k}=<{len(v)} items>" if isinstance(v, list) and len(v) > 8 else f"{k}={v!r}"
            for k, v in self.kwargs.items()
        )
        text = f"{self.expectation}{where}" + (f" [{rule}]" if rule else "")
        if self.error:
            return f"{text}: could not be evaluated: {self.error}"
        parts = []
        mismatch = self.examples[0] if self.examples and isinstance(self.examples[0], dict) else None
        if mismatch and not self.success and ("unexpected" in mismatch or "missing" in mismatch):
            # table-level column checks: the differing names, not the whole observed list
            found = {k: v for k, v in mismatch.items() if v}
            return f"{text}: " + ", ".join(f"{k} columns {v!r}" for k, v in found.items())
        if self.unexpected_count:
            parts.append(f"{self.unexpected_count} unexpected ({self.unexpected_percent:.3g}%)")
        if self.observed_value is not None:
            parts.append(f"observed {self.observed_value!r}")
        if self.examples and self.unexpected_count:
            parts.append(f"e.g. {self.examples!r}")
        return f"{text}: " + (", ".join(parts) if parts else "failed")


@dataclass
class GateResult:
    layer: str
    dataset: str
    partition: str
    success: bool  # no critical failures (warnings allowed)
    outcomes: list[ExpectationOutcome]
    statistics: dict
    raw: dict  # the GX validation result, .to_json_dict()

    @property
    def critical_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity == CRITICAL]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success and o.severity != CRITICAL]

    def summary(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        lines = [f"GX {self.layer} gate {self.dataset} partition={self.partition}: {status}"]
        for o in self.critical_failures + self.warnings:
            lines.append(f"  {o.severity.upper():8s} {o.describe()}")
        s = self.statistics
        lines.append(
            f"  totals: {s.get('evaluated_expectations', 0)} evaluated, "
            f"{s.get('successful_expectations', 0)} passed, {len(self.critical_failures)} critical failed, "
            f"{len(self.warnings)} warnings; {s.get('rows', 0)} rows; {s.get('duration_seconds', 0):.2f}s"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return _jsonable(
            {
                "layer": self.layer,
                "dataset": self.dataset,
                "partition": self.partition,
                "success": self.success,
                "outcomes": [asdict(o) for o in self.outcomes],
                "statistics": self.statistics,
                "raw": self.raw,
            }
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> GateResult:
        return cls(
            layer=data["layer"],
            dataset=data["dataset"],
            partition=data["partition"],
            success=bool(data["success"]),
            outcomes=[ExpectationOutcome(**o) for o in data.get("outcomes", [])],
            statistics=dict(data.get("statistics", {})),
            raw=dict(data.get("raw", {})),
        )

    def metrics(self) -> dict[str, float]:
        s, p = self.statistics, f"gx_{self.layer}"
        return {
            f"{p}_success_percent": float(s.get("success_percent") or 0.0),
            f"{p}_evaluated": float(s.get("evaluated_expectations", 0)),
            f"{p}_failed": float(s.get("unsuccessful_expectations", 0)),
            f"{p}_critical_failed": float(len(self.critical_failures)),
            f"{p}_warnings": float(len(self.warnings)),
            f"{p}_rows": float(s.get("rows", 0)),
            f"{p}_duration_seconds": float(s.get("duration_seconds", 0.0)),
        }


def quality_context() -> Any:
    """The process-wide ephemeral GX context, created on first use, without progress bars."""
    global _context
    if _context is None:
        import great_expectations as gx

        quiet_gx_logging()
        context = gx.get_context(mode="ephemeral")
        disable_progress_bars(context)
        # The ephemeral context comes with a Data Docs site in a fresh temp dir; without sites,
        # validations skip the Checkpoint + UpdateDataDocsAction (most of the per-run cost).
        for site, site_config in list((context.list_data_docs_sites() or {}).items()):
            context.delete_data_docs_site(site)
            _remove_empty_dir(site_config.get("store_backend", {}).get("base_directory"))
        _context = context
    return _context


def _remove_empty_dir(path: str | None) -> None:
    # GX creates one temp dir per ephemeral context for its default docs site; do not leak it.
    if path:
        try:
            Path(path).rmdir()
        except OSError:
            pass


def _patch_gx_hot_spots() -> None:
    """Two GX 1.x costs that scale with rows and check nothing, removed without changing a result.

    - GX md5-hashes every row of each batch for a `pandas_data_fingerprint` batch marker that
      nothing here reads; on Arrow-backed string columns (bronze) it cost more than all checks.
    - Before every column mean/sum/std GX tests each value with `isinstance(v, Decimal)` in a
      Python loop (50M calls for 50 gold features x 1M rows, ~20 s); a numeric numpy array
      cannot hold a Decimal, so only object arrays need the scan.
    """
    import great_expectations.util as gx_util
    from great_expectations.execution_engine import pandas_execution_engine

    pandas_execution_engine.HASH_THRESHOLD = 0
    scan = gx_util.does_ndarray_contain_decimal_dtype
    if getattr(scan, "_object_arrays_only", False):
        return

    def contains_decimal(data: Any) -> bool:
        if getattr(getattr(data, "dtype", None), "kind", "O") != "O":
            return False
        return scan(data)

    contains_decimal._object_arrays_only = True  # type: ignore[attr-defined]
    gx_util.does_ndarray_contain_decimal_dtype = contains_decimal
    _patch_expectation_kwargs()


def _patch_expectation_kwargs() -> None:
    """GX 1.x rebuilds an expectation's whole `configuration` (a pydantic dict() with deep copies)
    once per key in its domain/success kwargs lookups: ~700 rebuilds per validation of an 8-check
    suite, most of a small bucket's gate time. The same lookups, reading one configuration per call;
    the values are identical (nothing changes the expectation in between)."""
    from great_expectations.expectations.expectation import Expectation, parse_result_format

    if getattr(Expectation._get_success_kwargs, "_one_configuration", False):
        return

    def _get_domain_kwargs(self, kwargs: dict | None = None) -> dict:
        # (GX's own version also checks for missing domain keys: its comprehension over every
        # domain key can never leave one out, so that check is not repeated here)
        kwargs = self.configuration.kwargs if kwargs is None else kwargs
        return {key: kwargs.get(key, self._get_default_value(key)) for key in self.domain_keys}

    def _get_success_kwargs(self, kwargs: dict | None = None) -> dict:
        kwargs = self.configuration.kwargs if kwargs is None else kwargs
        domain_kwargs = _get_domain_kwargs(self, kwargs)
        success_kwargs = {key: kwargs.get(key, self._get_default_value(key)) for key in self.success_keys}
        success_kwargs.update(domain_kwargs)
        return success_kwargs

    original_kwarg = Expectation._get_success_kwarg

    def _success_kwarg(self, kwargs: dict, key: str) -> Any:
        if key in kwargs:
            return kwargs[key]
        return original_kwarg(self, key)  # not configured: GX's own default lookup (and warning)

    def _get_runtime_kwargs(self, runtime_configuration: dict | None = None) -> dict:
        runtime_configuration = runtime_configuration or {}
        kwargs = self.configuration.kwargs
        success_kwargs = _get_success_kwargs(self, kwargs)
        runtime_kwargs = {
            key: runtime_configuration.get(key, _success_kwarg(self, kwargs, key)) for key in self.runtime_keys
        }
        runtime_kwargs.update(success_kwargs)
        runtime_kwargs["result_format"] = parse_result_format(runtime_kwargs["result_format"])
        return runtime_kwargs

    _get_success_kwargs._one_configuration = True  # type: ignore[attr-defined]
    Expectation._get_domain_kwargs = _get_domain_kwargs
    Expectation._get_success_kwargs = _get_success_kwargs
    Expectation._get_runtime_kwargs = _get_runtime_kwargs


def disable_progress_bars(context: Any) -> None:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # tqdm's "Calculating Metrics" bars flood the Airflow task log, one per validation.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)


def _batch_definition(context: Any, asset_name: str) -> Any:
    try:
        datasource = context.data_sources.get(DATASOURCE_NAME)
    except (KeyError, ValueError, LookupError):
        datasource = context.data_sources.add_pandas(DATASOURCE_NAME)
    try:
        asset = datasource.get_asset(asset_name)
    except (KeyError, LookupError, ValueError):
        asset = datasource.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION_NAME)
    except (KeyError, LookupError, ValueError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION_NAME)


def _replace_validation_definition(ctx: Any, suite: Any, batch_definition: Any) -> Any:
    """Store this run's suite and validation definition under the dataset/layer name.

    The suite changes on every run (clock, reference window), so the old one is dropped rather
    than merged: GX's add_or_update compares every expectation pairwise, which dominated the
    per-partition overhead.
    """
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

    for factory in (ctx.checkpoints, ctx.validation_definitions, ctx.suites):
        try:
            factory.delete(name=suite.name)
        except DataContextError:
            pass
    suite = ctx.suites.add(suite)
    return ctx.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite))


def _validation_definition(
    ctx: Any,
    layer: Layer,
    contract: Any,
    config: dict | None,
    reference: pd.DataFrame | dict | None,
    columns: list[str] | None,
    expected_row_count: int | None,
    now: dt.datetime | None = None,
) -> Any:
    """The stored validation definition for this suite, rebuilt only when its inputs changed.

    Silver's suite reads the clock and gold's a reference window, so those are rebuilt per call
    (once per partition); bronze, called once per record batch, reuses its definition.
    """
    key = None
    # Reusable when nothing time- or data-dependent changed: bronze always; silver for one clock
    # reading (the device buckets of one partition); gold for one reference profile.
    if (
        layer == "bronze"
        or (layer == "silver" and now is not None)
        or (layer == "gold" and (reference is None or isinstance(reference, dict)))
    ):
        key = (
            layer,
            id(contract),
            json.dumps(config, sort_keys=True, default=str),
            tuple(columns or ()),
            expected_row_count,
            now.isoformat() if now is not None else None,
            json.dumps(reference, sort_keys=True) if isinstance(reference, dict) else None,
        )
    cache_key = (id(ctx), suite_name(layer, contract.name))
    cached = _definitions.get(cache_key)
    if key is not None and cached is not None and cached[0] is ctx and cached[1] == key:
        return cached[2]
    suite = build_suite(
        layer,
        contract,
        config=config,
        reference=reference,
        columns=columns,
        expected_row_count=expected_row_count,
        now=now,
    )
    definition = _replace_validation_definition(ctx, suite, _batch_definition(ctx, suite.name))
    _definitions[cache_key] = (ctx, key, definition)
    return definition


def validate_partition(
    df: pd.DataFrame,
    layer: Layer,
    contract: Any,
    partition: str,
    *,
    config: dict | None = None,
    reference: pd.DataFrame | dict | None = None,
    context: Any = None,
    expected_row_count: int | None = None,
    now: dt.datetime | None = None,
) -> GateResult:
    """Validate one partition of one layer; never raises on bad data (see `enforce`).

    `now` (silver) is the clock for the no-future-timestamps check, default the current time: the
    device buckets of one partition pass the same one, so they share one suite.

    With a `context` that has Data Docs sites configured, the validation runs through a GX
    Checkpoint whose UpdateDataDocsAction refreshes those sites.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    started = time.perf_counter()
    ctx = context if context is not None else quality_context()
    if context is not None:
        disable_progress_bars(ctx)
    _patch_gx_hot_spots()
    columns = list(df.columns) if layer in ("gold", "bronze") else None
    if layer == "gold":
        # The derived columns the gold suite's finiteness and drift checks read; a cheap shallow copy.
        if reference is not None and not isinstance(reference, dict):
            reference = reference_profile(reference)
        k = reference_k(config)
        df = df.assign(
            **{
                NONFINITE_FEATURES_COLUMN: nonfinite_features(df, gold_feature_columns(columns)),
                DRIFTED_FEATURES_COLUMN: drifted_features(df, reference, k),
            }
        )
    definition = _validation_definition(ctx, layer, contract, config, reference, columns, expected_row_count, now)
    run_id = RunIdentifier(run_name=f"{partition}", run_time=dt.datetime.now(dt.UTC))
    batch_parameters = {"dataframe": df}

    if ctx.list_data_docs_sites():
        from great_expectations.checkpoint import UpdateDataDocsAction
        from great_expectations.exceptions import DataContextError

        try:  # a reused definition may still have the previous run's checkpoint
            ctx.checkpoints.delete(name=definition.name)
        except DataContextError:
            pass
        checkpoint = ctx.checkpoints.add(
            gx.Checkpoint(
                name=definition.name,
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="update_data_docs")],
                result_format=RESULT_FORMAT,
            )
        )
        checkpoint_result = checkpoint.run(batch_parameters=batch_parameters, run_id=run_id)
        validation = next(iter(checkpoint_result.run_results.values()))
    else:
        validation = definition.run(batch_parameters=batch_parameters, result_format=RESULT_FORMAT, run_id=run_id)

    raw = _jsonable(validation.to_json_dict())
    outcomes = [_outcome(r) for r in raw.get("results", [])]
    statistics = dict(raw.get("statistics", {}))
    statistics["rows"] = int(len(df))
    statistics["duration_seconds"] = round(time.perf_counter() - started, 4)
    result = GateResult(
        layer=layer,
        dataset=contract.name,
        partition=str(partition),
        success=not any(not o.success and o.severity == CRITICAL for o in outcomes),
        outcomes=outcomes,
        statistics=statistics,
        raw=raw,
    )
    # The caller prints the summary (progress): logging it too printed every gate twice in task logs.
    log.debug("%s", result.summary())
    return result


def enforce(result: GateResult) -> GateResult:
    """Raise QualityGateError when a critical expectation failed; warnings pass through."""
    failures = result.critical_failures
    if not failures:
        return result
    lines = [
        f"Quality gate failed: layer={result.layer} dataset={result.dataset} partition={result.partition}: "
        f"{len(failures)} critical expectation(s) failed on {result.statistics.get('rows', '?')} rows"
    ]
    lines += [f"  - {o.describe()}" for o in failures]
    lines.append(
        "Fix the delivery upstream (or quarantine the bad rows) and re-run; if the rule itself is wrong, "
        "change the contract (ranges, required columns) or the dataset's quality config (severity, mostly)."
    )
    raise QualityGateError("\n".join(lines), result)


_AGGREGATE_KWARGS_SKIP = {"batch_id", "column", "column_list", "result_format", "catch_exceptions"}


def _outcome(r: dict) -> ExpectationOutcome:
    config = r.get("expectation_config") or {}
    kwargs = dict(config.get("kwargs") or {})
    meta = config.get("meta") or {}
    severity = meta.get("severity") or config.get("severity") or CRITICAL
    if severity not in (CRITICAL, WARNING):
        severity = WARNING if severity == "info" else CRITICAL
    column = kwargs.get("column")
    if column is None and kwargs.get("column_list"):
        column = ",".join(kwargs["column_list"])
    result = r.get("result") or {}
    exception = r.get("exception_info") or {}
    error = exception.get("exception_message") if exception.get("raised_exception") else None
    examples = list(result.get("partial_unexpected_list") or [])[:EXAMPLES_PER_EXPECTATION]
    observed = result.get("observed_value")
    details = result.get("details") or {}
    if observed is not None and not examples and isinstance(details.get("mismatched"), dict):
        examples = [details["mismatched"]]
    if error is None and not r.get("success") and not examples and observed is not None:
        examples = [observed]
    return ExpectationOutcome(
        expectation=str(config.get("type", "unknown")),
        column=column,
        success=bool(r.get("success")),
        severity=severity,
        unexpected_count=int(result.get("unexpected_count") or 0),
        unexpected_percent=float(result.get("unexpected_percent") or 0.0),
        examples=examples,
        kwargs={k: v for k, v in kwargs.items() if k not in _AGGREGATE_KWARGS_SKIP and v is not None},
        observed_value=observed,
        error=error,
    )


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars unwrapped, NaN/inf as strings, timestamps as ISO text."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "shape", None) == ():  # numpy scalar
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    if isinstance(obj, dt.datetime | dt.date | dt.time):
        return obj.isoformat()
    isoformat = getattr(obj, "isoformat", None)  # pandas Timestamp / NaT
    if callable(isoformat):
        try:
            return str(isoformat())
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
