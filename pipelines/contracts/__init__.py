"""Source contracts: one YAML declaration per dataset says how a delivered CSV maps onto silver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

CONTRACTS_DIR = Path(__file__).resolve().parent
COLUMN_TYPES = ("float64", "bool", "string")
EPOCH_SECONDS = "epoch_seconds"
DEFAULT_EARLIEST = "2000-01-01"  # event_time.earliest when a contract does not say
# Label values that mean "no fault"; compared after strip().lower().
DEFAULT_NORMAL_LABELS = ("", "normal")


class ContractError(ValueError):
    """A contract file is missing, malformed or asks for something the platform cannot do."""


# (source_unit, unit) -> vectorised conversion. Add a pair here to support a new source unit.
UNIT_CONVERSIONS: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {
    ("fahrenheit", "celsius"): lambda v: (v - 32.0) * 5.0 / 9.0,
    ("kelvin", "celsius"): lambda v: v - 273.15,
    ("celsius", "fahrenheit"): lambda v: v * 9.0 / 5.0 + 32.0,
    ("fraction", "percent"): lambda v: v * 100.0,
    ("percent", "fraction"): lambda v: v / 100.0,
    ("ppm", "ppm_fraction"): lambda v: v / 1_000_000.0,
}


def convert_units(values: np.ndarray, source_unit: str, unit: str) -> np.ndarray:
    """Convert delivered readings to the canonical unit (identity when the units match)."""
    if source_unit == unit:
        return values
    try:
        return UNIT_CONVERSIONS[(source_unit, unit)](values)
    except KeyError:
        raise ContractError(
            f"no conversion from {source_unit!r} to {unit!r}; supported: "
            f"{sorted(f'{a}->{b}' for a, b in UNIT_CONVERSIONS)}"
        ) from None


@dataclass(frozen=True)
class EventTime:
    column: str  # canonical name, always "ts" in silver
    source: str  # delivered column name
    source_format: str  # "epoch_seconds" or a strptime format
    timezone: str = "UTC"  # zone of naive delivered timestamps
    # The earliest plausible reading time (UTC, ISO date): anything before it is a clock reset
    # (1970-01-01) or a wrong unit, and is quarantined rather than filed under a decades-old date.
    earliest: str = DEFAULT_EARLIEST


@dataclass(frozen=True)
class Entity:
    column: str  # canonical name, "device"
    source: str | None = None  # delivered column, or None when `constant` fills it
    constant: str | None = None
    # What a device id must look like (a regular expression, matched in ASCII mode: `\d` and `\w`
    # mean ASCII digits and letters only). Rows whose id does not match are quarantined by silver.
    pattern: str | None = None


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    source: str
    type: str
    unit: str | None = None
    source_unit: str | None = None
    range: tuple[float, float] | None = None
    required: bool = False

    @property
    def needs_conversion(self) -> bool:
        return self.source_unit is not None and self.unit is not None and self.source_unit != self.unit


@dataclass(frozen=True)
class Label:
    column: str  # canonical name, "label"
    source: str  # delivered column holding the ground-truth fault type
    required: bool = False  # a delivery without the column is still accepted (labels unknown)
    normal_values: tuple[str, ...] = DEFAULT_NORMAL_LABELS


@dataclass(frozen=True)
class LabelWindows:
    """Known anomaly windows for evaluation only (never training input): a JSON file of
    ``[start, end]`` pairs, or an object mapping series names to such lists (NAB's layout) with
    ``key`` naming the series."""

    file: Path
    key: str | None = None

    def load(self) -> list[tuple[str, str]]:
        import json

        try:
            raw = json.loads(self.file.read_text())
        except (OSError, ValueError) as exc:
            raise ContractError(f"{self.file}: label windows file unreadable ({exc}); fix label_windows.file") from exc
        if isinstance(raw, dict):
            if self.key is None or self.key not in raw:
                raise ContractError(
                    f"{self.file}: label_windows.key {self.key!r} is not in the file; "
                    f"use one of {sorted(raw)[:5]}{'...' if len(raw) > 5 else ''}"
                )
            raw = raw[self.key]
        if not isinstance(raw, list) or not all(isinstance(w, list | tuple) and len(w) == 2 for w in raw):
            raise ContractError(f"{self.file}: label windows must be a list of [start, end] pairs")
        return [(str(a), str(b)) for a, b in raw]


@dataclass(frozen=True)
class Contract:
    name: str
    description: str
    event_time: EventTime
    entity: Entity
    columns: tuple[ColumnSpec, ...]
    keys: tuple[str, ...]
    label: Label | None = None
    delimiter: str = ","
    path: Path | None = None
    cadence: str | None = None  # expected time between two readings of a device, e.g. "5min"
    label_windows: LabelWindows | None = None

    @property
    def cadence_seconds(self) -> float | None:
        if self.cadence is None:
            return None
        from pipelines.datasets import parse_duration

        return parse_duration(self.cadence, what="cadence")

    @property
    def measurement_columns(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def numeric_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.type == "float64"]

    @property
    def bool_columns(self) -> list[str]:
        return [c.name for c in self.columns if c.type == "bool"]

    @property
    def source_columns(self) -> list[str]:
        """Every delivered column the contract reads (event time, entity, measurements, label)."""
        names = [self.event_time.source]
        if self.entity.source:
            names.append(self.entity.source)
        names += [c.source for c in self.columns]
        if self.label:
            names.append(self.label.source)
        return names

    @property
    def required_source_columns(self) -> list[str]:
        """Delivered columns a file must have in its header to be ingested at all."""
        names = [self.event_time.source]
        if self.entity.source:
            names.append(self.entity.source)
        names += [c.source for c in self.columns if c.required]
        if self.label and self.label.required:
            names.append(self.label.source)
        return names

    @property
    def silver_columns(self) -> list[str]:
        """Canonical silver column order (lineage columns follow these)."""
        return [self.entity.column, self.event_time.column, *self.measurement_columns, "label", "event_date"]

    def column(self, name: str) -> ColumnSpec:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"contract {self.name!r} has no measurement column {name!r}")

    def range_for(self, name: str) -> tuple[float, float] | None:
        return self.column(name).range


def available_contracts() -> list[str]:
    """Packaged contracts and those in PLATFORM_CONTRACTS_DIR."""
    from pipelines.datasets import contract_files

    return sorted(contract_files())


def load_contract(name_or_path: str | Path) -> Contract:
    """Load a packaged contract by name ("iot_telemetry") or a user contract from a YAML path."""
    path = _resolve(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ContractError(f"{path}: not valid YAML ({exc}); fix the syntax") from exc
    return parse_contract(raw, source=path)


def parse_contract(raw: Any, *, source: Path | str = "<contract>") -> Contract:
    """Validate a contract already read from YAML; every error names the file and the field."""
    where = str(source)

    def fail(field: str, problem: str, fix: str) -> ContractError:
        return ContractError(f"{where}: field {field!r} {problem}; {fix}")

    if not isinstance(raw, dict):
        raise fail("<root>", "is not a mapping", "write the contract as YAML keys (name, event_time, ...)")
    for key in ("name", "event_time", "entity", "columns"):
        if key not in raw:
            raise fail(key, "is missing", f"add a {key!r} section (see pipelines/contracts/iot_telemetry.yaml)")
    known = {
        "name",
        "description",
        "format",
        "event_time",
        "entity",
        "columns",
        "keys",
        "label",
        "cadence",
        "label_windows",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise fail(unknown[0], "is not a contract field", f"use only {sorted(known)}")

    fmt = raw.get("format") or {}
    if not isinstance(fmt, dict) or fmt.get("type", "csv") != "csv":
        raise fail("format.type", f"is {fmt!r}", "only 'csv' is supported")
    delimiter = fmt.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise fail("format.delimiter", f"is {delimiter!r}", "use a single character such as ','")

    et = _mapping(raw["event_time"], "event_time", fail)
    for key in ("source", "source_format"):
        if not et.get(key):
            raise fail(f"event_time.{key}", "is missing", "name the delivered time column and its format")
    event_time = EventTime(
        column=str(et.get("column", "ts")),
        source=str(et["source"]),
        source_format=str(et["source_format"]),
        timezone=str(et.get("timezone", "UTC")),
        earliest=_earliest(et.get("earliest", DEFAULT_EARLIEST), fail),
    )
    if event_time.source_format != EPOCH_SECONDS and "%" not in event_time.source_format:
        raise fail(
            "event_time.source_format",
            f"is {event_time.source_format!r}",
            "use 'epoch_seconds' or a strptime format like '%Y-%m-%d %H:%M:%S'",
        )
    try:
        import zoneinfo

        zoneinfo.ZoneInfo(event_time.timezone)
    except Exception:
        raise fail("event_time.timezone", f"is {event_time.timezone!r}", "use an IANA zone such as 'UTC'") from None

    en = _mapping(raw["entity"], "entity", fail)
    if bool(en.get("source")) == (en.get("constant") is not None):
        raise fail(
            "entity",
            "needs exactly one of 'source' or 'constant'",
            "name the delivered device column, or give a constant device id for single-entity sources",
        )
    pattern = en.get("pattern")
    if pattern is not None:
        import re

        try:
            re.compile(str(pattern), re.ASCII)
        except re.error as exc:
            raise fail("entity.pattern", f"is not a regular expression ({exc})", "fix the pattern") from None
    entity = Entity(
        column=str(en.get("column", "device")),
        source=str(en["source"]) if en.get("source") else None,
        constant=str(en["constant"]) if en.get("constant") is not None else None,
        pattern=str(pattern) if pattern is not None else None,
    )

    if not isinstance(raw["columns"], list) or not raw["columns"]:
        raise fail("columns", "is empty or not a list", "list at least one measurement column")
    columns = tuple(_column(c, i, fail) for i, c in enumerate(raw["columns"]))
    names = [c.name for c in columns]
    reserved = {event_time.column, entity.column, "label", "event_date"}
    for name in names:
        if names.count(name) > 1:
            raise fail("columns", f"declares {name!r} twice", "give each canonical column one entry")
        if name in reserved:
            raise fail("columns", f"uses reserved name {name!r}", f"rename it; {sorted(reserved)} are canonical")

    label = None
    if raw.get("label") is not None:
        lb = _mapping(raw["label"], "label", fail)
        if not lb.get("source"):
            raise fail("label.source", "is missing", "name the delivered ground-truth column, e.g. 'fault'")
        label = Label(
            column=str(lb.get("column", "label")),
            source=str(lb["source"]),
            required=bool(lb.get("required", False)),
            normal_values=tuple(str(v).strip().lower() for v in lb.get("normal_values", DEFAULT_NORMAL_LABELS)),
        )

    cadence = raw.get("cadence")
    if cadence is not None:
        from pipelines.datasets import DatasetError, parse_duration

        try:
            parse_duration(cadence, what="cadence")
        except DatasetError as exc:
            raise fail("cadence", f"is {cadence!r}", "write a duration such as '5min' or '1h'") from exc
    label_windows = None
    if raw.get("label_windows") is not None:
        lw = raw["label_windows"]
        lw = {"file": lw} if isinstance(lw, str) else _mapping(lw, "label_windows", fail)
        if not lw.get("file"):
            raise fail("label_windows.file", "is missing", "name a JSON file of [start, end] windows")
        file = Path(str(lw["file"])).expanduser()
        if not file.is_absolute():
            file = (Path(source).parent / file).resolve()
        label_windows = LabelWindows(file=file, key=str(lw["key"]) if lw.get("key") is not None else None)

    keys = tuple(raw.get("keys") or (entity.column, event_time.column))
    if set(keys) != {entity.column, event_time.column}:
        raise fail("keys", f"is {list(keys)}", f"silver is keyed on [{entity.column}, {event_time.column}]")

    return Contract(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        event_time=event_time,
        entity=entity,
        columns=columns,
        keys=keys,
        label=label,
        delimiter=delimiter,
        path=Path(source),
        cadence=str(cadence) if cadence is not None else None,
        label_windows=label_windows,
    )


def _resolve(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ContractError(f"{candidate}: contract file not found; check the path")
        return candidate
    from pipelines.datasets import contract_dirs, contract_files

    found = contract_files().get(str(name_or_path))
    if found is None:
        raise ContractError(
            f"no contract named {str(name_or_path)!r} in {' or '.join(str(d) for d in contract_dirs())}; "
            f"use one of {available_contracts()} or pass the path of your own YAML file"
        )
    return found


def _earliest(value: Any, fail: Callable[[str, str, str], ContractError]) -> str:
    """`event_time.earliest` as an ISO date-time string (YAML may hand over a date object)."""
    import datetime as dt

    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    try:
        dt.datetime.fromisoformat(str(value))
    except ValueError:
        raise fail(
            "event_time.earliest", f"is {value!r}", "write the earliest plausible reading time as a date: 2000-01-01"
        ) from None
    return str(value)


def _mapping(value: Any, field: str, fail: Callable[[str, str, str], ContractError]) -> dict:
    if not isinstance(value, dict):
        raise fail(field, f"is {value!r}, not a mapping", "write it as nested YAML keys")
    return value


def _column(raw: Any, i: int, fail: Callable[[str, str, str], ContractError]) -> ColumnSpec:
    field = f"columns[{i}]"
    col = _mapping(raw, field, fail)
    if not col.get("name"):
        raise fail(f"{field}.name", "is missing", "give the canonical column name")
    field = f"columns[{i}] ({col['name']})"
    ctype = col.get("type")
    if ctype not in COLUMN_TYPES:
        raise fail(f"{field}.type", f"is {ctype!r}", f"use one of {list(COLUMN_TYPES)}")
    unit, source_unit = col.get("unit"), col.get("source_unit")
    if source_unit is not None:
        if ctype != "float64" or unit is None:
            raise fail(f"{field}.source_unit", "needs a float64 column with a 'unit'", "add unit: <canonical unit>")
        if source_unit != unit and (source_unit, unit) not in UNIT_CONVERSIONS:
            raise fail(
                f"{field}.source_unit",
                f"cannot convert {source_unit!r} to {unit!r}",
                f"use one of {sorted(f'{a}->{b}' for a, b in UNIT_CONVERSIONS)}",
            )
    rng = col.get("range")
    if rng is not None:
        if ctype != "float64":
            raise fail(f"{field}.range", "applies only to float64 columns", "remove it")
        if (
            not isinstance(rng, list | tuple)
            or len(rng) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in rng)
        ):
            raise fail(f"{field}.range", f"is {rng!r}", "write it as [min, max] in the canonical unit")
        if rng[0] > rng[1]:
            raise fail(f"{field}.range", f"has min {rng[0]} > max {rng[1]}", "swap the bounds")
        rng = (float(rng[0]), float(rng[1]))
    return ColumnSpec(
        name=str(col["name"]),
        source=str(col.get("source", col["name"])),
        type=ctype,
        unit=unit,
        source_unit=source_unit,
        range=rng,
        required=bool(col.get("required", False)),
    )
