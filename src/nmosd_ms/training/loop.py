"""One fold: train a model on the training part, predict the held-out part once, at the end.

The held-out part is evaluated every ``eval_every`` epochs only to draw learning curves (the
paper's Fig. 4); it never selects an epoch. Early stopping, when asked for, uses an inner
validation split carved out of the training part.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from ..config import PretrainConfig, TrainConfig
from ..constants import THRESHOLD
from ..errors import NmosdError
from ..models import get_spec, model_weights
from .augment import augmented_batch
from .device import (
    AUTOCAST_DTYPES,
    autocast,
    clock,
    peak_memory_mb,
    prepare_device,
    resolve_device,
)
from .pretext import pretext_fit

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


@torch.no_grad()
def predict_proba(model, x: torch.Tensor, device, precision: str, batch: int = 8) -> np.ndarray:
    """Softmax probability of NMOSD for a batch of volumes (B, 1, S, S, S)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        with autocast(device, precision):
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
        with autocast(device, precision):
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


@dataclass(frozen=True)
class FoldData:
    """One fold's inputs: the cohort's volumes (N, 1, S, S, S), its labels (N,), and the
    indices of the training and the held-out parts (the held-out part may be empty: ``fit``)."""

    volumes: torch.Tensor
    labels: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray


def train_torch_fold(
    model_name: str,
    fold: FoldData,
    config: TrainConfig,
    *,
    seed: int,
    device: str = "cpu",
    on_epoch: EpochCallback | None = None,
) -> FoldOutput:
    """Train ``model_name`` from scratch (or from ``config.weights``) on one fold and predict
    its held-out part: the stages of :class:`FoldTrainer`, in order."""
    return FoldTrainer(model_name, fold, config, seed=seed, device=device).run(on_epoch)


@dataclass
class _Optimisation:
    """What the epochs step: the optimiser, its learning-rate schedule, the loss's class
    weights (or None) and fp16's gradient scaler (or None)."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.StepLR
    weight: torch.Tensor | None
    scaler: torch.amp.GradScaler | None


class FoldTrainer:
    """One fold's training as named stages, which :meth:`run` takes in this order:

    1. :meth:`__init__` — the device, the seeds, the cohort on the device, the network, and
       the inner-validation split of the training part (when ``config.inner_val`` > 0);
    2. :meth:`pretext` — optional: the backbone learns lesion occupancy from the training maps;
    3. :meth:`train_epoch` — one pass of SGD over the augmented training part, per epoch;
    4. :meth:`curve_point` — the held-out loss and accuracy for the learning curves (they never
       select an epoch) and :meth:`stop_early` on the inner-validation loss;
    5. :meth:`restore_best` and :meth:`recalibrate` — the best inner-validation weights, and
       BatchNorm statistics that match the final weights;
    6. :meth:`infer` — the held-out probabilities, the timings and the weights.

    The seeds are drawn in this order, so a fold is bit-identical for a seed and thread count.
    """

    def __init__(
        self, model_name: str, fold: FoldData, config: TrainConfig, *, seed: int, device: str
    ):
        self.model_name, self.config, self.seed = model_name, config, seed
        self.dev = resolve_device(device)
        prepare_device(self.dev, config.precision)
        torch.manual_seed(seed)
        self.np_rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.labels = fold.labels
        self.test_idx = fold.test_idx
        self.volumes = self._placed(fold.volumes)
        weights = model_weights(model_name, config.weights)
        size = int(fold.volumes.shape[-1])
        self.model = get_spec(model_name).build(size=size, weights=weights).to(self.dev)
        self.memory_format, self.step_model = cuda_execution(self.model, self.dev, config)
        self.fit_idx, self.val_idx = self._inner_split(np.asarray(fold.train_idx))
        self.curves: list[dict] = []
        self.best: tuple[float, dict | None, int] = (math.inf, None, 0)
        self.epochs_run = 0
        self._calibrated = False

    def _placed(self, volumes: torch.Tensor) -> torch.Tensor:
        if self.dev.type == "cuda":  # the cohort is small: keep it on the device, augment there
            volumes = volumes.to(self.dev)
        if self.config.precision in AUTOCAST_DTYPES:
            # Every model's first layer is a convolution, which autocast feeds in this dtype
            # anyway, and shifts/flips copy values exactly: holding the cohort in it changes no
            # result and halves the bytes each batch copies.
            volumes = volumes.to(AUTOCAST_DTYPES[self.config.precision])
        return volumes

    def _inner_split(self, train_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.config.inner_val <= 0:
            return train_idx, np.zeros(0, dtype=int)
        fit_idx, val_idx = train_test_split(
            train_idx,
            test_size=self.config.inner_val,
            stratify=self.labels[train_idx],
            random_state=self.seed,
        )
        return fit_idx, val_idx

    def run(self, on_epoch: EpochCallback | None = None) -> FoldOutput:
        """Every stage, in order; returns the fold's output."""
        t0 = clock(self.dev)
        self.pretext()
        optimisation = self.optimisation()
        for epoch in range(1, self.config.epochs + 1):
            te = clock(self.dev)
            row = self.train_epoch(epoch, optimisation)
            self.curve_point(row, epoch)
            row["seconds"] = clock(self.dev) - te
            self.curves.append(row)
            if on_epoch:
                on_epoch(epoch, self.config.epochs)
            if self.stop_early(epoch):
                break
        self.restore_best()
        self.recalibrate()
        return self.infer(train_seconds=clock(self.dev) - t0)

    def pretext(self) -> None:
        """The optional pretext on the training maps only (never a label, never a held-out
        map), before the supervised epochs."""
        c = self.config
        if not c.pretext_epochs:
            return
        pretext = PretrainConfig(
            epochs=c.pretext_epochs,
            batch_size=max(2, c.batch_size),
            shift=c.shift,
            flip=c.flip,
            precision=c.precision,
        )
        pretext_fit(self.model, self.volumes, self.fit_idx, pretext, self.seed, self.dev)

    def optimisation(self) -> _Optimisation:
        """The paper's SGD and step schedule, inverse-frequency class weights if asked for,
        and a gradient scaler for fp16 on a GPU."""
        c, dev = self.config, self.dev
        weight = None
        if c.class_weights:
            counts = np.bincount(self.labels[self.fit_idx], minlength=2).astype(float)
            weight = torch.as_tensor(
                counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32
            )
            weight = weight.to(dev)
        opt = make_optimizer(self.model, c)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=c.step_size, gamma=c.gamma)
        fp16_gpu = c.precision == "fp16" and dev.type == "cuda"
        return _Optimisation(opt, sched, weight, torch.amp.GradScaler("cuda") if fp16_gpu else None)

    def train_epoch(self, epoch: int, o: _Optimisation) -> dict:
        """One pass over the shuffled, augmented training part; the epoch's curve row."""
        c, dev = self.config, self.dev
        self.model.train()
        order = self.np_rng.permutation(self.fit_idx)
        # the epoch's labels in order, copied to the device once (not once per step)
        y_order = torch.as_tensor(self.labels, dtype=torch.long)[torch.from_numpy(order)].to(dev)
        lr = o.opt.param_groups[0]["lr"]
        # summed on the device and read once per epoch: no host-device sync per step (the
        # float64 sums equal the per-step Python floats they replace)
        total_loss = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        for start, stop in batch_bounds(len(order), c.batch_size):
            xb = augmented_batch(self.volumes, order[start:stop], c.shift, c.flip, self.gen)
            xb = xb.to(dev)
            if self.memory_format is not None:
                xb = xb.contiguous(memory_format=self.memory_format)
            loss, logits = self._step(xb, y_order[start:stop], o)
            total_loss += loss.detach().double() * (stop - start)
            correct += (logits.argmax(1) == y_order[start:stop]).sum()
        o.sched.step()
        self.epochs_run = epoch
        self._calibrated = False  # the weights moved: BatchNorm statistics are stale
        seen = max(len(order), 1)
        return {
            "epoch": epoch,
            "lr": lr,
            "train_loss": float(total_loss) / seen,
            "train_accuracy": int(correct) / seen,
            "test_loss": math.nan,
            "test_accuracy": math.nan,
        }

    def _step(
        self, xb: torch.Tensor, yb: torch.Tensor, o: _Optimisation
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.dev, self.config.precision):
            logits = self.step_model(xb)
            loss = F.cross_entropy(logits.float(), yb, weight=o.weight)
        o.opt.zero_grad(set_to_none=True)
        if o.scaler is not None:
            o.scaler.scale(loss).backward()
            o.scaler.step(o.opt)
            o.scaler.update()
        else:
            loss.backward()
            o.opt.step()
        return loss, logits

    def curve_point(self, row: dict, epoch: int) -> None:
        """The held-out loss and accuracy every ``eval_every`` epochs and at the last one (for
        the learning curves only)."""
        c = self.config
        if len(self.test_idx) and (epoch % c.eval_every == 0 or epoch == c.epochs):
            self.recalibrate()
            row["test_loss"], row["test_accuracy"] = _loss_acc(
                self.model,
                self.volumes[self.test_idx],
                self.labels[self.test_idx],
                self.dev,
                c.precision,
            )

    def stop_early(self, epoch: int) -> bool:
        """Keep the weights of the best inner-validation loss; True once it has not improved
        for ``patience`` epochs (never without an inner-validation part)."""
        if not len(self.val_idx):
            return False
        self.recalibrate()
        vloss, _ = _loss_acc(
            self.model,
            self.volumes[self.val_idx],
            self.labels[self.val_idx],
            self.dev,
            self.config.precision,
        )
        if vloss < self.best[0] - 1e-6:
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = (vloss, state, epoch)
            return False
        return epoch - self.best[2] >= self.config.patience

    def restore_best(self) -> None:
        """Go back to the best inner-validation weights, if there was an inner validation."""
        if len(self.val_idx) and self.best[1] is not None:
            self.model.load_state_dict(self.best[1])
            self._calibrated = False

    def recalibrate(self) -> None:
        """BatchNorm statistics for the current weights, from the training part. Deterministic
        for given weights, so it runs once per set of weights (the curve point, the inner
        validation and the end of training share it)."""
        if not self._calibrated:
            recalibrate_batchnorm(
                self.model, self.volumes[self.fit_idx], self.dev, self.config.precision
            )
            self._calibrated = True

    def infer(self, train_seconds: float) -> FoldOutput:
        """The held-out probabilities (refused when non-finite: training diverged), the time
        per subject, the peak memory and the weights on the CPU."""
        dev = self.dev
        ti = clock(dev)
        prob = predict_proba(self.model, self.volumes[self.test_idx], dev, self.config.precision)
        if not np.isfinite(prob).all():
            raise NmosdError(
                f"{self.model_name}: training diverged (non-finite outputs); try a lower "
                "learning rate"
            )
        inference_ms = (clock(dev) - ti) * 1000 / max(len(self.test_idx), 1)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        name = str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})"
        return FoldOutput(
            prob_nmosd=prob,
            curves=self.curves,
            train_seconds=train_seconds,
            epochs=self.epochs_run,
            inference_ms=inference_ms,
            peak_memory_mb=peak_memory_mb(dev),
            state_dict=state,
            n_fit=len(self.fit_idx),
            device=name,
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
        peak_memory_mb=peak_memory_mb(torch.device("cpu")),
    )
