"""One fold: train a model on the training part, predict the held-out part once, at the end.

The held-out part is evaluated every ``eval_every`` epochs only to draw learning curves (the
paper's Fig. 4); it never selects an epoch. Early stopping, when asked for, uses an inner
validation split carved out of the training part.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import socket
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from ..config import Precision, PretrainConfig, TrainConfig
from ..constants import THRESHOLD, __version__
from ..models import get_spec, model_weights
from .augment import augmented_batch

EpochCallback = Callable[[int, int], None]


@dataclass
class FoldOutput:
    prob_nmosd: np.ndarray  # held-out probabilities, in test_idx order
    curves: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    epochs: int = 0
    inference_ms: float = 0.0
    peak_memory_mb: float = 0.0
    state_dict: dict | None = None
    n_fit: int | None = None  # subjects the model was fitted on (training part less inner-val)
    device: str = "cpu"  # where it ran (resolved on the worker that trained it)
    host: str = ""


def environment(device: torch.device, threads: int | None = None) -> dict:
    """Where and with what weights are being computed (the record's ``environment``: versions,
    platform, device, and the torch threads training uses: ``threads``, else torch's setting
    now). It changes the time and, on a CPU, the last bits of the weights, not the recipe; cv's
    ``run.json`` (with the folds' threads), fit's bundle and pretrain's record keep it.
    CUDA is queried only for a CUDA ``device``, so a client of remote workers never
    initialises it."""
    import monai
    import sklearn

    return {
        "nmosd_ms": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "scikit_learn": sklearn.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda" and torch.cuda.is_available()
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
    }


def resolve_device(device: str, check: bool = True) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" is refused where no GPU is (unless
    ``check`` is False: the name is then only parsed, for a device on another machine)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if check and device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import NmosdError

        raise NmosdError(
            "device 'cuda' was asked for but no CUDA device is available", option="device"
        )
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        from ..errors import NmosdError

        raise NmosdError(f"device must be auto, cpu or cuda, not {device!r}", option="device")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch threads (0: leave torch's setting), and restore the
    previous number after it: ``cv``'s folds, ``fit`` and ``pretrain`` share this rule, and a
    notebook that calls them keeps its own setting."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (torch's setting) or more, not {threads}")
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
assert set(AUTOCAST_DTYPES) | {"fp32"} == set(typing.get_args(Precision))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX). Without it, bf16 is
    emulated: measured on an AVX2-only AMD EPYC, a two-view-18 epoch at 100³ took 20-30 s in
    bf16 against 2-3 s in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an op this torch build does not have
        return False


def _clock(dev: torch.device) -> float:
    """A timer reading that waits for the device's queued work (CUDA runs asynchronously)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def prepare_device(dev: torch.device, precision: str) -> None:
    """Per fold, on the device it trains on: refuse bf16 on a GPU without native bf16
    (compute capability < 8.0; fp16 is the one to use there), make fp32 mean fp32 (no TF32 in
    matmuls or cuDNN convolutions), set cuBLAS's deterministic workspace, and reset the peak
    memory counter so that each fold's peak is its own."""
    if dev.type != "cuda":
        return
    import os

    from ..errors import NmosdError

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise NmosdError(
            f"{torch.cuda.get_device_name(dev)} has no native bf16 (compute capability below "
            "8.0); use fp16 on this GPU",
            option="precision",
        )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_float32_matmul_precision("highest")  # no TF32 in matmuls
    torch.backends.cudnn.allow_tf32 = False  # nor in cuDNN convolutions
    torch.cuda.reset_peak_memory_stats(dev)


def precision_note(precision: str, device: str) -> str | None:
    """A sentence for the user when ``precision`` will run slowly on ``device``, else None."""
    if precision == "bf16" and resolve_device(device).type == "cpu" and not cpu_has_native_bf16():
        return (
            "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated and runs about "
            "10x slower than fp32 here; fp32 is faster on this machine"
        )
    return None


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


@torch.no_grad()
def predict_proba(model, x: torch.Tensor, device, precision: str, batch: int = 8) -> np.ndarray:
    """Softmax probability of NMOSD for a batch of volumes (B, 1, S, S, S)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        with _autocast(device, precision):
            logits = model(x[i : i + batch].to(device))
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def recalibrate_batchnorm(model, x: torch.Tensor, device, precision: str, batch: int = 8) -> None:
    """Recompute BatchNorm running statistics with the final weights ("precise BN").

    BatchNorm's running averages lag behind the weights; on small, sparse lesion maps the lag
    makes eval-mode outputs explode (seen here: activations of 1e9 after a few steps). One pass
    over the training part in train mode, with a cumulative average, makes the statistics match
    the weights. Only training data are used; the held-out part is never seen.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) < 2:
        return
    momenta = [m.momentum for m in bns]
    dev = torch.device(device)
    # Only BatchNorm needs train mode here: dropout stays in eval mode, so the pass draws no
    # random numbers at all. The RNG states are forked as well (CPU, and the fold's CUDA device)
    # so that nothing here can shift training's random stream: curves on or off, same results.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        _recalibrate(model, bns, x, device, precision, batch)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()


def _recalibrate(model, bns, x, device, precision, batch) -> None:
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    starts = list(range(0, len(x), batch))
    if len(starts) > 1 and len(x) - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(x)
        with _autocast(device, precision):
            model(x[start:stop].to(device))


@torch.no_grad()
def _loss_acc(model, x, y, device, precision, batch=8) -> tuple[float, float]:
    p = predict_proba(model, x, device, precision, batch)
    if not np.isfinite(p).all():
        return math.nan, math.nan
    p_t = torch.as_tensor(p).clamp(1e-7, 1 - 1e-7)
    yt = torch.as_tensor(y, dtype=torch.float64)
    loss = float(F.binary_cross_entropy(p_t, yt))
    acc = float(((p >= THRESHOLD).astype(int) == np.asarray(y)).mean())
    return loss, acc


def cuda_execution(
    model: torch.nn.Module, dev: torch.device, config: TrainConfig
) -> tuple[torch.memory_format | None, torch.nn.Module]:
    """How a fold's training steps run on ``dev``: the batches' memory format (``None``: as
    they come) and the module that takes the steps. On a GPU, ``channels_last`` puts the network
    in channels-last memory (in place: NDHWC for a 3D network, NHWC for a 2D one) and ``compile``
    steps through ``torch.compile`` (the weights stay the network's own, so ``state_dict`` and
    inference are unchanged). On a CPU both are ignored: CPU folds stay bit-identical to runs
    without them."""
    if dev.type != "cuda":
        return None, model
    memory_format = None
    if config.channels_last:
        three_d = any(p.dim() == 5 for p in model.parameters())
        memory_format = torch.channels_last_3d if three_d else torch.channels_last
        model.to(memory_format=memory_format)
    step_model = torch.compile(model, dynamic=False) if config.compile else model
    # batches (B, 1, S, S, S) take only the 3D format; a 2D network's own layout is internal
    batch_format = memory_format if memory_format is torch.channels_last_3d else None
    return batch_format, step_model


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The epoch's batches as (start, stop) over ``n`` shuffled subjects. A last batch of one
    sample joins the batch before it (BatchNorm cannot train on one sample)."""
    bounds = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The paper's SGD with the run's learning rate, momentum and weight decay."""
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )


def train_torch_fold(
    model_name: str,
    volumes: torch.Tensor,
    labels: np.ndarray,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    config: TrainConfig,
    seed: int,
    device: str = "cpu",
    on_epoch: EpochCallback | None = None,
) -> FoldOutput:
    """Train ``model_name`` from scratch (or from ``config.weights``) on one fold."""
    dev = resolve_device(device)
    prepare_device(dev, config.precision)
    torch.manual_seed(seed)
    np_rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    size = int(volumes.shape[-1])
    if dev.type == "cuda":  # the cohort is small: keep it on the device, augment there
        volumes = volumes.to(dev)
    if config.precision in AUTOCAST_DTYPES:
        # Every model's first layer is a convolution, which autocast feeds in this dtype anyway,
        # and shifts/flips copy values exactly: holding the cohort in it changes no result and
        # halves the bytes each batch copies.
        volumes = volumes.to(AUTOCAST_DTYPES[config.precision])
    weights = model_weights(model_name, config.weights)
    model = get_spec(model_name).build(size=size, weights=weights).to(dev)
    memory_format, step_model = cuda_execution(model, dev, config)

    fit_idx, val_idx = np.asarray(train_idx), np.zeros(0, dtype=int)
    if config.inner_val > 0:
        fit_idx, val_idx = train_test_split(
            fit_idx, test_size=config.inner_val, stratify=labels[fit_idx], random_state=seed
        )
    t0 = _clock(dev)
    if config.pretext_epochs:
        # The pretext reads the training maps only (never a label, never a held-out map).
        # Imported here: pretrain builds on this module.
        from .pretrain import pretext_fit

        pretext = PretrainConfig(
            epochs=config.pretext_epochs,
            batch_size=max(2, config.batch_size),
            shift=config.shift,
            flip=config.flip,
            precision=config.precision,
        )
        pretext_fit(model, volumes, fit_idx, pretext, seed, dev)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    weight = None
    if config.class_weights:
        counts = np.bincount(labels[fit_idx], minlength=2).astype(float)
        weight = torch.as_tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32)
        weight = weight.to(dev)
    opt = make_optimizer(model, config)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size, gamma=config.gamma)
    scaler = (
        torch.amp.GradScaler("cuda") if config.precision == "fp16" and dev.type == "cuda" else None
    )

    def calibrate() -> None:
        # Recalibration is deterministic for given weights, so it runs once per set of weights
        # (the curve point, the inner validation and the end of training share it).
        nonlocal calibrated
        if not calibrated:
            recalibrate_batchnorm(model, volumes[fit_idx], dev, config.precision)
            calibrated = True

    calibrated = False
    curves: list[dict] = []
    best = (math.inf, None, 0)
    epochs_run = 0
    for epoch in range(1, config.epochs + 1):
        te = _clock(dev)
        model.train()
        order = np_rng.permutation(fit_idx)
        bounds = batch_bounds(len(order), config.batch_size)
        # the epoch's labels in order, copied to the device once (not once per step)
        y_order = y_all[torch.from_numpy(order)].to(dev)
        lr = opt.param_groups[0]["lr"]
        # summed on the device and read once per epoch: no host-device sync per step (the
        # float64 sums equal the per-step Python floats they replace)
        total_loss = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen = 0
        for start, stop in bounds:
            bidx = order[start:stop]
            xb = augmented_batch(volumes, bidx, config.shift, config.flip, gen).to(dev)
            if memory_format is not None:
                xb = xb.contiguous(memory_format=memory_format)
            yb = y_order[start:stop]
            with _autocast(dev, config.precision):
                logits = step_model(xb)
                loss = F.cross_entropy(logits.float(), yb, weight=weight)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            total_loss += loss.detach().double() * len(bidx)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(bidx)
        sched.step()
        epochs_run = epoch
        calibrated = False  # the weights moved: BatchNorm statistics are stale
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(total_loss) / max(seen, 1),
            "train_accuracy": int(correct) / max(seen, 1),
            "test_loss": math.nan,
            "test_accuracy": math.nan,
        }
        if len(test_idx) and (epoch % config.eval_every == 0 or epoch == config.epochs):
            calibrate()
            row["test_loss"], row["test_accuracy"] = _loss_acc(
                model, volumes[test_idx], labels[test_idx], dev, config.precision
            )
        row["seconds"] = _clock(dev) - te
        curves.append(row)
        if on_epoch:
            on_epoch(epoch, config.epochs)
        if len(val_idx):
            calibrate()
            vloss, _ = _loss_acc(model, volumes[val_idx], labels[val_idx], dev, config.precision)
            if vloss < best[0] - 1e-6:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = (vloss, state, epoch)
            elif epoch - best[2] >= config.patience:
                break
    if len(val_idx) and best[1] is not None:
        model.load_state_dict(best[1])
        calibrated = False
    calibrate()
    train_seconds = _clock(dev) - t0
    ti = _clock(dev)
    prob = predict_proba(model, volumes[test_idx], dev, config.precision)
    if not np.isfinite(prob).all():
        from ..errors import NmosdError

        raise NmosdError(
            f"{model_name}: training diverged (non-finite outputs); try a lower learning rate"
        )
    inference_ms = (_clock(dev) - ti) * 1000 / max(len(test_idx), 1)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return FoldOutput(
        prob_nmosd=prob,
        curves=curves,
        train_seconds=train_seconds,
        epochs=epochs_run,
        inference_ms=inference_ms,
        peak_memory_mb=_peak_memory_mb(dev),
        state_dict=state,
        n_fit=len(fit_idx),
        device=str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        host=socket.gethostname(),
    )


def train_sklearn_fold(
    model_name: str, features: np.ndarray, labels: np.ndarray, train_idx, test_idx, seed: int
) -> FoldOutput:
    from ..models.lesionload import build_lesionload

    model = build_lesionload(model_name, seed=seed)
    t0 = time.perf_counter()
    model.fit(features[train_idx], labels[train_idx])
    train_seconds = time.perf_counter() - t0
    ti = time.perf_counter()
    prob = model.predict_proba(features[test_idx])[:, 1].astype(np.float64)
    inference_ms = (time.perf_counter() - ti) * 1000 / max(len(test_idx), 1)
    return FoldOutput(
        prob_nmosd=prob,
        train_seconds=train_seconds,
        epochs=0,
        inference_ms=inference_ms,
        peak_memory_mb=_peak_memory_mb(torch.device("cpu")),
    )
