"""nmosd-ms: tell NMOSD from MS on 3D T2-FLAIR white-matter-lesion maps (research use only).

The Python API is the one the ``nmosd-ms`` command line uses, step by step::

    import nmosd_ms as nm

    nm.generate_cohort("cohort", n_nmosd=20, n_ms=20, seed=0)          # synthetic BIDS cohort
    cohort = nm.load_cohort("cohort")                                   # BIDS folder or manifest
    nm.prepare(cohort, "prepared", nm.PrepareConfig(size=32))           # the prepared cache
    config = nm.CVConfig(models=("twoview-18",), repeats=1, train=nm.TrainConfig(epochs=5))
    nm.run_cv("prepared", "run", config)                                # cross-validation
    nm.build_report("run")                                              # tables, figures, HTML
    bundle = nm.load_bundle(nm.export_bundle("run", "twoview-18", "model"))
    nm.predict_subjects(bundle, cohort.subjects[:2])                    # new patients

and on arrays, without files: :func:`preprocess_arrays` (one subject from arrays + affine),
:meth:`PreparedCohort.from_subjects` (an in-memory cohort that :func:`run_cv` and
:func:`fit_bundle` accept), :func:`predict_arrays`, :meth:`Bundle.predict_volume` and
:func:`saliency_volume`. ``examples/quickstart.py`` runs the whole workflow through this API.

Names are imported on first use, so ``import nmosd_ms`` stays cheap (torch is loaded only by
the steps that need it). Errors a user can cause are :class:`NmosdError`.
"""

from __future__ import annotations

import importlib

from .constants import LABELS, POSITIVE, THRESHOLD, __version__

#: public name -> module that defines it
_EXPORTS = {
    # options
    "PrepareConfig": "config",
    "TrainConfig": "config",
    "CVConfig": "config",
    "PretrainConfig": "config",
    "SegmentConfig": "config",
    "NmosdError": "errors",
    # synthetic cohort
    "generate_cohort": "phantom",
    # input
    "Subject": "data.ingest",
    "Cohort": "data.ingest",
    "load_cohort": "data.dataset",
    "load_manifest": "data.ingest",
    "load_bids": "data.bids",
    "parse_bids_filters": "data.bids",
    # segmentation
    "segment_wmh": "segment",
    "segment_file": "segment",
    # preprocessing and the prepared cache
    "preprocess_arrays": "data.preprocess",
    "prepare_subject": "data.preprocess",
    "PreparedSubject": "data.preprocess",
    "prepare": "data.cache",
    "load_prepared": "data.cache",
    "PreparedCache": "data.cache",
    "PreparedCohort": "data.cache",
    # models
    "build_model": "models",
    "list_models": "models",
    "model_table": "models",
    # self-supervised prior from unlabelled maps
    "pretrain_weights": "training.pretrain",
    # cross-validation
    "run_cv": "training.cv",
    "collect_cv": "training.cv",
    "plan_splits": "training.plan",
    "LocalExecutor": "training.executors",
    "DaskExecutor": "training.executors",
    "RunFolder": "training.runfolder",
    # report
    "build_report": "report",
    "report_status": "report",
    # bundles, final training, prediction
    "Bundle": "bundle",
    "BundleInfo": "bundle",
    "load_bundle": "bundle",
    "export_bundle": "export",
    "fit_bundle": "fit",
    "predict_subjects": "predict",
    "predict_arrays": "predict",
    "saliency_volume": "predict",
    # external validation
    "evaluate_cohort": "evaluate",
    "Evaluation": "evaluate",
}

__all__ = ["LABELS", "POSITIVE", "THRESHOLD", "__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nmosd_ms' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
