"""GX Data Docs: a static HTML site (index.html + pages) built locally, ready to upload to the lake."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SITE_NAME = "local_site"


def local_site_config(output_dir: Path) -> dict:
    return {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(Path(output_dir).resolve()),
        },
    }


def add_local_site(context: Any, output_dir: Path, site_name: str = SITE_NAME) -> None:
    """Point a Data Docs site of `context` at `output_dir` (validations through a Checkpoint then
    refresh it via UpdateDataDocsAction)."""
    config = local_site_config(output_dir)
    if site_name in (context.list_data_docs_sites() or {}):
        context.update_data_docs_site(site_name, config)
    else:
        context.add_data_docs_site(site_name, config)


def build_data_docs(results_dir_or_context: Any, output_dir: Path) -> Path:
    """Build the Data Docs site into `output_dir` and return the path of its index.html.

    `results_dir_or_context` is either a GX data context (its stored validation results and
    suites are rendered, e.g. `pipelines.quality.quality_context()` after some validations), or
    a directory searched recursively for `*.json` files holding `GateResult.to_dict()` output
    (or raw GX validation results), e.g. the reports stored next to the lake partitions.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(results_dir_or_context, str | Path):
        context = _context_from_results(_load_raw_results(Path(results_dir_or_context)))
    else:
        context = results_dir_or_context
    previous = (context.list_data_docs_sites() or {}).get(SITE_NAME)
    add_local_site(context, output_dir)
    try:
        context.build_data_docs(site_names=[SITE_NAME])
    finally:
        # Leave the caller's context as it was: a site left behind would make every later
        # validation on it rebuild these docs through a Checkpoint.
        if previous is None:
            context.delete_data_docs_site(SITE_NAME)
        else:
            context.update_data_docs_site(SITE_NAME, previous)
    index = output_dir / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"GX did not write {index}; check the Data Docs site config of the context")
    return index


def _load_raw_results(results_dir: Path) -> list[dict]:
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: no such directory of validation results")
    raws = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("raw"), dict):
            data = data["raw"]
        if isinstance(data, dict) and "results" in data and "suite_name" in data:
            raws.append(data)
    return raws


def _context_from_results(raws: Iterable[dict]) -> Any:
    """A throw-away ephemeral context whose validation results store holds `raws`."""
    import great_expectations as gx
    from great_expectations.core.expectation_validation_result import (
        expectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    from pipelines.quality.gate import _remove_empty_dir, disable_progress_bars
    from pipelines.quality.suites import quiet_gx_logging

    quiet_gx_logging()
    context = gx.get_context(mode="ephemeral")
    disable_progress_bars(context)
    for site, site_config in list((context.list_data_docs_sites() or {}).items()):
        context.delete_data_docs_site(site)  # GX's default temp-dir site
        _remove_empty_dir(site_config.get("store_backend", {}).get("base_directory"))
    for i, raw in enumerate(raws):
        result = expectationSuiteValidationResultSchema.load(raw)
        run = (raw.get("meta") or {}).get("run_id") or {}
        run_time = run.get("run_time")
        run_id = RunIdentifier(
            run_name=run.get("run_name") or f"run-{i}",
            run_time=dt.datetime.fromisoformat(run_time) if run_time else None,
        )
        key = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=raw["suite_name"]),
            run_id=run_id,
            batch_identifier=_batch_identifier(raw, i),
        )
        context.validation_results_store.set(key, result)
    return context


def _batch_identifier(raw: dict, i: int) -> str:
    batch = (raw.get("meta") or {}).get("active_batch_definition") or {}
    name = "-".join(str(batch[k]) for k in ("datasource_name", "data_asset_name") if batch.get(k))
    return name or f"batch-{i}"
