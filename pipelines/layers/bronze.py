"""Bronze: a landed CSV file as delivered (every record, every column, as strings) plus lineage.

Malformed lines (wrong number of fields) are kept, not lost and not fatal: they become rows whose
delivered columns are null and whose `_parse_error` says what was wrong and holds the raw text.
Silver quarantines them with rule "parse_error". `_parse_error` is null on well-formed rows.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from pipelines.contracts import Contract

LINEAGE_COLUMNS = ("_source_key", "_source_etag", "_source_line", "_ingest_run_id", "_ingested_at")
PARSE_ERROR_COLUMN = "_parse_error"
GZIP_MAGIC = b"\x1f\x8b"
_MAX_RAW_TEXT = 500  # keep error text bounded when a "line" is a whole binary blob


class BronzeError(ValueError):
    """A landed file cannot become bronze at all (empty, not CSV, missing contract columns)."""


def parse_landing_csv(
    data: bytes,
    *,
    source_key: str,
    source_etag: str,
    run_id: str,
    ingested_at: datetime,
    contract: Contract,
) -> pa.Table:
    """Parse one landed file into a bronze table: delivered columns (strings) + `_parse_error` + lineage.

    `_source_line` is the physical 1-based line in the (decompressed) file, the header being line 1.
    """
    data = _decompress(data, source_key)
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM written by spreadsheet exports
        data = data[3:]
    _check_utf8(data, source_key)
    if not data.strip():
        raise BronzeError(f"{source_key}: file is empty; re-deliver it with a header and data rows")

    header = _read_header(data, source_key, contract.delimiter)
    missing = [c for c in contract.required_source_columns if c not in header]
    if missing:
        raise BronzeError(
            f"{source_key}: missing column(s) {missing} required by contract {contract.name!r}; "
            f"found {header}. Fix the export or write a contract for this shape."
        )

    bad_rows: list[tuple[int, str]] = []

    def keep_malformed(row: pacsv.InvalidRow) -> str:
        bad_rows.append(
            (
                row.number or -1,
                f"expected {row.expected_columns} fields, found {row.actual_columns}: "
                f"{row.text[:_MAX_RAW_TEXT]!r}",
            )
        )
        return "skip"

    try:
        good = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                use_threads=False, block_size=max(1 << 20, min(len(data) + 1, 1 << 26))
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=contract.delimiter, invalid_row_handler=keep_malformed
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                strings_can_be_null=False,  # bronze keeps "" and "NA" exactly as delivered
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise BronzeError(
            f"{source_key}: not parseable as CSV ({exc}); check the delimiter and quoting"
        ) from exc

    records = good.num_rows + len(bad_rows)
    if records == 0:
        raise BronzeError(f"{source_key}: header only, no data rows; re-deliver the file with its readings")

    # pyarrow numbers records (header = 1, blank lines skipped); map them to physical lines.
    record_lines = _record_start_lines(data)
    bad_numbers = np.array([n for n, _ in bad_rows], dtype=np.int64)
    if len(record_lines) == records + 1 and (bad_numbers >= 1).all():
        is_bad = np.zeros(len(record_lines) + 1, dtype=bool)
        is_bad[bad_numbers] = True
        good_lines = record_lines[~is_bad[1:]][1:]
        bad_lines = record_lines[bad_numbers - 1]
    else:  # unusual quoting we cannot follow line by line: fall back to record order
        good_lines = np.arange(2, good.num_rows + 2, dtype=np.int64)
        bad_lines = np.arange(good.num_rows + 2, records + 2, dtype=np.int64)

    good = good.append_column(PARSE_ERROR_COLUMN, pa.nulls(good.num_rows, pa.string()))
    good = good.append_column("_source_line", pa.array(good_lines, pa.int64()))
    if bad_rows:
        malformed = pa.table(
            {c: pa.nulls(len(bad_rows), pa.string()) for c in header}
            | {
                PARSE_ERROR_COLUMN: pa.array([msg for _, msg in bad_rows], pa.string()),
                "_source_line": pa.array(bad_lines, pa.int64()),
            }
        )
        good = pa.concat_tables([good, malformed]).sort_by("_source_line")

    n = good.num_rows
    return pa.table(
        {c: good[c] for c in [*header, PARSE_ERROR_COLUMN]}
        | {
            "_source_key": pa.array([source_key] * n, pa.string()),
            "_source_etag": pa.array([source_etag] * n, pa.string()),
            "_source_line": good["_source_line"],
            "_ingest_run_id": pa.array([run_id] * n, pa.string()),
            "_ingested_at": pa.array([ingested_at] * n, pa.timestamp("us", tz="UTC")),
        }
    )


def bronze_row_count(table: pa.Table) -> int:
    return table.num_rows


def delivered_columns(table: pa.Table) -> list[str]:
    """The columns as delivered in the file (bronze minus lineage and `_parse_error`)."""
    return [c for c in table.column_names if c not in LINEAGE_COLUMNS and c != PARSE_ERROR_COLUMN]


def _decompress(data: bytes, source_key: str) -> bytes:
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise BronzeError(
            f"{source_key}: looks gzip-compressed but is corrupt ({exc}); re-deliver it"
        ) from exc


def _check_utf8(data: bytes, source_key: str) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BronzeError(
            f"{source_key}: line {line} is not valid UTF-8 (byte {data[exc.start]:#04x} "
            f"at offset {exc.start}); re-export the file as UTF-8"
        ) from None


def _read_header(data: bytes, source_key: str, delimiter: str) -> list[str]:
    first = data.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8")
    header = next(csv.reader([first], delimiter=delimiter))
    if not any(header):
        raise BronzeError(f"{source_key}: first line has no column names; add a header row")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated or "" in header:
        raise BronzeError(
            f"{source_key}: header {header} has duplicated or empty column names {duplicated}; "
            "give every column a unique name"
        )
    clash = [h for h in header if h in LINEAGE_COLUMNS or h == PARSE_ERROR_COLUMN]
    if clash:
        raise BronzeError(f"{source_key}: header uses reserved lineage names {clash}; rename those columns")
    return header


def _record_start_lines(data: bytes) -> np.ndarray:
    """Physical line numbers (1-based) where each non-blank CSV record starts, header included."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if b'"' not in data:
        return np.array([i + 1 for i, line in enumerate(lines) if line.rstrip(b"\r")], dtype=np.int64)
    starts, inside_quotes = [], False
    for i, line in enumerate(lines):
        if not inside_quotes and line.rstrip(b"\r"):
            starts.append(i + 1)
        if line.count(b'"') % 2:
            inside_quotes = not inside_quotes
    return np.array(starts, dtype=np.int64)
