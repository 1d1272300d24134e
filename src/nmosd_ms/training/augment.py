"""Training-time augmentation, batched on the model's device.

Random integer shifts (zero-filled, not wrapped) and random left-right flips. MONAI's
``RandAffine``/``RandFlip`` work per sample on the CPU with resampling; an integer shift is a
crop of a padded batch, which is exact, cheap and runs wherever the batch is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_flip(x: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """x: (B, C, X, Y, Z) with X the left-right axis. Returns a new augmented batch."""
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
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(b, 1, 1, 1, 1), x.flip(2), x)
    return x


def augmented_batch(
    volumes: torch.Tensor, idx, shift: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """``shift_flip(volumes[idx], ...)`` without the intermediate copies: each sample's shifted
    window is copied once from the cohort tensor into a zeroed batch (3x faster on the CPU;
    identical values and random draws)."""
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
        mask = torch.rand(b, generator=generator) < 0.5
        if mask.any():
            sel = mask.nonzero().flatten().to(out.device)
            out[sel] = out[sel].flip(2)
    return out
