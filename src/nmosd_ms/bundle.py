"""Model bundles: their one owner (format, model card, writing, reading, export from a cv run).

A bundle is a folder::

    MODEL_DIR/model.json          BundleInfo: architecture, preprocessing, training, metrics, files
    MODEL_DIR/MODEL_CARD.md       intended use, data, performance, limitations
    MODEL_DIR/weights/<name>.safetensors   one file per fold model (an ensemble)

``model.json`` is a typed, versioned record (:class:`BundleInfo`, format ``nmosd-ms-bundle/2``)
that holds the full :class:`~nmosd_ms.config.PrepareConfig` the inputs need, the model's input
size and the full :class:`~nmosd_ms.config.TrainConfig` it was trained with. Bundles of format 1
are read and upgraded in memory. Weight files are verified against their sha256 before anything
is loaded; a missing or altered file is refused. Nothing is unpickled.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .config import PrepareConfig, TrainConfig
from .constants import LABELS, POSITIVE, THRESHOLD, __version__
from .errors import NmosdError
from .io import (
    atomic_dir,
    available_memory_bytes,
    inside,
    read_json,
    save_tensors,
    sha256_file,
    write_json,
    write_text,
)
from .models import get_spec
from .models.lesionload import LesionLoadModel
from .models.weights import load_model_file
from .records import MAX_SIZE, MIN_SIZE, Environment, validate_record

FORMAT = "nmosd-ms-bundle/2"
CARD_NAME = "MODEL_CARD.md"
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # records of newer versions stay readable


class BundleFile(_Record):
    """One fold model's weights: a path inside the bundle and its sha256."""

    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    repeat: int | None = None
    fold: int | None = None
    test_ids: list[str] = Field(default_factory=list)


class MetricSummary(_Record):
    mean: float | None = None
    sd: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class PriorReference(_Record):
    """The unlabelled maps a prior was pretrained on (``nmosd-ms pretrain``): ``evaluate``
    counts them as seen, as it does the training cohort."""

    cohort_hash: str
    n_subjects: int = Field(ge=1)
    participant_ids: list[str] = Field(default_factory=list)
    input_sha256: list[str] = Field(default_factory=list)
    weights_sha256: str = ""


class TrainingRecord(_Record):
    """Where the weights come from: the cohort (IDs and input hashes, for leakage checks), the
    full training options and seed, and how they were made (cv folds or one fit)."""

    cohort_hash: str
    n_subjects: int = Field(ge=1)
    counts: dict[str, int]
    lesion_source: dict[str, dict[str, int]] | None = None
    train: TrainConfig
    seed: int | None = None
    kind: str
    source: str
    participant_ids: list[str] = Field(default_factory=list)
    input_sha256: list[str] = Field(default_factory=list)
    summary: dict | None = Field(
        None, description="class balance, load quantiles, grids (nmosd_ms.data.summary)"
    )
    pretraining: PriorReference | None = Field(
        None, description="the prior the weights started from (nmosd-ms pretrain), if any"
    )
    environment: Environment | None = Field(
        None,
        description="where the weights were computed: device, torch threads, versions (for "
        "exported folds, the cv run's, as its last writer recorded it; none in older bundles)",
    )


class BaselineFile(_Record):
    """A lesion-load model fitted on the whole training cohort (its parameters as arrays in a
    safetensors file, no pickle): what ``evaluate`` sets beside the network on another cohort."""

    name: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BundleInfo(_Record):
    """``model.json``: everything needed to preprocess a new subject exactly as the training
    cohort was, to rebuild the networks, and to say where they come from."""

    format: Literal["nmosd-ms-bundle/2"] = FORMAT
    name: str
    model: str
    family: str = ""
    views: list[str] = Field(default_factory=list)
    description: str = ""
    size: int = Field(ge=MIN_SIZE, le=MAX_SIZE, description="the networks' input edge length")
    prepare: PrepareConfig = Field(description="preprocessing, at the cache's size")
    labels: list[str] = Field(default_factory=lambda: list(LABELS))
    positive_class: str = POSITIVE
    threshold: float = Field(THRESHOLD, gt=0, lt=1)
    training: TrainingRecord
    cv_metrics: dict[str, MetricSummary] = Field(default_factory=dict)
    files: list[BundleFile] = Field(min_length=1)
    baselines: list[BaselineFile] = Field(default_factory=list)
    nmosd_ms_version: str = ""
    created: str = ""

    @property
    def cache_size(self) -> int:
        return int(self.prepare.size)


def _upgrade_v1(data: dict) -> dict:
    """A format-1 ``model.json`` (preprocessing = PrepareConfig at the model size + cache_size;
    training.train_config) as format 2, so that one schema validates both."""
    if data.get("format") != "nmosd-ms-bundle/1":
        return data
    out = dict(data)
    prep = dict(out.pop("preprocessing", None) or {})
    if "cache_size" in prep:
        prep["size"] = prep.pop("cache_size")
    out["prepare"] = prep
    training = dict(out.get("training") or {})
    if "train_config" in training:
        training["train"] = training.pop("train_config")
    out["training"] = training
    out["format"] = FORMAT
    return out


@dataclass
class Bundle:
    """A loaded bundle: its folder, its :class:`BundleInfo` and the fold networks (eval mode)."""

    path: Path
    info: BundleInfo
    models: list[torch.nn.Module]
    baselines: dict[str, LesionLoadModel] = field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> Bundle:
        return load_bundle(model_dir, device)

    @property
    def device(self) -> torch.device:
        """Where the fold networks are (and where :meth:`predict_volume` computes)."""
        return next(self.models[0].parameters()).device

    def to(self, device: str | torch.device) -> Bundle:
        """Move the fold networks to ``device`` ("auto", "cpu", "cuda" or "cuda:N")."""
        from .training.device import resolve_device

        dev = device if isinstance(device, torch.device) else resolve_device(device)
        self.models = [m.to(dev) for m in self.models]
        return self

    @torch.no_grad()
    def predict_volume(self, volume: np.ndarray) -> np.ndarray:
        """P(NMOSD) of each fold model for one prepared volume (S, S, S) at the bundle's size."""
        volume = np.asarray(volume, dtype=np.float32)
        if volume.shape != (self.info.size,) * 3:
            raise NmosdError(
                f"the bundle's networks take a {self.info.size}³ volume, not {volume.shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(volume))[None, None].to(self.device)
        probs = torch.stack([torch.softmax(m(x), 1)[0, 1] for m in self.models])
        return probs.double().cpu().numpy()  # one device-to-host copy per subject


def _check_memory(info: BundleInfo, folder: Path) -> None:
    """Refuse a bundle whose model size would not fit in memory before torch allocates it."""
    size = int(info.size)
    per_voxel = 64 * 4 if get_spec(info.model).family == "resnet3d" else 16 * 4 * 2
    need = per_voxel * size**3
    avail = available_memory_bytes()
    if avail is not None and need > avail // 2:
        raise NmosdError(
            f"bundle {folder}: a {info.model} at size {size}³ needs about {need / 2**30:.1f} GiB, "
            f"more than half the {avail / 2**30:.1f} GiB available"
        )


def read_info(model_dir: str | Path) -> BundleInfo:
    """``model.json`` of a bundle, validated (format 1 upgraded); no weights are read."""
    folder = Path(model_dir)
    if not (folder / "model.json").exists():
        raise NmosdError(f"{folder} is not a model bundle (no model.json)")
    data = read_json(folder / "model.json", "bundle description")
    if isinstance(data, dict):
        data = _upgrade_v1(data)
    info = validate_record(data, BundleInfo, "bundle description", folder / "model.json")
    if info.size > info.cache_size:
        raise NmosdError(f"{folder}/model.json: size {info.size} exceeds prepare.size")
    return info


def load_bundle(model_dir: str | Path, device: str = "cpu") -> Bundle:
    """Read the bundle folder ``model_dir``: model.json validated (:class:`BundleInfo`), each
    weight file checked against its sha256 before it is read, nothing unpickled. The networks
    are placed on ``device`` ("cpu", "auto": a GPU when there is one, "cuda", "cuda:N")."""
    folder = Path(model_dir)
    info = read_info(folder)
    spec = get_spec(info.model)
    if not spec.is_torch:
        raise NmosdError(f"{folder}/model.json names {info.model}, which is not a network")
    _check_memory(info, folder)
    models = []
    for f in info.files:
        path = _verified(folder, f.file, f.sha256)
        net = spec.build(size=info.size)
        load_model_file(net, path)
        models.append(net.eval())
    return Bundle(folder, info, models, _load_baselines(folder, info)).to(device)


def _verified(folder: Path, file: str, sha256: str) -> Path:
    """A file the bundle lists: inside it, present, and with the sha256 recorded for it."""
    path = inside(folder, file, action="read")
    if not path.is_file():
        raise NmosdError(f"bundle {folder} is incomplete: {file} is missing")
    if sha256_file(path) != sha256:
        raise NmosdError(f"bundle {folder}: {file} was altered (sha256 mismatch); refusing")
    return path


def _load_baselines(folder: Path, info: BundleInfo) -> dict[str, LesionLoadModel]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out = {}
    for b in info.baselines:
        path = _verified(folder, b.file, b.sha256)
        try:
            out[b.name] = LesionLoadModel(b.name, load_file(str(path)))
        except (SafetensorError, ValueError) as exc:
            raise NmosdError(f"bundle {folder}: {b.file}: {exc}") from None
    return out


def make_info(
    model: str,
    size: int,
    prepare: PrepareConfig | dict,
    training: dict[str, Any],
    files: list[dict],
    metrics: dict | None = None,
) -> BundleInfo:
    """A validated :class:`BundleInfo` for ``model`` at input ``size``."""
    spec = get_spec(model)
    return BundleInfo(
        name=f"nmosd-ms {model}",
        model=model,
        family=spec.family,
        views=list(spec.views),
        description=spec.description,
        size=size,
        prepare=prepare,
        training=training,
        cv_metrics=metrics or {},
        files=files,
        nmosd_ms_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_bundle(
    out_dir: str | Path,
    info: BundleInfo,
    weights: dict[str, Path | dict],
    baselines: dict[str, dict[str, np.ndarray]] | None = None,
) -> Path:
    """Write a new bundle folder atomically: ``weights`` maps each ``info.files[i].file`` to a
    weight file to copy or a state dict to save; ``baselines`` maps lesion-load model names to
    their arrays (:func:`~nmosd_ms.models.lesionload.fit_lesionload_arrays`). The bundle is read
    back (as ``predict`` will) before it is moved into place. An existing ``out_dir`` is
    refused."""
    out = Path(out_dir)
    if out.exists():
        raise NmosdError(f"the bundle folder {out} exists; bundles are never overwritten")
    with atomic_dir(out) as tmp:
        files = []
        for f in info.files:
            target = inside(tmp, f.file)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = weights[f.file]
            if isinstance(src, dict):
                save_tensors(target, src, {"model": info.model})
            else:
                shutil.copyfile(src, target)
            files.append(f.model_copy(update={"sha256": sha256_file(target)}))
        listed = []
        for name, arrays in (baselines or {}).items():
            target = inside(tmp, f"baselines/{name}.safetensors")
            target.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(target, {k: np.ascontiguousarray(v) for k, v in arrays.items()})
            listed.append(
                BaselineFile(
                    name=name, file=target.relative_to(tmp).as_posix(), sha256=sha256_file(target)
                )
            )
        info = info.model_copy(update={"files": files, "baselines": listed})
        write_json(tmp / "model.json", info.model_dump(mode="json"))
        write_text(tmp / CARD_NAME, model_card(info))
        load_bundle(tmp)  # refuse rather than ship a bundle predict cannot read
    return out


PLACEHOLDER_SHA = "0" * 64


def cohort_record(cohort, seed: int = 0) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """What a bundle keeps of its training cohort (a
    :class:`~nmosd_ms.data.cache.PreparedCohort`) besides the weights: the record fields for
    leakage checks and comparisons (participants, input hashes, summary) and the lesion-load
    models fitted on it (as arrays), which ``evaluate`` sets beside the network elsewhere."""
    from .data.features import FEATURES
    from .data.summary import cohort_summary
    from .models.lesionload import fit_lesionload_arrays

    record = {**cohort.inputs, "summary": cohort_summary(cohort)}
    features = cohort.features()[list(FEATURES)].to_numpy(dtype=np.float64)
    return record, fit_lesionload_arrays(features, cohort.labels, seed)


CARD = """# Model card: {name}

**Research use only. Not a medical device; not for diagnosis or treatment decisions.**

## Model
- Architecture: `{model}` — {description}
- Input: {input} resized to {size}³ after cropping to the brain/head box (preprocessing below)
- Output: P(NMOSD); NMOSD is the positive class, called at P(NMOSD) ≥ {threshold}. The bundle
  averages {n} fold model(s); the spread across them is reported as an uncertainty figure.
- Views (two-/three-view models): {views}. Axes are those of the canonical RAS volume: `lr` =
  left-right, `ap` = anterior-posterior, `si` = inferior-superior; each listed axis becomes the
  channel axis of one compression block (the paper's default pair is lr + ap).

## Training data
- Cohort: {n_subjects} subjects ({counts}); cohort hash `{cohort_hash}`.
- Lesion maps: {lesion_source}
- Source: {source}. Weights: {kind}.
- Training options: {train}
- Computed on: {environment}
- Lesion-load baselines fitted on the whole cohort (for `nmosd-ms evaluate` on other cohorts):
  {baselines}

## Performance ({perf_source})
{performance}

## Preprocessing
{preprocessing}

## Limitations
- Trained on a small cohort; performance on other scanners, protocols and populations is unknown.
- Only white-matter-lesion maps are seen (no spinal cord, no antibodies, no clinical data), which
  cannot separate NMOSD from MS for patients whose brain lesions look alike (seronegative NMOSD,
  MS with few lesions, NMOSD without brain lesions).
- If the training cohort is the built-in synthetic one, the numbers above describe synthetic data
  only and say nothing about patients.
"""


def model_card(info: BundleInfo) -> str:
    """``MODEL_CARD.md`` of a bundle, from its :class:`BundleInfo` alone."""
    m = info.cv_metrics
    lines = []
    for k, v in m.items():
        ci = f"95 % CI {v.ci_low:.3f}–{v.ci_high:.3f}"
        sd = f"SD over repeats {v.sd:.3f}; " if v.sd is not None and v.sd == v.sd else ""
        lines.append(f"- {k.replace('_', ' ')}: {v.mean:.3f} ({sd}{ci})")
    perf = "\n".join(lines) or (
        "- not estimated: this model was fitted on the whole cohort (see `nmosd-ms cv`)."
    )
    prep = "\n".join(f"- {k}: {v}" for k, v in info.prepare.model_dump().items())
    prep += f"\n- model input size: {info.size} (resized from the prepared {info.cache_size}³)"
    t = info.training
    counts = ", ".join(f"{v} {k}" for k, v in t.counts.items())
    lesion_source = (
        "; ".join(
            f"{k} {v['given']} given, {v['segmented']} segmented by nmosd-ms"
            for k, v in t.lesion_source.items()
        )
        + ". A FLAIR given alone to `predict` is segmented the same way."
        if t.lesion_source
        else "not recorded (a run written before nmosd-ms recorded it)."
    )
    train = ", ".join(f"{k}={v}" for k, v in t.train.model_dump().items())
    env = t.environment
    environment = (
        f"{env.device} ({env.device_name}, {env.cpu_count} CPUs), "
        f"{'?' if env.torch_threads is None else env.torch_threads} torch thread(s), "
        f"torch {env.torch} "
        "(changes the time and, on a CPU, the last bits of the weights; not the recipe)"
        if env is not None
        else "not recorded (a bundle written before nmosd-ms recorded it)."
    )
    return CARD.format(
        name=info.name,
        model=info.model,
        description=info.description,
        input=info.prepare.input,
        size=info.size,
        threshold=info.threshold,
        n=len(info.files),
        views=", ".join(info.views) or "n/a (3D model)",
        n_subjects=t.n_subjects,
        counts=counts,
        lesion_source=lesion_source,
        cohort_hash=t.cohort_hash[:16],
        source=t.source,
        kind=t.kind,
        train=train + (f", seed={t.seed}" if t.seed is not None else ""),
        environment=environment,
        baselines=", ".join(f"`{b.name}`" for b in info.baselines) or "none recorded",
        perf_source="cross-validation, held-out folds" if m else "none",
        performance=perf,
        preprocessing=prep,
    )
