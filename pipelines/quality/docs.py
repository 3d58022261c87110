"""GX Data Docs: a static HTML site (index.html + pages) built locally, ready to upload to the lake.

GX's renderer puts values into the HTML as they are (a device id ``<img src=x onerror=...>`` in a
failed expectation's examples ran as script in the reader's browser), so every string of every
validation result is HTML-escaped before GX sees it (``escape_data_values``): the site is always
built from escaped copies, never from the raw results or a caller's context.
"""

from __future__ import annotations

import datetime as dt
import html
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

    `results_dir_or_context` is either a GX data context (its stored validation results are
    rendered, e.g. `pipelines.quality.quality_context()` after some validations), or a directory
    searched recursively for `*.json` files holding `GateResult.to_dict()` output (or raw GX
    validation results), e.g. the reports stored next to the lake partitions. Either way the pages
    are rendered from HTML-escaped copies of the results (`escape_data_values`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(results_dir_or_context, str | Path):
        raws = _load_raw_results(Path(results_dir_or_context))
    else:
        raws = _stored_raw_results(results_dir_or_context)
    # Always a throw-away context of escaped copies (the caller's context is only read): the
    # values are data, never markup.
    context = _context_from_results(raws)
    add_local_site(context, output_dir)
    context.build_data_docs(site_names=[SITE_NAME])
    index = output_dir / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"GX did not write {index}; check the Data Docs site config of the context")
    return index


def escape_data_values(value: Any) -> Any:
    """A copy of `value` (JSON-like: dicts, lists, scalars) with every string and key HTML-escaped.

    Names the platform chooses (suite, expectation, column names) have no markup characters and
    come out unchanged; a value with <, >, &, " or ' is shown as text, not run as markup."""
    if isinstance(value, str):
        return html.escape(value, quote=True)
    if isinstance(value, dict):
        return {escape_data_values(k) if isinstance(k, str) else k: escape_data_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escape_data_values(v) for v in value]
    return value


def _stored_raw_results(context: Any) -> list[dict]:
    """The validation results a GX context holds, as JSON dicts."""
    store = context.validation_results_store
    return [store.get(key).to_json_dict() for key in store.list_keys()]


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
        raw = escape_data_values(raw)
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


# -- the site in the object store -----------------------------------------------------------------
DATA_DOCS_PREFIX = "data-docs/"
VALIDATIONS_PREFIX = "quality/"  # where the lake jobs store each gate's GateResult.to_dict() JSON
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css",
    ".js": "application/javascript",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


# Data Docs render the latest partitions of each layer and dataset, not all history: one dataset's
# 311 daily partitions made a 74 MB, 1,562-page site rebuilt on every run. Older results stay in
# s3://<lake>/quality/ as JSON (and in `platform summary`'s totals); nothing is deleted.
DOCS_PARTITIONS_PER_LAYER = 14


def latest_validation_keys(keys: Iterable[str], per_layer: int = DOCS_PARTITIONS_PER_LAYER) -> list[str]:
    """Of quality/<layer>/<dataset>/event_date=<d>/validation.json keys, the latest `per_layer`
    partitions of each (layer, dataset)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if key.endswith(".json"):
            groups.setdefault(key.rsplit("/", 2)[0], []).append(key)
    return sorted(k for group in groups.values() for k in sorted(group)[-per_layer:])


def stored_validation_results(
    store: Any, dataset: str | None = None, per_layer: int = DOCS_PARTITIONS_PER_LAYER
) -> list[dict]:
    """The gate results the lake jobs stored (quality/<layer>/<dataset>/event_date=<d>/validation.json),
    the latest `per_layer` partitions of each layer and dataset."""
    bucket = store.settings.lake_bucket
    results = []
    keys = [k for k in store.list_keys(bucket, VALIDATIONS_PREFIX) if dataset is None or f"/{dataset}/" in k]
    for key in latest_validation_keys(keys, per_layer):
        try:
            results.append(json.loads(store.get_bytes(bucket, key)))
        except json.JSONDecodeError:
            continue  # a foreign file under quality/: not ours to render
    return results


def publish_data_docs(store: Any, results: list[dict] | None = None, prefix: str = DATA_DOCS_PREFIX) -> str:
    """Build the Data Docs site from gate results and upload it to s3://<lake>/<prefix>.

    `results` are `GateResult.to_dict()` dicts (default: every result stored in the lake). The
    site replaces the previous one: stale pages are deleted after the new ones are written.
    Returns the key of the uploaded index.html.
    """
    import tempfile

    results = stored_validation_results(store) if results is None else results
    bucket = store.settings.lake_bucket
    with tempfile.TemporaryDirectory(prefix="data-docs-") as tmp:
        reports = Path(tmp) / "reports"
        reports.mkdir()
        for i, result in enumerate(results):
            (reports / f"{i:05d}.json").write_text(json.dumps(result, default=str), encoding="utf-8")
        site = Path(tmp) / "site"
        build_data_docs(reports, site)
        written = set()
        for path in sorted(site.rglob("*")):
            if path.is_file():
                key = prefix + path.relative_to(site).as_posix()
                content_type = _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
                store.put_bytes(bucket, key, path.read_bytes(), content_type)
                written.add(key)
    store.delete_keys(bucket, [k for k in store.list_keys(bucket, prefix) if k not in written])
    return prefix + "index.html"


def download_data_docs(store: Any, output_dir: Path, prefix: str = DATA_DOCS_PREFIX) -> Path:
    """Copy the published site to `output_dir` and return its index.html (open it in a browser)."""
    output_dir = Path(output_dir)
    bucket = store.settings.lake_bucket
    keys = store.list_keys(bucket, prefix)
    if not keys:
        raise FileNotFoundError(
            f"No Data Docs under s3://{bucket}/{prefix}: run a lake job first (each gate publishes them)"
        )
    for key in keys:
        target = output_dir / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get_bytes(bucket, key))
    return output_dir / "index.html"


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.quality.docs [--out DIR] [--publish] [--open]`: the Data Docs, locally."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipelines.quality.docs", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=Path(".platform/data-docs"), help="local directory")
    parser.add_argument("--publish", action="store_true", help="rebuild from stored results and upload first")
    parser.add_argument("--open", action="store_true", help="open index.html in the default browser")
    args = parser.parse_args(argv)
    from pipelines.storage import ObjectStore

    try:
        store = ObjectStore()
        if args.publish:
            publish_data_docs(store)
        index = download_data_docs(store, args.out)
    except Exception as exc:  # noqa: BLE001 - one clear line for the user, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(index.resolve())
    if args.open:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
