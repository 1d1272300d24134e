"""Training augmentation: integer shifts with zero fill, left-right flips, both batched."""

from __future__ import annotations

import numpy as np
import torch

from nmosd_ms.training.augment import augmented_batch, shift_flip


def test_fast_batch_equals_reference_augmentation():
    v = torch.rand(20, 1, 12, 13, 14)
    idx = np.array([3, 1, 7, 7, 19, 0])
    for seed in range(10):
        a = shift_flip(v[idx], 4, True, torch.Generator().manual_seed(seed))
        b = augmented_batch(v, idx, 4, True, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


def test_shift_moves_content_and_fills_with_zeros():
    v = torch.zeros(1, 1, 9, 9, 9)
    v[0, 0, 4, 4, 4] = 1.0
    seen = set()
    for seed in range(40):
        out = augmented_batch(v, [0], 2, False, torch.Generator().manual_seed(seed))
        assert out.sum() == 1.0  # nothing wraps around, nothing is lost
        seen.add(tuple(int(i) for i in torch.nonzero(out[0, 0])[0]))
    assert all(2 <= c <= 6 for p in seen for c in p) and len(seen) > 10
    edge = torch.zeros(1, 1, 9, 9, 9)
    edge[0, 0, 0] = 1.0
    sums = {
        float(augmented_batch(edge, [0], 2, False, torch.Generator().manual_seed(s)).sum())
        for s in range(20)
    }
    assert 0.0 in sums  # shifted out of the volume: zero fill, no wrap-around


def test_flip_is_left_right_only():
    v = torch.zeros(1, 1, 6, 6, 6)
    v[0, 0, 1, 2, 3] = 1.0
    positions = set()
    for seed in range(20):
        out = augmented_batch(v, [0], 0, True, torch.Generator().manual_seed(seed))
        positions.add(tuple(int(i) for i in torch.nonzero(out[0, 0])[0]))
    assert positions == {(1, 2, 3), (4, 2, 3)}
