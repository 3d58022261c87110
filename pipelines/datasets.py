"""The dataset catalogue: every dataset is a source contract, plus an optional tuning section in params.yaml.

A contract file in ``pipelines/contracts/`` or in the folder named by ``PLATFORM_CONTRACTS_DIR`` is a
dataset: it gets its DAGs (``<prefix>_lakehouse``, ``<prefix>_training``), its Assets and its own
registered model with no code change. ``datasets.<name>`` in params.yaml tunes it, read through one
typed model (:class:`DatasetParams`): an unknown key is an error naming the key and the file.

This module is light on purpose (PyYAML, pydantic and the settings object): the DAG files import it at parse time
to declare one set of DAGs per dataset, and the dag-processor parses them often.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PACKAGED_CONTRACTS = Path(__file__).resolve().parent / "contracts"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|min|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class DatasetError(ValueError):
    """A dataset is unknown, or its parameters are invalid (the message names the key and the file)."""


def parse_duration(value: str | int | float, *, what: str = "duration") -> float:
    """Seconds in a duration written as ``15min``, ``4h``, ``30s``, ``1d`` (or a number of seconds)."""
    if isinstance(value, bool):
        raise DatasetError(f"{what}={value!r}: write a duration such as '15min' or '4h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise DatasetError(f"{what}={value!r}: write a duration such as '30s', '15min', '4h' or '1d'")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    if seconds <= 0:
        raise DatasetError(f"{what}={value!r}: must be longer than 0")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GoldParams(_Strict):
    # Durations ("15min", "4h"); an integer is a count of readings (the simulator's old meaning).
    # None: derived from the dataset's cadence (see DatasetParams.windows).
    window: str | int | None = None
    long_window: str | int | None = None

    @field_validator("window", "long_window")
    @classmethod
    def _valid(cls, v):
        if isinstance(v, str):
            parse_duration(v)
        elif isinstance(v, int) and v < 1:
            raise ValueError("a window of readings must be >= 1")
        return v


class MonitoringParams(_Strict):
    """``datasets.<name>.monitoring``: what its hourly monitoring DAG judges (pipelines.monitoring.loop).

    A window is the ``window`` before the run's hour. One day by default: sensor readings follow the day,
    and an hour of them against a reference spanning whole days drifts by the hour of day alone
    (measured on the simulator: 92% of the features of every no-drift hour)."""

    window: str = "1d"
    # A window with fewer rows is reported, never judged. None: 1,000, or half the readings one device
    # gives in a window where the contract's cadence says that is fewer (a 5-minute series has 288 a day).
    min_rows: int | None = Field(None, ge=1)
    wasserstein: float = Field(0.1, gt=0)  # a feature drifts: normed Wasserstein (reference stds) above
    jensen_shannon: float = Field(0.1, gt=0)  # ... or Jensen-Shannon distance on the reference's bins above
    drift_share: float = Field(0.5, gt=0, le=1)  # the window drifts when this share of features drifts
    strong_wasserstein: float = Field(0.5, gt=0)  # ... or any one feature (score, alert flag) moves this far
    alarm_windows: int = Field(3, ge=1)  # alarm: at least alarm_windows of the last of_windows drifted
    of_windows: int = Field(4, ge=1)
    exclude: list[str] = Field(default_factory=lambda: ["hour_sin", "hour_cos"])  # the clock, not the data
    cooldown: str = "1d"  # an alarm on the same model version emits the drift Asset again after this

    @field_validator("window", "cooldown")
    @classmethod
    def _duration(cls, v):
        parse_duration(v)
        return v

    @model_validator(mode="after")
    def _persistence(self):
        if self.alarm_windows > self.of_windows:
            raise ValueError(f"alarm_windows={self.alarm_windows} > of_windows={self.of_windows}: k of n needs k <= n")
        return self


class DatasetParams(_Strict):
    """``datasets.<name>`` in params.yaml. Every field is optional; what is absent is derived."""

    model_name: str | None = None  # registered model; default: the dataset's name
    dag_prefix: str | None = None  # DAG ids <prefix>_lakehouse / <prefix>_training; default: the name
    grain: Literal["day", "month"] = "day"  # event-time partition: long histories by month
    gold: GoldParams = Field(default_factory=GoldParams)
    # Overrides of the global `train:` and `registry:` sections for this dataset only.
    train: dict[str, Any] = Field(default_factory=dict)
    registry: dict[str, Any] = Field(default_factory=dict)
    monitoring: MonitoringParams = Field(default_factory=MonitoringParams)

    @field_validator("model_name", "dag_prefix")
    @classmethod
    def _name(cls, v):
        if v is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", v):
            raise ValueError("use letters, digits, '_', '-' and '.'")
        return v


@dataclass(frozen=True)
class Dataset:
    """One dataset of the catalogue: its contract file and its resolved parameters."""

    name: str
    contract_path: Path
    params: DatasetParams

    @property
    def model_name(self) -> str:
        return self.params.model_name or self.name

    @property
    def dag_prefix(self) -> str:
        return self.params.dag_prefix or self.name

    @property
    def lakehouse_dag_id(self) -> str:
        return f"{self.dag_prefix}_lakehouse"

    @property
    def training_dag_id(self) -> str:
        return f"{self.dag_prefix}_training"

    @property
    def canary_dag_id(self) -> str:
        return f"{self.dag_prefix}_canary"

    @property
    def stream_dag_id(self) -> str:
        return f"{self.dag_prefix}_stream_rebuild"

    @property
    def monitoring_dag_id(self) -> str:
        return f"{self.dag_prefix}_monitoring"

    def drift_asset_uri(self, lake_bucket: str = "lake") -> str:
        """The Asset a persistent drift alarm updates (its extra names the alarm): it schedules training."""
        return f"s3://{lake_bucket}/monitoring/{self.name}/drift"

    def stream_asset_uri(self, lake_bucket: str = "lake") -> str:
        """The Asset the live path updates after a bronze commit (its extra names the partitions):
        apart from the lakehouse's bronze Asset, so a batch run does not rebuild twice."""
        return f"s3://{lake_bucket}/bronze/{self.name}/stream"

    def asset_uri(self, layer: str, lake_bucket: str = "lake") -> str:
        return f"s3://{lake_bucket}/{layer}/{self.name}"

    def asset_name(self, layer: str) -> str:
        return f"{self.name}_{layer}"

    @property
    def grain(self) -> str:
        return self.params.grain

    def windows(self, cadence_seconds: float | None = None) -> tuple[str | int, str | int]:
        """Gold's (short, long) windows: the configured ones, else derived from the cadence.

        Derived: the short window spans at least an hour and 6 readings, the long one a day and 48
        readings, so hourly data gets a 6 h and a 2-day window, 1-minute data 1 h and 1 day."""
        cadence = cadence_seconds or 60.0
        short = self.params.gold.window or _seconds_text(max(3600.0, 6 * cadence))
        long_ = self.params.gold.long_window or _seconds_text(max(86400.0, 48 * cadence))
        return short, long_


def _seconds_text(seconds: float) -> str:
    return f"{int(round(seconds))}s"


def contract_dirs(contracts_dir: str | Path | None = None) -> list[Path]:
    """Where contracts are looked up: the user's folder first (it may override a packaged one)."""
    from pipelines.settings import get_settings

    extra = contracts_dir or get_settings().contracts_dir
    dirs = [Path(extra).expanduser().resolve()] if extra else []
    return [*dirs, PACKAGED_CONTRACTS]


def contract_files(contracts_dir: str | Path | None = None) -> dict[str, Path]:
    """{dataset name: contract file}; a user's contract shadows a packaged one of the same name."""
    found: dict[str, Path] = {}
    for folder in contract_dirs(contracts_dir):
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if _NAME.match(path.stem):
                found.setdefault(path.stem, path)
    return found


def _params_file(params_file: str | Path | None) -> Path:
    if params_file:
        return Path(params_file)
    from pipelines.settings import get_settings

    return Path(get_settings().params_file)


def _raw_params(params_file: Path) -> dict:
    import yaml

    if not params_file.exists():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(params_file.read_text(), Loader=loader) or {}  # noqa: S506 - a safe loader


def dataset_params(name: str, raw: dict, params_file: Path) -> DatasetParams:
    section = (raw.get("datasets") or {}).get(name) or {}
    try:
        return DatasetParams.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in ("datasets", name, *first["loc"]))
        problem = "is not a known key" if first["type"] == "extra_forbidden" else first["msg"]
        known = ", ".join(DatasetParams.model_fields)
        raise DatasetError(f"{params_file}: {key} {problem} (keys of a dataset: {known})") from None


def catalogue(contracts_dir: str | Path | None = None, params_file: str | Path | None = None) -> dict[str, Dataset]:
    """Every dataset: one per contract file, with its parameters validated."""
    pfile = _params_file(params_file)
    raw = _raw_params(pfile)
    files = contract_files(contracts_dir)
    unknown = sorted(set(raw.get("datasets") or {}) - set(files))
    if unknown:
        raise DatasetError(
            f"{pfile}: datasets.{unknown[0]} has no contract; add {unknown[0]}.yaml to "
            f"{' or '.join(str(d) for d in contract_dirs(contracts_dir))}, or remove the section"
        )
    return {name: Dataset(name, path, dataset_params(name, raw, pfile)) for name, path in files.items()}


def get_dataset(name: str, contracts_dir: str | Path | None = None, params_file: str | Path | None = None) -> Dataset:
    """The dataset named ``name`` (``<contract>.<variant>`` datasets share their contract's params)."""
    datasets = catalogue(contracts_dir, params_file)
    base = name.split(".", 1)[0]
    if base not in datasets:
        raise DatasetError(
            f"unknown dataset {name!r}: no contract {base}.yaml in "
            f"{' or '.join(str(d) for d in contract_dirs(contracts_dir))}; known: {sorted(datasets)}"
        )
    found = datasets[base]
    return found if base == name else Dataset(name, found.contract_path, found.params)


def effective_params(name: str, params: dict | None = None) -> dict:
    """params.yaml as one dataset sees it: ``train`` and ``registry`` with the dataset's overrides
    merged in, ``registry.model_name`` its own model, ``gold`` its windows."""
    from pipelines.settings import load_params

    merged = copy.deepcopy(params if params is not None else load_params())
    ds = get_dataset(name)
    for section, overrides in (("train", ds.params.train), ("registry", ds.params.registry)):
        merged[section] = _deep_merge(merged.get(section) or {}, overrides)
    merged.setdefault("registry", {})["model_name"] = ds.model_name
    from pipelines.contracts import load_contract

    short, long_ = ds.windows(load_contract(ds.contract_path).cadence_seconds)
    merged["gold"] = {**(merged.get("gold") or {}), "window": short, "long_window": long_}
    merged["dataset"] = {"name": ds.name, "grain": ds.grain, "model_name": ds.model_name}
    return merged


def _deep_merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
