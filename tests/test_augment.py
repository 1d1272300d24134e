"""Training augmentation: integer shifts with zero fill, left-right flips, both batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nmosd_ms.training.augment import augmented_batch


def pad_crop_reference(x, shift, flip, generator):
    """The obvious implementation (pad the batch, crop a window, flip), same random draws."""
    b, _, *dims = x.shape
    if shift > 0:
        padded = F.pad(x, (shift,) * 6)
        offs = torch.randint(0, 2 * shift + 1, (b, 3), generator=generator).tolist()
        x = torch.stack(
            [
                padded[i, :, o[0] : o[0] + dims[0], o[1] : o[1] + dims[1], o[2] : o[2] + dims[2]]
                for i, o in enumerate(offs)
            ]
        )
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask.view(b, 1, 1, 1, 1), x.flip(2), x)
    return x


def _positions(v, shift, flip, seeds):
    """Where the single non-zero voxel of ``v`` lands, over several seeds."""
    out = set()
    for seed in seeds:
        batch = augmented_batch(v, [0], shift, flip, torch.Generator().manual_seed(seed))
        assert batch.sum() == 1.0  # nothing wraps around, nothing is lost
        out.add(tuple(int(i) for i in torch.nonzero(batch[0, 0])[0]))
    return out


def test_fast_batch_equals_reference_augmentation():
    v = torch.rand(20, 1, 12, 13, 14)
    idx = np.array([3, 1, 7, 7, 19, 0])
    for seed in range(10):
        a = pad_crop_reference(v[idx], 4, True, torch.Generator().manual_seed(seed))
        b = augmented_batch(v, idx, 4, True, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


def test_shift_moves_content_and_fills_with_zeros():
    v = torch.zeros(1, 1, 9, 9, 9)
    v[0, 0, 4, 4, 4] = 1.0
    seen = _positions(v, 2, False, range(40))
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
    assert _positions(v, 0, True, range(20)) == {(1, 2, 3), (4, 2, 3)}


@pytest.mark.parametrize(("n", "batch"), [(9, 8), (17, 8), (41, 8), (70, 8), (8, 8), (1, 8)])
def test_every_subject_is_in_exactly_one_batch_of_two_or_more(n, batch):
    """A last batch of one joins the batch before it. Before this test, 9 subjects at batch 8
    crashed (IndexError) and 17 gave overlapping batches (subjects 8-15 trained twice)."""
    from nmosd_ms.training.loop import batch_bounds

    bounds = batch_bounds(n, batch)
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(n))
    assert all(stop - start >= 2 for start, stop in bounds) or n == 1
