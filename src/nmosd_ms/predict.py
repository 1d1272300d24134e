"""Model bundles (``export``, ``fit``) and prediction on new patients (``predict``).

A bundle is a folder::

    MODEL_DIR/model.json          architecture, preprocessing, labels, cohort, cv metrics, files+sha256
    MODEL_DIR/MODEL_CARD.md       intended use, data, performance, limitations
    MODEL_DIR/weights/<name>.safetensors   one file per fold model (an ensemble)

Weight files are verified against their sha256 in model.json before anything is loaded; a missing
or altered file is refused. Nothing is unpickled.
"""

from __future__ import annotations

import datetime as _dt
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import LABELS, __version__
from .config import PrepareConfig, TrainConfig
from .data.ingest import Subject, load_manifest
from .data.preprocess import PreparedSubject, load_prepared, prepare_subject
from .errors import NmosdError
from .io import (
    atomic_dir,
    available_memory_bytes,
    inside,
    read_json,
    sha256_file,
    write_json,
    write_text,
    write_tsv,
)
from .locking import writing_folder
from .models import get_spec, model_weights
from .models.weights import load_model_file

CARD = """# Model card: {name}

**Research use only. Not a medical device; not for diagnosis or treatment decisions.**

## Model
- Architecture: `{model}` — {description}
- Input: {input} resized to {size}³ after cropping to the brain/head box (preprocessing below)
- Output: P(NMOSD); NMOSD is the positive class. The bundle averages {n} fold models; the spread
  across them is reported as an uncertainty figure.
- Views (two-/three-view models): {views}. Axes are those of the canonical RAS volume: `lr` =
  left-right, `ap` = anterior-posterior, `si` = inferior-superior; each listed axis becomes the
  channel axis of one compression block (the paper's default pair is lr + ap).

## Training data
- Cohort: {n_subjects} subjects ({counts}); cohort hash `{cohort_hash}`.
- Lesion maps: {lesion_source}
- Source: {source}. {kind}

## Performance ({perf_source})
{performance}

## Preprocessing
{preprocessing}

## Limitations
- Trained on a small cohort; performance on other scanners, protocols and populations is unknown.
- Only white-matter-lesion maps are seen (no spinal cord, no antibodies, no clinical data), which
  cannot separate NMOSD from MS for patients whose brain lesions look alike (seronegative NMOSD,
  MS with few lesions, NMOSD without brain lesions).
- {synthetic}
"""


def _sha_ok(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


def export_bundle(
    run_dir: str | Path, model: str, out_dir: str | Path, repeats: list[int] | None = None
) -> Path:
    """Bundle the fold models of ``model`` from a cv run (default: every fold of repeat 0)."""
    from .report.tables import load_run, table2
    from .training.cv import RunStore

    run_dir, out = Path(run_dir), Path(out_dir)
    run, store = load_run(run_dir), RunStore(run_dir)
    spec = get_spec(model)
    if not spec.is_torch:
        raise NmosdError(f"{model}: only neural-network models can be exported")
    if model not in run.models:
        raise NmosdError(f"{run_dir} has no finished folds of {model}")
    if out.exists():
        raise NmosdError(f"--out {out} exists; choose a new folder (bundles are never overwritten)")
    repeats = repeats if repeats is not None else [0]
    folds = run.folds[(run.folds["model"] == model) & run.folds["repeat"].isin(repeats)]
    k = int(run.meta["options"]["folds"])
    if len(folds) != k * len(repeats):
        raise NmosdError(f"{model}: repeats {repeats} are not finished in {run_dir}")
    cache_params = run.meta["options"]["prepare"]
    size = int(run.meta["models"][model]["size"])
    t2 = table2(run).set_index("model").loc[model]
    with atomic_dir(out) as tmp:
        files = []
        for _, row in folds.sort_values(["repeat", "fold"]).iterrows():
            src = store.weights(model, int(row["repeat"]), int(row["fold"]))
            meta = read_json(src.with_suffix(".json"), "fold weights record")
            if not isinstance(meta, dict) or not _sha_ok(src, str(meta.get("sha256"))):
                raise NmosdError(f"{src} does not match its recorded sha256")
            name = f"repeat-{row['repeat']}_fold-{row['fold']}.safetensors"
            (tmp / "weights").mkdir(exist_ok=True)
            shutil.copyfile(src, tmp / "weights" / name)
            files.append(
                {
                    "file": f"weights/{name}",
                    "sha256": meta["sha256"],
                    "repeat": int(row["repeat"]),
                    "fold": int(row["fold"]),
                    "test_ids": [str(i) for i in meta.get("test_ids", [])],
                }
            )
        metrics = {
            m: {
                "mean": t2[f"{m}_mean"],
                "sd": t2[f"{m}_sd"],
                "ci_low": t2[f"{m}_ci_low"],
                "ci_high": t2[f"{m}_ci_high"],
            }
            for m in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "auc")
        }
        info = _bundle_info(
            model,
            size,
            cache_params,
            run.meta,
            files,
            metrics,
            kind="cross-validation fold models",
            source=str(run_dir.resolve()),
        )
        _write_bundle(tmp, info)
        load_bundle(tmp)  # the bundle as predict will read it: refuse rather than ship a broken one
    return out


def _bundle_info(model, size, prep, run_meta, files, metrics, kind, source) -> dict:
    spec = get_spec(model)
    return {
        "format": "nmosd-ms-bundle/1",
        "name": f"nmosd-ms {model}",
        "model": model,
        "family": spec.family,
        "views": list(spec.views),
        "size": size,
        "description": spec.description,
        "preprocessing": {**prep, "size": size, "cache_size": prep["size"]},
        "labels": list(LABELS),
        "positive_class": "NMOSD",
        "training": {
            "cohort_hash": run_meta["options"]["cohort_hash"],
            "n_subjects": run_meta["options"]["n_subjects"],
            "counts": run_meta["cohort"]["counts"],
            "lesion_source": run_meta["cohort"].get("lesion_source"),
            "train_config": run_meta["options"]["train"],
            "kind": kind,
            "source": source,
        },
        "cv_metrics": metrics,
        "files": files,
        "nmosd_ms_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_bundle(folder: Path, info: dict) -> None:
    write_json(folder / "model.json", info)
    m = info["cv_metrics"]
    if m:
        perf = "\n".join(
            f"- {k.replace('_', ' ')}: {v['mean']:.3f} (SD over repeats {v['sd']:.3f}; 95 % CI "
            f"{v['ci_low']:.3f}–{v['ci_high']:.3f})"
            if v["sd"] == v["sd"]
            else f"- {k.replace('_', ' ')}: {v['mean']:.3f} (95 % CI {v['ci_low']:.3f}–{v['ci_high']:.3f})"
            for k, v in m.items()
        )
    else:
        perf = "- not estimated: this model was fitted on the whole cohort (see `nmosd-ms cv`)."
    prep = "\n".join(f"- {k}: {v}" for k, v in info["preprocessing"].items())
    counts = ", ".join(f"{v} {k}" for k, v in info["training"]["counts"].items())
    sources = info["training"].get("lesion_source")
    lesion_source = (
        "; ".join(
            f"{k} {v['given']} given, {v['segmented']} segmented by nmosd-ms"
            for k, v in sources.items()
        )
        + ". A FLAIR given alone to `predict` is segmented the same way."
        if sources
        else "not recorded (a run written before nmosd-ms recorded it)."
    )
    synthetic = (
        "If the training cohort is the built-in synthetic one, the numbers above describe "
        "synthetic data only and say nothing about patients."
    )
    write_text(
        folder / "MODEL_CARD.md",
        CARD.format(
            name=info["name"],
            model=info["model"],
            description=info["description"],
            input=info["preprocessing"]["input"],
            size=info["size"],
            n=len(info["files"]),
            views=", ".join(info["views"]) or "n/a (3D model)",
            n_subjects=info["training"]["n_subjects"],
            counts=counts,
            lesion_source=lesion_source,
            cohort_hash=info["training"]["cohort_hash"][:16],
            source=info["training"]["source"],
            kind=f"Weights: {info['training']['kind']}.",
            perf_source="cross-validation, held-out folds" if m else "none",
            performance=perf,
            preprocessing=prep,
            synthetic=synthetic,
        ),
    )


def run_training_config(run_dir: str | Path, model: str) -> tuple[TrainConfig, int]:
    """The training configuration and the input size ``model`` had in a cv run, so that a
    bundle fitted on the whole cohort is trained exactly as the folds that were evaluated."""
    from .records import RunRecord, load_record

    run_dir = Path(run_dir)
    record = load_record(run_dir / "run.json", RunRecord, "run record")
    if model not in record.models:
        raise NmosdError(f"{run_dir} did not run {model} (it ran {', '.join(record.models)})")
    size = record.models[model].size
    if size is None:
        raise NmosdError(f"{model}: only neural-network models can be fitted into a bundle")
    return record.options.train, int(size)


def fit_bundle(
    cache_dir: str | Path,
    model: str,
    out_dir: str | Path,
    train: TrainConfig,
    seed: int = 0,
    device: str = "auto",
    size: int | None = None,
) -> Path:
    """Train one model on the whole prepared cohort and bundle it (recorded as such).

    Every field of ``train`` is applied (precision, momentum, shifts, ...) and recorded in the
    bundle; ``size`` (default: the cache's) is the model's input size, as ``cv --model-size``.
    """
    from safetensors.torch import save_file

    from .data.ingest import check_trainable
    from .data.spatial import resize
    from .io import atomic_path
    from .training.loop import train_torch_fold

    spec = get_spec(model)
    if not spec.is_torch:
        raise NmosdError(f"{model}: only neural-network models can be fitted into a bundle")
    out = Path(out_dir)
    if out.exists():
        raise NmosdError(f"--out {out} exists; choose a new folder (bundles are never overwritten)")
    cohort = load_prepared(cache_dir)
    check_trainable(cohort.diagnoses, 2)
    cache_size = int(cohort.volumes.shape[-1])
    size = cache_size if size is None else int(size)
    if not 8 <= size <= cache_size:
        raise NmosdError(f"model size {size} must be between 8 and the cache size {cache_size}")
    volumes = cohort.volumes
    if size != cache_size:
        volumes = np.stack([resize(v, size) for v in volumes]).astype(np.float32)
    get_spec(model).build(size=size, weights=model_weights(model, train.weights))  # check first
    vols = torch.from_numpy(np.ascontiguousarray(volumes[:, None]))
    idx = np.arange(len(cohort.ids))
    torch.use_deterministic_algorithms(True, warn_only=True)  # as every cv fold
    res = train_torch_fold(model, vols, cohort.labels, idx, idx[:0], train, seed, device)
    with atomic_dir(out) as tmp:
        wpath = tmp / "weights" / "full.safetensors"
        with atomic_path(wpath, suffix=".safetensors") as t:
            save_file(res.state_dict, str(t), metadata={"model": model})
        files = [
            {
                "file": "weights/full.safetensors",
                "sha256": sha256_file(wpath),
                "repeat": None,
                "fold": None,
                "test_ids": [],
            }
        ]
        meta = {
            "options": {
                "cohort_hash": cohort.cohort_hash,
                "n_subjects": len(cohort.ids),
                "train": train.model_dump(mode="json"),
            },
            "cohort": {"counts": cohort.counts, "lesion_source": cohort.lesion_sources},
        }
        info = _bundle_info(
            model,
            size,
            cohort.params,
            meta,
            files,
            {},
            kind="one model fitted on the whole cohort (no held-out estimate)",
            source=str(Path(cache_dir).resolve()),
        )
        _write_bundle(tmp, info)
    return out


@dataclass
class Bundle:
    path: Path
    info: dict
    models: list[torch.nn.Module]


def _check_memory(info, folder: Path) -> None:
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


def load_bundle(model_dir: str | Path) -> Bundle:
    """Read a bundle: model.json validated (:class:`~nmosd_ms.records.BundleRecord`), each
    weight file checked against its sha256 before it is read, nothing unpickled."""
    from .records import BundleRecord, validate_record

    folder = Path(model_dir)
    if not (folder / "model.json").exists():
        raise NmosdError(f"{folder} is not a model bundle (no model.json; see nmosd-ms export)")
    info = read_json(folder / "model.json", "bundle description")
    record = validate_record(info, BundleRecord, "bundle description", folder / "model.json")
    spec = get_spec(record.model)
    if not spec.is_torch:
        raise NmosdError(f"{folder}/model.json names {record.model}, which is not a network")
    _check_memory(record, folder)
    info["preprocessing"] = record.preprocessing.model_dump(mode="json")
    models = []
    for f in record.files:
        path = inside(folder, f.file, action="read")
        if not path.is_file():
            raise NmosdError(f"bundle {folder} is incomplete: {f.file} is missing")
        if sha256_file(path) != f.sha256:
            raise NmosdError(f"bundle {folder}: {f.file} was altered (sha256 mismatch); refusing")
        net = spec.build(size=record.size)
        load_model_file(net, path)
        models.append(net.eval())
    return Bundle(folder, info, models)


def prepare_for_bundle(bundle: Bundle, subject: Subject) -> PreparedSubject:
    """Exactly the bundle's preprocessing (at the cache size, then the model size if smaller)."""
    p = dict(bundle.info["preprocessing"])
    cache_size, size = int(p.pop("cache_size")), int(p["size"])
    # A FLAIR without a lesion mask is segmented (nmosd_ms.segment), as prepare --segment-missing.
    prep = prepare_subject(
        subject, PrepareConfig(**{**p, "size": cache_size, "segment_missing": True})
    )
    if size != cache_size:
        from .data.spatial import resize

        prep.array = resize(prep.array, size).astype(np.float32)
    return prep


@torch.no_grad()
def ensemble_probabilities(bundle: Bundle, volume: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return np.array([float(torch.softmax(m(x), 1)[0, 1]) for m in bundle.models])


def subjects_from_manifest(path: str | Path) -> list[Subject]:
    """Prediction manifest: participant_id, lesion_mask and/or flair[, brain_mask] (no labels)."""
    return list(load_manifest(path, labelled=False).subjects)


def predict_subjects(
    bundle: Bundle,
    subjects: list[Subject],
    out_dir: str | Path | None = None,
    saliency: bool = False,
    occlusion_size: int = 16,
    progress=None,
) -> pd.DataFrame:
    """Predict every subject (all inputs validated first); write predictions and saliency maps.

    ``out_dir`` (needed for saliency) is created and locked before any work, so an unwritable or
    busy folder is refused at once; it must not already hold predictions. Every file written is
    named from a validated participant ID and checked to stay inside it.
    """
    if saliency and out_dir is None:
        raise NmosdError("saliency maps need an output folder")
    if out_dir is None:
        return _predict(bundle, subjects, None, saliency, occlusion_size, progress)
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("predictions.*")):
        raise NmosdError(f"--out {out} already holds predictions; choose a new folder")
    with writing_folder(out, "prediction folder"):
        return _predict(bundle, subjects, out, saliency, occlusion_size, progress)


def _predict(bundle, subjects, out, saliency, occlusion_size, progress) -> pd.DataFrame:
    ids = [s.participant_id for s in subjects]
    if len(set(ids)) != len(ids):
        raise NmosdError("a participant_id is given twice")
    prepared = [prepare_for_bundle(bundle, s) for s in subjects]  # validates everything first
    rows, maps = [], {}
    for i, (s, prep) in enumerate(zip(subjects, prepared, strict=True)):
        probs = ensemble_probabilities(bundle, prep.array)
        mean = float(probs.mean())
        rows.append(
            {
                "participant_id": s.participant_id,
                "prob_nmosd": mean,
                "predicted": "NMOSD" if mean >= 0.5 else "MS",
                "lesion_source": prep.row["lesion_source"],
                "segmentation": f"{s.participant_id}_wmh.nii.gz"
                if prep.segmentation_bits is not None
                else "",
                "fold_spread": float(probs.std(ddof=1)) if len(probs) > 1 else math.nan,
                "fold_min": float(probs.min()),
                "fold_max": float(probs.max()),
                **{
                    f"prob_{Path(f['file']).stem}": float(p)
                    for f, p in zip(bundle.info["files"], probs, strict=True)
                },
            }
        )
        if saliency:
            from .interpret import occlusion_map

            maps[s.participant_id] = occlusion_map(bundle.models, prep.array, occlusion_size)
        if progress:
            progress(i + 1, len(subjects))
    df = pd.DataFrame(rows)
    if out is not None:
        for prep, row in zip(prepared, rows, strict=True):
            if row["segmentation"]:  # what the model saw, for review (+ PNG)
                prep.save_segmentation(inside(out, row["segmentation"]))
        if saliency:
            from .interpret import save_saliency

            for s, prep in zip(subjects, prepared, strict=True):
                save_saliency(out, s, prep, maps[s.participant_id])
        # the tables last: a folder with predictions.tsv is complete
        write_json(
            out / "predictions.json",
            {
                "bundle": str(bundle.path.resolve()),
                "model": bundle.info["model"],
                "nmosd_ms_version": __version__,
                "threshold": 0.5,
                "predictions": df.to_dict("records"),
            },
        )
        write_tsv(out / "predictions.tsv", df)
    return df
