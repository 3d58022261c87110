"""Bronze: a landed CSV file as delivered (every record, every column, as strings) plus lineage.

Malformed lines (wrong number of fields) are kept, not lost and not fatal: they become rows whose
delivered columns are null and whose `_parse_error` says what was wrong and holds the raw text.
Silver quarantines them with rule "parse_error". `_parse_error` is null on well-formed rows.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipelines.contracts import Contract

LINEAGE_COLUMNS = ("_source_key", "_source_etag", "_source_line", "_ingest_run_id", "_ingested_at")
PARSE_ERROR_COLUMN = "_parse_error"
GZIP_MAGIC = b"\x1f\x8b"
_MAX_RAW_TEXT = 500  # keep error text bounded when a "line" is a whole binary blob


class BronzeError(ValueError):
    """A landed file cannot become bronze at all (empty, not CSV, missing contract columns).

    The message names the file, the line and the rule; the same facts are attributes for callers.
    """

    def __init__(self, message: str, *, source_key: str = "", line: int | None = None, rule: str = "") -> None:
        super().__init__(message)
        self.source_key = source_key
        self.line = line
        self.rule = rule


def _fail(source_key: str, line: int | None, rule: str, problem: str, fix: str) -> BronzeError:
    where = f"{source_key} line {line}" if line else source_key
    return BronzeError(f"{where}: {problem} [rule {rule}]; {fix}", source_key=source_key, line=line, rule=rule)


# Delimiters a delivered file might use instead of the contract's; checked only to explain an error.
CANDIDATE_DELIMITERS = (",", ";", "\t", "|")
DEFAULT_BLOCK_SIZE = 16 << 20  # CSV bytes per record batch (~225k readings): bounds memory, amortises gates
_CHUNK = 1 << 20  # bytes read from the source per call
_MAX_HEADER_BYTES = 1 << 20


class _LandingStream(io.RawIOBase):
    """A landed file as pyarrow reads it: gunzipped, BOM stripped, UTF-8 checked, lines accounted for.

    pyarrow counts *records* (blank lines skipped, a quoted multi-line value is one record); the
    stream records every physical line that does not start a record, so record numbers map back
    to the physical line numbers a user sees in an editor.
    """

    def __init__(self, source: BinaryIO, source_key: str) -> None:
        super().__init__()
        self.source_key = source_key
        head = self._guarded(source.read, 2)
        if head == GZIP_MAGIC:
            self._source: BinaryIO = gzip.GzipFile(fileobj=PrefixedStream(head, source), mode="rb")
        else:
            self._source = PrefixedStream(head, source)
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._pending = b""  # bytes read but not yet handed to pyarrow (header look-ahead)
        self._tail = b""  # incomplete last line, for line accounting
        self._in_quotes = False
        self._bom_checked = False
        self._cr_only = False  # old-Mac line endings (a bare CR), read as newlines
        self.lines_done = 0  # complete physical lines seen
        self.non_record_lines: list[int] = []  # blank lines and continuation lines of quoted values
        self.bytes_read = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def _read_chunk(self) -> bytes:
        if self._eof:
            return b""
        chunk = self._guarded(self._source.read, _CHUNK)
        if not self._bom_checked:
            while len(chunk) < 3 and chunk:  # a BOM split across reads
                more = self._guarded(self._source.read, _CHUNK)
                if not more:
                    break
                chunk += more
            if chunk.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM written by spreadsheet exports
                chunk = chunk[3:]
            self._bom_checked = True
            self._cr_only = cr_only_line_endings(chunk)
        if self._cr_only:  # valid old-Mac CSV: every bare CR ends a line
            chunk = chunk.replace(b"\r", b"\n")
        if not chunk:
            self._eof = True
            self._check_utf8(b"", final=True)
            if self._tail:
                self._account(b"\n")  # a last line without newline is still a line
            return b""
        self.bytes_read += len(chunk)
        self._check_utf8(chunk)
        self._account(chunk)
        return chunk

    def _guarded(self, read, size: int) -> bytes:
        """`read(size)`, a corrupt or truncated gzip stream (wherever it is decompressed) named as such."""
        try:
            return read(size)
        except (OSError, EOFError, zlib.error) as exc:
            raise _fail(
                self.source_key,
                None,
                "gzip",
                f"looks gzip-compressed but is corrupt ({exc})",
                "re-deliver it",
            ) from None

    def _check_utf8(self, chunk: bytes, final: bool = False) -> None:
        try:
            self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            buffered = len(exc.object) - len(chunk)  # bytes the decoder held from the previous read
            offset = max(0, exc.start - buffered)
            line = self.lines_done + 1 + (self._tail + chunk[:offset]).count(b"\n") - self._tail.count(b"\n")
            bad = exc.object[exc.start] if exc.start < len(exc.object) else 0
            raise _fail(
                self.source_key,
                line,
                "utf8",
                f"line {line} is not valid UTF-8 (byte {bad:#04x})",
                "re-export the file as UTF-8",
            ) from None

    def _account(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._tail = data
            return
        complete, self._tail = data[: cut + 1], data[cut + 1 :]
        n = complete.count(b"\n")
        simple = (
            not self._in_quotes
            and b'"' not in complete
            and b"\n\n" not in complete
            and b"\n\r\n" not in complete
            and not complete.startswith((b"\n", b"\r\n"))
        )
        if not simple:  # slow path, only for chunks with quotes or blank lines
            for i, line in enumerate(complete.split(b"\n")[:-1]):
                number = self.lines_done + i + 1
                if self._in_quotes or not line.rstrip(b"\r"):
                    self.non_record_lines.append(number)
                if line.count(b'"') % 2:
                    self._in_quotes = not self._in_quotes
        self.lines_done += n

    def read_first_line(self) -> tuple[str, int]:
        """The first non-blank line (the header) and its physical line number, without consuming it."""
        while True:
            stripped = self._pending.lstrip(b"\r\n")
            if b"\n" in stripped or self._eof:
                break
            if len(self._pending) > _MAX_HEADER_BYTES:
                raise _fail(self.source_key, 1, "csv_header", "first line is longer than 1 MB", "is this a CSV file?")
            self._pending += self._read_chunk()
        skipped = self._pending[: len(self._pending) - len(stripped)]
        first = stripped.split(b"\n", 1)[0].rstrip(b"\r")
        return first.decode("utf-8"), skipped.count(b"\n") + 1

    def readinto(self, buffer) -> int:  # type: ignore[override]
        # Fill the whole buffer (pyarrow asks for block_size bytes): a short read per 1 MiB chunk
        # would make pyarrow emit tiny record batches and multiply per-batch costs downstream.
        view, filled = memoryview(buffer), 0
        while filled < len(view):
            if not self._pending:
                self._pending = self._read_chunk()
                if not self._pending:
                    break
            n = min(len(view) - filled, len(self._pending))
            view[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return filled

    def record_lines(self, records: np.ndarray) -> np.ndarray:
        """Physical line numbers of 1-based record numbers (header = record 1)."""
        if not self.non_record_lines:
            return records
        gaps = np.asarray(self.non_record_lines, dtype=np.int64)
        # a record r sits after gap i iff gaps[i] - i <= r
        return records + np.searchsorted(gaps - np.arange(len(gaps)), records, side="right")


def cr_only_line_endings(head: bytes) -> bool:
    """Whether a file's first line ends in a bare CR (classic Mac OS), not LF or CRLF."""
    cr = head.find(b"\r")
    if cr < 0:
        return False
    lf = head.find(b"\n")
    return lf < 0 or lf > cr + 1


class PrefixedStream(io.RawIOBase):
    """`prefix` then the rest of `source`: bytes already read to sniff the format are not lost."""

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._prefix, self._source = prefix, source

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if self._prefix:
            out, self._prefix = self._prefix, b""
            return out + (self._source.read(size - len(out)) if size > len(out) else b"")
        return self._source.read(size)

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def iter_landing_batches(
    file_obj: BinaryIO,
    *,
    source_key: str,
    source_etag: str,
    run_id: str,
    ingested_at: datetime,
    contract: Contract,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Iterator[pa.RecordBatch]:
    """Stream one landed file as bronze record batches, holding about `block_size` bytes of CSV at a time.

    Columns: the delivered ones (strings, as delivered, extra columns included), `_parse_error`, lineage.
    `_source_line` is the physical 1-based line in the (decompressed) file, the header being line 1.
    Raises BronzeError (file, line, rule) when the file cannot be bronze at all; malformed lines are
    kept as rows with `_parse_error` instead.
    """
    stream = _LandingStream(file_obj, source_key)
    first, header_line = stream.read_first_line()
    if not first.strip():
        raise _fail(source_key, None, "not_empty", "file is empty", "re-deliver it with a header and data rows")
    header = _read_header(first, source_key, contract, header_line)

    bad_rows: dict[int, str] = {}  # record number -> problem (None numbers are appended at the end)
    unnumbered: list[str] = []
    blank: set[int] = set()  # record numbers of whitespace-only lines: blank lines, not records

    def keep_malformed(row: pacsv.InvalidRow) -> str:
        if not row.text.strip():
            if row.number is not None:
                blank.add(int(row.number))
            return "skip"
        found = f"expected {row.expected_columns} fields, found {row.actual_columns}"
        text = f"{found}: {row.text[:_MAX_RAW_TEXT]!r}"
        if row.number is None:  # pyarrow loses count after a quoted multi-line value
            unnumbered.append(text)
        else:
            bad_rows[int(row.number)] = text
        return "skip"

    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=block_size),
            parse_options=pacsv.ParseOptions(delimiter=contract.delimiter, invalid_row_handler=keep_malformed),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in header},
                strings_can_be_null=False,  # bronze keeps "" and "NA" exactly as delivered
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise _fail(
            source_key, header_line, "csv", f"not parseable as CSV ({exc})", "check the delimiter and quoting"
        ) from None

    lineage = _Lineage(source_key, source_etag, run_id, ingested_at)
    next_record = 2  # record 1 is the header
    emitted = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as exc:
            raise _fail(
                source_key,
                stream.lines_done or None,
                "csv",
                f"not parseable as CSV near line {stream.lines_done} ({exc})",
                "check the delimiter and quoting",
            ) from None
        skipped = bad_rows.keys() | blank if blank else bad_rows
        records, next_record = _good_record_numbers(batch.num_rows, next_record, skipped)
        bad_here = sorted(n for n in bad_rows if n < next_record)
        out = _bronze_batch(batch, header, records, stream, bad_here, bad_rows, lineage)
        for n in bad_here:
            del bad_rows[n]
        blank -= {n for n in blank if n < next_record}
        if out.num_rows:
            emitted += out.num_rows
            yield out
    rest = sorted(bad_rows)
    if rest or unnumbered:
        empty = pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in header})
        out = _bronze_batch(empty, header, np.array([], np.int64), stream, rest, bad_rows, lineage, unnumbered)
        emitted += out.num_rows
        yield out
    if emitted == 0:
        raise _fail(
            source_key,
            header_line,
            "has_rows",
            "header only, no data rows",
            "re-deliver the file with its readings",
        )


@dataclass(frozen=True)
class _Lineage:
    source_key: str
    source_etag: str
    run_id: str
    ingested_at: datetime


def _good_record_numbers(n: int, start: int, bad) -> tuple[np.ndarray, int]:
    """Record numbers of `n` well-formed records from `start`, skipping the malformed ones (`bad`: their numbers)."""
    if not bad:
        return np.arange(start, start + n, dtype=np.int64), start + n
    skip = np.array(sorted(b for b in bad if b >= start), dtype=np.int64)
    end = start + n
    while True:  # widen the window until it holds n good records
        inside = int(np.searchsorted(skip, end, side="left"))
        if start + n + inside == end:
            break
        end = start + n + inside
    numbers = np.arange(start, end, dtype=np.int64)
    numbers = numbers[~np.isin(numbers, skip[:inside])]
    return numbers, end


def _bronze_batch(
    batch: pa.RecordBatch,
    header: list[str],
    records: np.ndarray,
    stream: _LandingStream,
    bad_numbers: list[int],
    bad_rows: dict[int, str],
    lineage: _Lineage,
    unnumbered: list[str] | None = None,
) -> pa.RecordBatch:
    columns = {c: batch.column(c) for c in header}
    lines = stream.record_lines(records)
    errors = pa.nulls(batch.num_rows, pa.string())
    if bad_numbers or unnumbered:
        k = len(bad_numbers) + len(unnumbered or [])
        bad_lines = stream.record_lines(np.array(bad_numbers, dtype=np.int64))
        all_lines = pa.array(np.concatenate([lines, bad_lines]), pa.int64())
        if unnumbered:  # line unknown: after a quoted multi-line value pyarrow stops counting
            all_lines = pa.concat_arrays([all_lines, pa.nulls(len(unnumbered), pa.int64())])
        columns = {c: pa.concat_arrays([columns[c], pa.nulls(k, pa.string())]) for c in header}
        errors = pa.concat_arrays(
            [errors, pa.array([bad_rows[n] for n in bad_numbers] + list(unnumbered or []), pa.string())]
        )
        order = pc.sort_indices(pc.fill_null(all_lines, np.iinfo(np.int64).max))
        columns = {c: a.take(order) for c, a in columns.items()}
        errors, line_array = errors.take(order), all_lines.take(order)
    else:
        line_array = pa.array(lines, pa.int64())
    return _with_lineage(columns, errors, line_array, lineage)


def _with_lineage(columns: dict, errors: pa.Array, lines: pa.Array, lineage: _Lineage) -> pa.RecordBatch:
    """Delivered columns + `_parse_error` + the lineage columns, the one bronze batch layout."""
    n = len(lines)
    return pa.RecordBatch.from_pydict(
        columns
        | {
            PARSE_ERROR_COLUMN: errors,
            "_source_key": pa.repeat(pa.scalar(lineage.source_key, pa.string()), n),
            "_source_etag": pa.repeat(pa.scalar(lineage.source_etag, pa.string()), n),
            "_source_line": lines,
            "_ingest_run_id": pa.repeat(pa.scalar(lineage.run_id, pa.string()), n),
            "_ingested_at": pa.repeat(pa.scalar(lineage.ingested_at, pa.timestamp("us", tz="UTC")), n),
        }
    )


def parse_landing_csv(
    data: bytes,
    *,
    source_key: str,
    source_etag: str,
    run_id: str,
    ingested_at: datetime,
    contract: Contract,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> pa.Table:
    """Parse one landed file (bytes, maybe gzipped) into a bronze table; see `iter_landing_batches`."""
    batches = list(
        iter_landing_batches(
            io.BytesIO(data),
            source_key=source_key,
            source_etag=source_etag,
            run_id=run_id,
            ingested_at=ingested_at,
            contract=contract,
            block_size=block_size,
        )
    )
    return pa.Table.from_batches(batches)


def bronze_row_count(table: pa.Table) -> int:
    return table.num_rows


def delivered_columns(table: pa.Table) -> list[str]:
    """The columns as delivered in the file (bronze minus lineage and `_parse_error`)."""
    return [c for c in table.column_names if c not in LINEAGE_COLUMNS and c != PARSE_ERROR_COLUMN]


def _read_header(first: str, source_key: str, contract: Contract, line: int) -> list[str]:
    delimiter = contract.delimiter
    header = next(csv.reader([first], delimiter=delimiter))
    required = contract.required_source_columns
    missing = [c for c in required if c not in header]
    if missing:
        used = _sniff_delimiter(first, required, delimiter)
        if used is not None:
            raise _fail(
                source_key,
                line,
                "delimiter",
                f"file {source_key} uses {used!r} but contract {contract.name!r} expects {delimiter!r}",
                f"re-export with {delimiter!r} as the delimiter, or set format.delimiter: {used!r} "
                "in a contract for this source",
            )
    if not any(header):
        raise _fail(source_key, line, "csv_header", "first line has no column names", "add a header row")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated or "" in header:
        raise _fail(
            source_key,
            line,
            "csv_header",
            f"header {header} has duplicated or empty column names {duplicated}",
            "give every column a unique name",
        )
    clash = [h for h in header if h in LINEAGE_COLUMNS or h == PARSE_ERROR_COLUMN]
    if clash:
        raise _fail(
            source_key,
            line,
            "csv_header",
            f"header uses reserved lineage names {clash}",
            "rename those columns",
        )
    if missing:
        raise _fail(
            source_key,
            line,
            "required_columns",
            f"missing column(s) {missing} required by contract {contract.name!r}; found {header}",
            "fix the export or write a contract for this shape",
        )
    return header


def _sniff_delimiter(first: str, required: list[str], expected: str) -> str | None:
    """The delimiter that splits the header into the contract's columns, if not the expected one."""
    best, best_hits = None, 0
    for candidate in CANDIDATE_DELIMITERS:
        if candidate == expected or candidate not in first:
            continue
        fields = [h.strip() for h in next(csv.reader([first], delimiter=candidate))]
        hits = sum(c in fields for c in required)
        if hits > best_hits:
            best, best_hits = candidate, hits
    return best


# -- JSON lines ---------------------------------------------------------------------------------
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")


def is_json_lines(source_key: str) -> bool:
    return source_key.lower().endswith(JSONL_SUFFIXES)


def iter_landing_jsonl_batches(
    file_obj: BinaryIO,
    *,
    source_key: str,
    source_etag: str,
    run_id: str,
    ingested_at: datetime,
    contract: Contract,
    batch_rows: int = 100_000,
) -> Iterator[pa.RecordBatch]:
    """Stream a JSON-lines delivery (one object per line, maybe gzipped) as bronze record batches.

    Values are kept as delivered text (JSON scalars rendered as JSON: true, 21.5, "device-01"
    without quotes); keys become columns, missing keys are null. A line that is not a JSON
    object is kept with `_parse_error` and its line number, and silver quarantines it.
    """
    import gzip
    import json

    head = file_obj.read(2)
    raw: BinaryIO = io.BufferedReader(PrefixedStream(head, file_obj), 1 << 20)  # type: ignore[assignment]
    if head == b"\x1f\x8b":
        raw = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
    lineage = _Lineage(source_key, source_etag, run_id, ingested_at)
    columns: list[str] = []
    rows: list[dict] = []
    lines: list[int] = []
    errors: list[str | None] = []
    emitted = 0
    checked = False

    def flush() -> pa.RecordBatch:
        nonlocal checked
        if not checked:
            missing = [c for c in contract.required_source_columns if c not in columns]
            if missing:
                raise _fail(
                    source_key,
                    lines[0] if lines else None,
                    "required_columns",
                    f"records have no {missing} (keys found: {columns})",
                    "deliver every required field or fix the contract's source names",
                )
            checked = True
        data = {c: pa.array([r.get(c) for r in rows], pa.string()) for c in columns}
        return _with_lineage(data, pa.array(errors, pa.string()), pa.array(lines, pa.int64()), lineage)

    for number, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _fail(
                source_key, number, "utf8", f"byte {e.start} is not UTF-8", "re-deliver the file encoded as UTF-8"
            ) from None
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            values = {
                k: (v if isinstance(v, str) else json.dumps(v)) if v is not None else None for k, v in record.items()
            }
            error = None
        except ValueError as e:
            values, error = {}, f"not a JSON object ({e}): {text[:_MAX_RAW_TEXT]!r}"
        for key in values:
            if key not in columns:
                columns.append(key)
        rows.append(values)
        lines.append(number)
        errors.append(error)
        if len(rows) >= batch_rows:
            batch = flush()
            emitted += batch.num_rows
            yield batch
            rows, lines, errors = [], [], []
    if rows:
        batch = flush()
        emitted += batch.num_rows
        yield batch
    if emitted == 0:
        raise _fail(source_key, None, "not_empty", "file has no records", "re-deliver it with its readings")


def iter_landing_records(file_obj: BinaryIO, *, source_key: str, **kwargs) -> Iterator[pa.RecordBatch]:
    """Bronze batches of any supported delivery: CSV (maybe gzipped) or JSON lines, by file name."""
    if is_json_lines(source_key):
        kwargs.pop("block_size", None)
        return iter_landing_jsonl_batches(file_obj, source_key=source_key, **kwargs)
    return iter_landing_batches(file_obj, source_key=source_key, **kwargs)
