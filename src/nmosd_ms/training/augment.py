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
