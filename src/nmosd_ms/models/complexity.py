"""Model complexity: trainable parameters and FLOPs per forward pass."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_flops(model: nn.Module, size: int, batch: int = 1) -> int:
    """FLOPs (multiply and add counted separately) of one forward pass on a (B,1,S,S,S) input."""
    was = model.training
    model.eval()
    x = torch.zeros(batch, 1, size, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was)
    return int(counter.get_total_flops())
