"""``fit``: train one final model on a whole prepared cohort and bundle it (no held-out estimate:
the performance to quote is that of ``cv`` with the same options)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .bundle import PLACEHOLDER_SHA, cohort_record, make_info, write_bundle
from .config import TrainConfig
from .data.cache import PreparedCohort, load_prepared
from .data.ingest import check_trainable
from .errors import NmosdError
from .models import get_spec, model_weights
from .spatial import resize
from .training import loop
from .training.device import environment as describe_environment
from .training.device import resolve_device, torch_threads
from .training.pretrain import check_pretraining, prior_reference
from .training.runfolder import RunFolder


def run_training_config(run_dir: str | Path, model: str) -> tuple[TrainConfig, int]:
    """The training options and input size ``model`` had in a cv run (see ``fit --from-run``)."""
    return RunFolder(run_dir).training_config(model)


def fittable_spec(model: str):
    """The registry entry of ``model`` if :func:`fit_bundle` can fit it (a network), else a user
    error: for callers that check their input before any work."""
    spec = get_spec(model)
    if not spec.is_torch:
        raise NmosdError(f"{model}: only neural-network models can be fitted into a bundle")
    return spec


def fit_bundle(
    cache_dir: str | Path | PreparedCohort,
    model: str,
    out_dir: str | Path,
    train: TrainConfig,
    seed: int = 0,
    device: str = "auto",
    size: int | None = None,
    threads: int = 0,
    progress: loop.EpochCallback | None = None,
) -> Path:
    """Train ``model`` on the whole prepared cohort and write it as a new bundle.

    Parameters
    ----------
    cache_dir : path or PreparedCohort
        The prepared cohort (a cache folder, or one in memory).
    model : str
        A network of the registry (``nmosd-ms models``), e.g. ``twoview-18``.
    out_dir : path
        The new bundle folder (refused if it exists).
    train : TrainConfig
        Every field is applied (precision, momentum, shifts, ...) and recorded in the bundle, so
        that the bundle's own record retrains it: ``fit_bundle(cohort, info.model, out,
        info.training.train, info.training.seed, size=info.size)``.
    seed : int
        Seed of the weights' initialisation, the batches and the augmentation.
    device : {"auto", "cpu", "cuda"}
    size : int, optional
        The network's input size (default: the cache's), as ``cv``'s model sizes.
    threads : int
        Torch threads while it trains (0: torch's setting); restored afterwards. Recorded in
        the bundle's ``training.environment`` with the device and versions (it changes the time
        and, on a CPU, the last bits of the weights, not the recipe).
    progress : callable, optional
        ``progress(epoch, epochs)`` when training starts (epoch 0) and after each epoch.
    """
    spec = fittable_spec(model)
    out = Path(out_dir)
    if out.exists():
        raise NmosdError(f"the bundle folder {out} exists; bundles are never overwritten")
    cohort = cache_dir if isinstance(cache_dir, PreparedCohort) else load_prepared(cache_dir)
    check_trainable(cohort.diagnoses, 2)
    cache_size = int(cohort.volumes.shape[-1])
    size = cache_size if size is None else int(size)
    if not 8 <= size <= cache_size:
        raise NmosdError(f"model size {size} must be between 8 and the cache size {cache_size}")
    volumes = cohort.volumes
    if size != cache_size:
        volumes = np.stack([resize(v, size) for v in volumes]).astype(np.float32)
    weights = model_weights(model, train.weights)
    prior = check_pretraining(weights, cohort, model, size, held_out=False)  # of another kind?
    spec.build(size=size, weights=weights)  # check first
    vols = torch.from_numpy(np.ascontiguousarray(volumes[:, None]))
    idx = np.arange(len(cohort.ids))
    torch.use_deterministic_algorithms(True, warn_only=True)  # as every cv fold
    with torch_threads(threads):
        environment = describe_environment(resolve_device(device))  # with the threads it uses
        if progress:
            progress(0, train.epochs)
        fold = loop.FoldData(vols, cohort.labels, idx, idx[:0])
        res = loop.train_torch_fold(model, fold, train, seed=seed, device=device, on_epoch=progress)
    name = "weights/full.safetensors"
    record, baselines = cohort_record(cohort, seed)
    training = {
        "cohort_hash": cohort.cohort_hash,
        "n_subjects": len(cohort.ids),
        "counts": cohort.counts,
        "lesion_source": cohort.lesion_sources,
        "train": train,
        "seed": seed,
        "kind": "one model fitted on the whole cohort (no held-out estimate)",
        "source": str(cohort.path.resolve()) if cohort.path is not None else "in memory",
        **record,
        "pretraining": prior_reference(prior),
        "environment": environment,
    }
    files = [{"file": name, "sha256": PLACEHOLDER_SHA}]  # the real digest is set when written
    info = make_info(model, size, cohort.params, training, files)
    return write_bundle(out, info, {name: res.state_dict}, baselines)
