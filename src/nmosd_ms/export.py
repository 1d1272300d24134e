"""``export``: a cv run's fold models become a bundle. This step reads the run folder
(:mod:`.training.runfolder`) and its tables (:mod:`.report.tables`) and writes through the
bundle format's owner (:mod:`.bundle`), so it sits above all three."""

from __future__ import annotations

from pathlib import Path

from .bundle import METRIC_NAMES, cohort_record, make_info, write_bundle
from .data.cache import load_prepared
from .errors import NmosdError
from .models import get_spec
from .report.tables import table2
from .training.runfolder import RunFolder


def export_bundle(
    run_dir: str | Path, model: str, out_dir: str | Path, repeats: list[int] | None = None
) -> Path:
    """Bundle the fold models of ``model`` from the cv run folder ``run_dir`` into the new
    folder ``out_dir``: the fold models of ``repeats`` (default ``[0]``: the k models of repeat 0)
    form an ensemble; the cross-validated metrics go into the model card. Returns ``out_dir``."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists():
        raise NmosdError(f"the bundle folder {out} exists; bundles are never overwritten")
    folder = RunFolder(run_dir)
    run = folder.load()
    spec = get_spec(model)
    if not spec.is_torch:
        raise NmosdError(f"{model}: only neural-network models can be exported")
    if model not in run.models:
        raise NmosdError(f"{run_dir} has no finished folds of {model}")
    repeats = repeats if repeats is not None else [0]
    folds = run.folds[(run.folds["model"] == model) & run.folds["repeat"].isin(repeats)]
    k = int(run.meta["options"]["folds"])
    if len(folds) != k * len(repeats):
        raise NmosdError(f"{model}: repeats {repeats} are not finished in {run_dir}")
    train, size = folder.training_config(model)
    t2 = table2(run).set_index("model").loc[model]
    metrics = {
        m: {
            "mean": t2[f"{m}_mean"],
            "sd": t2[f"{m}_sd"],
            "ci_low": t2[f"{m}_ci_low"],
            "ci_high": t2[f"{m}_ci_high"],
        }
        for m in METRIC_NAMES
    }
    weights, files = {}, []
    for w in folder.fold_weights(model, folds):
        name = f"weights/repeat-{w.repeat}_fold-{w.fold}.safetensors"
        weights[name] = w.path
        files.append(
            {
                "file": name,
                "sha256": w.sha256,
                "repeat": w.repeat,
                "fold": w.fold,
                "test_ids": w.test_ids,
            }
        )
    opts, cohort = run.meta["options"], run.meta["cohort"]
    record, baselines = run_cohort_record(cohort.get("path"), opts["cohort_hash"], opts["seed"])
    training = {
        "cohort_hash": opts["cohort_hash"],
        "n_subjects": opts["n_subjects"],
        "counts": cohort["counts"],
        "lesion_source": cohort.get("lesion_source"),
        "train": train,
        "seed": opts["seed"],
        "kind": "cross-validation fold models",
        "source": str(run_dir.resolve()),
        "participant_ids": sorted(set(run.splits["participant_id"].astype(str))),
        **record,
        "pretraining": run.meta["models"][model].get("pretraining"),
        "environment": run.meta.get("environment"),
    }
    info = make_info(model, size, opts["prepare"], training, files, metrics)
    return write_bundle(out, info, weights, baselines)


def run_cohort_record(path: str | None, cohort_hash: str, seed: int):
    """:func:`cohort_record` of a cv run's cache when it is still there and unchanged (else the
    bundle carries no baselines, no input hashes and no summary: ``evaluate`` says so)."""
    if not path or path == "in memory" or not Path(path).is_dir():
        return {}, {}
    try:
        cohort = load_prepared(path)
    except NmosdError:
        return {}, {}
    if cohort.cohort_hash != cohort_hash:
        return {}, {}
    return cohort_record(cohort, seed)
