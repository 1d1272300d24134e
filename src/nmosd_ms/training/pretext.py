"""The pretext task: a network's backbone learns which cells of a coarse grid hold lesion, from
lesion maps alone (no diagnosis is an argument). ``pretrain`` runs it on all maps of another
cohort; a cv fold with ``pretext_epochs`` runs it on its own training part only."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PretrainConfig
from .augment import augmented_batch
from .device import autocast


def occupancy_target(volumes: torch.Tensor, grid: int) -> torch.Tensor:
    """The pretext's answer for a batch (B, 1, S, S, S): 1 for each of the ``grid``³ cells
    (adaptive pooling, so S need not be a multiple of ``grid``) that holds any nonzero voxel,
    else 0, flattened to (B, grid³)."""
    return (F.adaptive_max_pool3d(volumes.float(), grid) > 0).float().flatten(1)


def pretext_fit(
    model: torch.nn.Module,
    volumes: torch.Tensor,
    idx: np.ndarray,
    config: PretrainConfig,
    seed: int,
    dev: torch.device,
) -> list[dict[str, float]]:
    """Train ``model``'s backbone in place on the pretext (which of the grid's cells hold
    lesion) over the maps ``volumes[idx]`` (N, 1, S, S, S); diagnoses are not an argument.
    The classifier (``fc``) is not trained; the linear head is made here and dropped. Used by
    ``pretrain`` (all maps of another cohort) and by a fold's ``pretext_epochs`` (only its
    own training part). Returns the loss curve, one row per epoch."""
    head = torch.nn.Linear(model.fc.in_features, config.grid**3).to(dev)
    params = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.Adam([*params, *head.parameters()], lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    idx = np.asarray(idx)
    n = len(idx)
    curve = []
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = idx[order_rng.permutation(n)]
        total = torch.zeros((), dtype=torch.float64, device=dev)
        seen = 0
        # whole batches only: BatchNorm cannot train on a batch of one, and a short last batch
        # would weigh its few maps more
        for start in range(0, n - config.batch_size + 1, config.batch_size):
            bidx = order[start : start + config.batch_size]
            xb = augmented_batch(volumes, bidx, config.shift, config.flip, gen).to(dev)
            target = occupancy_target(xb, config.grid)
            with autocast(dev, config.precision):
                logits = head(model.dropout(model.features(xb)))
                loss = F.binary_cross_entropy_with_logits(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(bidx)
            seen += len(bidx)
        curve.append(
            {
                "epoch": float(epoch),
                "loss": float(total) / max(seen, 1),
                "seconds": time.perf_counter() - t0,
            }
        )
    return curve
