"""``pretrain``: a prior for the networks, made from lesion maps without their diagnoses.

The paper fine-tuned ImageNet weights. Where those are not at hand (no internet, a 3D model, or
a wish not to depend on photographs), a small cohort can make its own prior: the network learns
a pretext task on unlabelled prepared lesion maps, and cross-validation or ``fit`` then starts
from these weights (``--weights OUT/weights.safetensors``).

The pretext: say which cells of a G×G×G grid over the prepared volume hold lesion (multi-label,
binary cross-entropy on the backbone's pooled features through a linear head that is not kept).
It asks the backbone for what the task needs, where lesions are, and reads no diagnosis.

The maps must not be those of the subjects the weights are then evaluated on: a held-out fold
whose maps the pretraining saw is not held out. ``pretrain.json`` records who and what the maps
were made from (participant IDs, sha256 of the FLAIRs and lesion masks, as a bundle does), and
``cv`` refuses weights whose pretraining cohort shares any of them with its own
(:func:`check_pretraining`).

Folder written (never overwritten; locked while written)::

    OUT/weights.safetensors   the whole model; its classifier keeps its seeded initialisation;
                              its metadata marks it as a prior, so that it is refused
                              wherever it lies without the record that describes it
    OUT/pretrain.json         the record (PretrainRecord): model, options, seed, the cohort's
                              prepare parameters, hash, IDs and input sha256, the loss curve
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..config import PretrainConfig
from ..constants import __version__
from ..data.cache import PreparedCohort, load_prepared
from ..errors import NmosdError
from ..io import atomic_path, inside, sha256_file, write_json, write_tensors
from ..locking import writing_folder
from ..models import get_spec
from ..records import PretrainRecord, load_record
from .device import environment, prepare_device, resolve_device, torch_threads
from .pretext import pretext_fit

WEIGHTS_NAME = "weights.safetensors"
#: The ``tool`` entry of a prior's safetensors metadata.
PRIOR_TOOL = "nmosd-ms pretrain"
RECORD_NAME = "pretrain.json"


def pretrain_weights(
    cache_dir: str | Path | PreparedCohort,
    model: str,
    out_dir: str | Path,
    config: PretrainConfig | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int = 0,
) -> Path:
    """Pretrain ``model`` on the prepared lesion maps of ``cache_dir`` (diagnoses unused) and
    write its weights and record into the new folder ``out_dir``. Returns ``out_dir``.

    Parameters
    ----------
    cache_dir : path or PreparedCohort
        Unlabelled maps: a prepared cache (or one in memory) of subjects who are not in the
        cohort the weights will be evaluated on. Its diagnosis column is not read.
    model : str
        A network of the registry, e.g. ``twoview-18``; the weights fit only that model at the
        cache's size.
    out_dir : path
        The new folder (refused if it exists).
    config : PretrainConfig
        Epochs, batch size, Adam learning rate, grid, augmentation, precision.
    seed : int
        Seed of the initialisation, the batches and the augmentation.
    device : {"auto", "cpu", "cuda"}
    threads : int
        Torch threads (0: torch's default); restored afterwards. Recorded in the record's
        ``environment`` with the device and versions.
    """
    config = config or PretrainConfig()
    spec = get_spec(model)
    if not spec.is_torch:
        raise NmosdError(f"{model}: only neural-network models can be pretrained")
    out = Path(out_dir)
    if out.exists():
        raise NmosdError(f"the pretraining folder {out} exists; it is never overwritten")
    cohort = cache_dir if isinstance(cache_dir, PreparedCohort) else load_prepared(cache_dir)
    if len(cohort.ids) < config.batch_size:
        raise NmosdError(
            f"pretraining needs at least one batch of maps ({config.batch_size}); "
            f"the cohort has {len(cohort.ids)}"
        )
    size = int(cohort.volumes.shape[-1])
    if config.grid > size:
        raise NmosdError(f"grid {config.grid} is finer than the volumes ({size}³)", option="grid")
    dev = resolve_device(device)
    with writing_folder(out, "pretraining folder"):
        weights_path = inside(out, WEIGHTS_NAME)
        record_path = inside(out, RECORD_NAME)
        with torch_threads(threads):
            state, curve = _train(spec.name, cohort.volumes, size, config, seed, dev)
            host = environment(dev)
        # The weights are marked as a prior and land last: weights without their record (a
        # killed writer, a copied file) are refused by pretraining_record, never used unchecked.
        with atomic_path(weights_path) as tmp:
            write_tensors(tmp, state, {"format": "pt", "tool": PRIOR_TOOL})
            record = PretrainRecord(
                version=__version__,
                model=spec.name,
                size=size,
                options=config,
                seed=seed,
                prepare=cohort.params,
                cohort_hash=cohort.cohort_hash,
                n_subjects=len(cohort.ids),
                **cohort.inputs,
                weights_sha256=sha256_file(tmp),
                curve=curve,
                environment=host,
            )
            write_json(record_path, record.model_dump(mode="json"))
    return out


def _train(
    model_name: str,
    volumes: np.ndarray,
    size: int,
    config: PretrainConfig,
    seed: int,
    dev: torch.device,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    prepare_device(dev, config.precision)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as every cv fold
    torch.manual_seed(seed)
    model = get_spec(model_name).build(size=size).to(dev)
    classifier = {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("fc.")
    }
    vols = torch.from_numpy(np.ascontiguousarray(volumes[:, None], dtype=np.float32))
    curve = pretext_fit(model, vols, np.arange(len(vols)), config, seed, dev)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state.update(classifier)  # the classifier was not trained: keep its initialisation
    return state, curve


def pretraining_record(weights: str | Path) -> PretrainRecord | None:
    """The record ``pretrain`` wrote beside a weight file, or None for other weights (a named
    set, a cv fold model, a file from elsewhere). A prior whose record is missing or describes
    other weights (a killed writer, a file copied without its folder) is refused, so that a
    prior is never used without its leakage check."""
    path = Path(weights)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # not readable as safetensors: the model loader says why
        return None
    if meta.get("tool") != PRIOR_TOOL:
        return None
    record_path = path.parent / RECORD_NAME
    if not record_path.is_file():
        raise NmosdError(
            f"{path} is a prior from nmosd-ms pretrain without its {RECORD_NAME} beside it: "
            "keep the pretraining folder whole (the record is its leakage check)",
            option="weights",
        )
    record = load_record(record_path, PretrainRecord, "pretraining record")
    if sha256_file(path) != record.weights_sha256:
        raise NmosdError(
            f"{record_path} describes other weights than {path} (sha256 differs)",
            option="weights",
        )
    return record


def prior_reference(record: PretrainRecord | None) -> dict | None:
    """What a run or a bundle keeps of a prior (the record :func:`check_pretraining` returns),
    so that a later leakage check still sees the prior's maps when its folder is gone: the
    pretraining cohort's hash, size, participant IDs and input sha256, and the weights' sha256.
    None for other weights."""
    if record is None:
        return None
    return record.model_dump(
        include={"cohort_hash", "n_subjects", "participant_ids", "input_sha256", "weights_sha256"}
    )


def check_pretraining(
    weights: str | Path,
    cohort: PreparedCohort,
    model: str,
    size: int | None = None,
    held_out: bool = True,
) -> PretrainRecord | None:
    """Refuse weights that ``pretrain`` made for another model or input size ``size`` (default:
    the cohort's), or from another kind of map (``PrepareConfig.input``); with ``held_out``
    (cross-validation), also those made from maps of ``cohort``'s own participants or input
    files, whose held-out folds the prior would have seen. Returns the prior's record (read and
    hashed once), or None for other weights, which pass unchecked."""
    record = pretraining_record(weights)
    if record is None:
        return None
    spec = get_spec(model)
    size = int(cohort.volumes.shape[-1]) if size is None else int(size)
    if record.model != spec.name or record.size != size:
        raise NmosdError(
            f"weights {weights} were pretrained for {record.model} at {record.size}³, not "
            f"{spec.name} at {size}³",
            option="weights",
        )
    theirs, ours = record.prepare.get("input"), cohort.params.get("input")
    if theirs != ours:
        raise NmosdError(
            f"weights {weights} were pretrained on {theirs} maps; this cohort has {ours} maps",
            option="weights",
        )
    if not held_out:
        return record
    inputs = cohort.inputs
    ids = sorted(set(record.participant_ids) & set(inputs["participant_ids"]))
    files = set(record.input_sha256) & set(inputs["input_sha256"])
    if ids or files:
        shown = ", ".join(ids[:3]) + (" …" if len(ids) > 3 else "")
        what = f"participants {shown}" if ids else f"{len(files)} input file(s)"
        raise NmosdError(
            f"weights {weights} were pretrained on maps of this cohort ({what}): its held-out "
            "folds would not be held out; pretrain on other subjects",
            option="weights",
        )
    return record
