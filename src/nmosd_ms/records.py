"""Typed schemas of the JSON records the toolkit reads back (a run's ``run.json`` here; a bundle's
``model.json`` is :class:`nmosd_ms.bundle.BundleInfo`), and their validation.

Both are written by the toolkit but live in folders that users copy, edit and exchange, so every
reader validates them here first: a truncated, edited or hostile record becomes one user error
naming the file and the field, never a ``KeyError`` deep in a report, and never a size that makes
torch allocate gigabytes. Unknown extra keys are kept (records of newer versions stay readable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import PretrainConfig, TrainConfig
from .errors import NmosdError
from .io import read_json

#: Model input sizes a record may name (the same bounds as PrepareConfig.size).
MIN_SIZE, MAX_SIZE = 8, 512


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class RunOptions(_Record):
    cohort_hash: str
    n_subjects: int = Field(ge=1)
    repeats: int = Field(ge=1)
    folds: int = Field(ge=2)
    seed: int
    train: TrainConfig
    prepare: dict[str, Any]


class ModelRecord(_Record):
    family: str
    size: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE)
    weights: str | None = None
    description: str = ""
    parameters: int | None = Field(None, ge=0)
    flops: int | None = Field(None, ge=0)
    views: list[str] = Field(default_factory=list)


class CohortRecord(_Record):
    counts: dict[str, int]
    lesion_source: dict[str, dict[str, int]] | None = None
    segmented: list[str] = Field(default_factory=list)


class Environment(_Record):
    device: str = "unknown"
    device_name: str = ""
    cpu_count: int | None = None
    torch: str = "unknown"
    torch_threads: int | None = None  # the folds' (cv) or the training's (fit, pretrain)


class RunRecord(_Record):
    """``run.json`` of a cross-validation run."""

    tool: str = "nmosd-ms cv"
    version: str = ""
    options: RunOptions
    models: dict[str, ModelRecord]
    cohort: CohortRecord
    environment: Environment = Field(default_factory=Environment)
    started: str | None = None
    finished: str | None = None


class PretrainRecord(_Record):
    """``pretrain.json`` beside the weights that ``nmosd-ms pretrain`` wrote."""

    tool: str = "nmosd-ms pretrain"
    version: str = ""
    model: str
    size: int = Field(ge=MIN_SIZE, le=MAX_SIZE)
    options: PretrainConfig
    seed: int
    prepare: dict[str, Any]
    cohort_hash: str
    n_subjects: int = Field(ge=1)
    participant_ids: list[str]
    input_sha256: list[str]
    weights_sha256: str
    curve: list[dict[str, float]] = Field(default_factory=list)
    environment: Environment | None = None  # device, torch threads, versions (not the recipe)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    return f"{where}: {first.get('msg')}"


def load_record(path: str | Path, schema: type[BaseModel], what: str) -> BaseModel:
    """Read and validate one JSON record; any defect is one :class:`NmosdError`."""
    return validate_record(read_json(path, what), schema, what, path)


def validate_record(data: Any, schema: type[BaseModel], what: str, path: str | Path) -> BaseModel:
    """Validate a JSON record already read from ``path`` (for readers that also keep it raw)."""
    if not isinstance(data, dict):
        raise NmosdError(f"{what} {path} is not a JSON object (edited or damaged?)")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise NmosdError(f"{what} {path} is edited or damaged: {_first_error(exc)}") from None
