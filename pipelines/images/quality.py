"""GX gates of the image layers, built from the image contract: silver metadata and gold features.

The gate runs through the platform's own GX machinery (``pipelines.quality``: one context per
process, the suite builder with severities from ``params.yaml`` ``quality.<dataset>``, the same
GateResult, ``enforce`` and stored results), only the expectations are the images' own. GX checks
the metadata frame (one row per image, no pixels): dimensions, channels, bytes of pixels, unique
content hashes, known classes, and class balance as each image's class share of the partition.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd

from pipelines.images.contract import CHANNELS, ImageContract

CLASS_SHARE = "class_share"  # derived column: the share of the partition's images in this image's class
HIST_SUM = "hist_sum"  # derived column (gold): the colour histogram's total, 1 by construction


def _config(dataset: str, layer: str) -> dict | None:
    from pipelines.settings import load_params

    return (load_params().get("quality") or {}).get(dataset)


def with_class_share(meta: pd.DataFrame) -> pd.DataFrame:
    labels = meta["label"].fillna("")
    shares = labels.map(labels.value_counts(normalize=True)) if len(meta) else labels.astype(float)
    return meta.assign(**{CLASS_SHARE: shares.astype(float)})


def silver_suite(contract: ImageContract, dataset: str, meta: pd.DataFrame) -> Any:
    import great_expectations.expectations as gxe

    from pipelines.quality.suites import _SuiteBuilder

    b = _SuiteBuilder("silver", dataset, _config(dataset, "silver"))
    for column, value in (("width", contract.width), ("height", contract.height), ("channels", CHANNELS)):
        b.add(gxe.ExpectColumnValuesToBeBetween, column=column, min_value=value, max_value=value)
    b.add(gxe.ExpectColumnValuesToBeBetween, column="pixel_bytes", min_value=contract.pixels, max_value=contract.pixels)
    b.add(gxe.ExpectColumnValuesToBeBetween, column="orig_width", min_value=contract.min_width)
    b.add(gxe.ExpectColumnValuesToBeBetween, column="orig_height", min_value=contract.min_height)
    b.add(gxe.ExpectColumnValuesToNotBeNull, column="content_sha256")
    b.add(gxe.ExpectColumnValuesToBeUnique, column="content_sha256")
    labelled = meta["label"].notna()
    if contract.classes:
        b.add(gxe.ExpectColumnValuesToBeInSet, column="label", value_set=list(contract.classes))
    if labelled.any():
        k = len(contract.classes) or int(meta.loc[labelled, "label"].nunique())
        lo, hi = contract.class_balance
        b.add(
            gxe.ExpectColumnValuesToBeBetween,
            column=CLASS_SHARE,
            min_value=lo / k,
            max_value=min(1.0, hi / k),
            extra_meta={"rule": f"class_balance {list(contract.class_balance)} x 1/{k} classes"},
        )
    return b.suite()


def gold_suite(contract: ImageContract, dataset: str) -> Any:
    import great_expectations.expectations as gxe

    from pipelines.quality.suites import _SuiteBuilder

    b = _SuiteBuilder("gold", dataset, _config(dataset, "gold"))
    b.add(gxe.ExpectColumnValuesToBeInSet, column="split", value_set=["train", "test"])
    b.add(gxe.ExpectColumnValuesToBeBetween, column=HIST_SUM, min_value=0.999, max_value=1.001)
    b.add(gxe.ExpectColumnValuesToBeBetween, column="pixel_bytes", min_value=contract.pixels, max_value=contract.pixels)
    b.add(gxe.ExpectColumnValuesToBeUnique, column="content_sha256")
    return b.suite()


def validate_images(meta: pd.DataFrame, suite: Any, layer: str, dataset: str, partition: str):
    """Validate a metadata frame with ``suite``; a GateResult (``pipelines.quality.enforce`` blocks)."""
    import time

    from great_expectations.core.run_identifier import RunIdentifier

    from pipelines.quality.gate import (
        RESULT_FORMAT,
        GateResult,
        _batch_definition,
        _jsonable,
        _outcome,
        _patch_gx_hot_spots,
        _replace_validation_definition,
        quality_context,
    )
    from pipelines.quality.suites import CRITICAL

    started = time.perf_counter()
    ctx = quality_context()
    _patch_gx_hot_spots()
    definition = _replace_validation_definition(ctx, suite, _batch_definition(ctx, suite.name))
    run_id = RunIdentifier(run_name=partition, run_time=dt.datetime.now(dt.UTC))
    validation = definition.run(batch_parameters={"dataframe": meta}, result_format=RESULT_FORMAT, run_id=run_id)
    raw = _jsonable(validation.to_json_dict())
    outcomes = [_outcome(r) for r in raw.get("results", [])]
    statistics = dict(raw.get("statistics", {}))
    statistics["rows"] = int(len(meta))
    statistics["duration_seconds"] = round(time.perf_counter() - started, 4)
    return GateResult(
        layer=layer,
        dataset=dataset,
        partition=partition,
        success=not any(not o.success and o.severity == CRITICAL for o in outcomes),
        outcomes=outcomes,
        statistics=statistics,
        raw=raw,
    )
