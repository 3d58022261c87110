"""Image contracts: what an image dataset delivers and what silver makes of it (size, channels, classes).

One YAML file per image dataset, in ``pipelines/images/contracts/`` or in ``<PLATFORM_CONTRACTS_DIR>/images/``
(the user's folder wins). They live apart from the tabular contracts on purpose: a tabular contract
is a dataset with telemetry DAGs; an image contract gets the image DAGs (``dags/images.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGED = Path(__file__).resolve().parent / "contracts"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
CHANNELS = 3  # silver is RGB, always


class ImageContractError(ValueError):
    """An image contract is missing or invalid (the message names the file and the key)."""


class ImageTrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pca_components: int = Field(40, ge=1)
    # images per IncrementalPCA step: memory ~ batch x pixels; each step is an SVD of (batch + components)
    # x pixels, costing ~(batch + components)^2 / batch per image: least at batch = components, 2x is 12% more
    pca_batch_size: int = Field(80, ge=1)
    classifier: Literal["logistic_regression"] = "logistic_regression"
    test_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 42
    max_iter: int = 500


class ImageContract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    width: int = Field(ge=1, le=4096)
    height: int = Field(ge=1, le=4096)
    min_width: int = Field(1, ge=1)
    min_height: int = Field(1, ge=1)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    max_bytes: int = Field(20_000_000, ge=1)
    classes: list[str] = Field(default_factory=list)  # empty: the delivered sub-folders are the classes
    class_balance: tuple[float, float] = (0.25, 4.0)
    model_name: str | None = None
    train: ImageTrainParams = Field(default_factory=ImageTrainParams)

    @model_validator(mode="after")
    def _check(self) -> ImageContract:
        if not _NAME.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits and '_' (starting with a letter)")
        lo, hi = self.class_balance
        if not 0 <= lo <= 1 <= hi:
            raise ValueError(f"class_balance {list(self.class_balance)}: write [lo <= 1, hi >= 1]")
        return self

    @property
    def pixels(self) -> int:
        return self.width * self.height * CHANNELS

    @property
    def registered_model(self) -> str:
        return self.model_name or self.name.replace("_", "-") + "-classifier"

    @property
    def input_name(self) -> str:
        """The logged model's input: its name carries the size, so serving resizes as training did."""
        return f"rgb_{self.width}x{self.height}"


def parse_input_name(name: str) -> tuple[int, int]:
    """(width, height) from a model input named ``rgb_<w>x<h>``."""
    m = re.fullmatch(r"rgb_(\d+)x(\d+)", str(name))
    if not m:
        raise ImageContractError(f"model input {name!r} is not an image input (rgb_<width>x<height>)")
    return int(m.group(1)), int(m.group(2))


def contract_dirs() -> list[Path]:
    from pipelines.settings import get_settings

    extra = get_settings().contracts_dir
    return [*([Path(extra).expanduser() / "images"] if extra else []), PACKAGED]


def image_contract_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in contract_dirs():
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                if _NAME.match(path.stem):
                    found.setdefault(path.stem, path)
    return found


def load_image_contract(name_or_path: str | Path) -> ImageContract:
    """The contract of an image dataset, by name (see ``contract_dirs``) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        files = image_contract_files()
        if str(name_or_path) not in files:
            raise ImageContractError(
                f"unknown image dataset {str(name_or_path)!r}: no {name_or_path}.yaml in "
                f"{' or '.join(str(d) for d in contract_dirs())}; known: {sorted(files)}"
            )
        path = files[str(name_or_path)]
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ImageContract.model_validate(raw)
    except FileNotFoundError:
        raise ImageContractError(f"image contract {path} does not exist") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        problem = "is not a known key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ImageContractError(f"{path}: {key} {problem}") from None


def image_catalogue() -> dict[str, ImageContract]:
    return {name: load_image_contract(path) for name, path in image_contract_files().items()}
