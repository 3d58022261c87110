"""Data quality gates: Great Expectations suites per lake layer and dataset, validation, Data Docs.

Importing this package does not import GX (slow, chatty); GX loads on the first validation.
"""

from pipelines.quality.docs import (
    add_local_site,
    build_data_docs,
    download_data_docs,
    publish_data_docs,
    stored_validation_results,
)
from pipelines.quality.gate import (
    ExpectationOutcome,
    GateResult,
    QualityGateError,
    enforce,
    quality_context,
    validate_partition,
)
from pipelines.quality.suites import (
    CRITICAL,
    GOLD_NON_FEATURE_COLUMNS,
    LINEAGE_COLUMNS,
    WARNING,
    build_suite,
    gold_feature_columns,
    quiet_gx_logging,
    suite_name,
)

__all__ = [
    "CRITICAL",
    "GOLD_NON_FEATURE_COLUMNS",
    "LINEAGE_COLUMNS",
    "WARNING",
    "ExpectationOutcome",
    "GateResult",
    "QualityGateError",
    "add_local_site",
    "build_data_docs",
    "build_suite",
    "download_data_docs",
    "publish_data_docs",
    "stored_validation_results",
    "enforce",
    "gold_feature_columns",
    "quality_context",
    "quiet_gx_logging",
    "suite_name",
    "validate_partition",
]
