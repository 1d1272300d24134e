"""Network definitions: plain ``nn.Module`` classes (the builders live in :mod:`.registry`).

Backbones are MONAI's ResNet. With ``spatial_dims=2, conv1_t_stride=2, shortcut_type="B",
bias_downsample=False`` it has torchvision's exact parameter names and outputs, so torchvision
ImageNet weights load strictly (see :mod:`.weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
INPLANES = [64, 128, 256, 512]

#: Axis names of a canonical RAS volume (B, 1, X, Y, Z): X = left-right, Y = anterior-posterior,
#: Z = inferior-superior.
AXES = {"lr": 0, "ap": 1, "si": 2}


def resnet_backbone(
    depth: int, spatial_dims: int, in_channels: int, shortcut_type: str = "B"
) -> ResNet:
    """A MONAI ResNet without its classifier (``fc`` is an identity)."""
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}")
    net = ResNet(
        block="basic",
        layers=DEPTHS[depth],
        block_inplanes=INPLANES,
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=shortcut_type,
        bias_downsample=False,
        num_classes=1000,
    )
    net.fc = nn.Identity()
    return net


class _CentreTap:
    """On an input of one pixel (voxel), a same-padded convolution (odd kernel, padding
    ``kernel // 2``, dilation 1, zero padding) of any stride gives one output that multiplies by
    the kernel's centre tap only: every other tap sees padding. This mixin computes that product
    directly (same parameters and state-dict keys, same outputs; the other taps' gradients are
    exactly zero either way) and leaves every larger input to the plain convolution.

    Two measured reasons (torch 2.13 CPU, oneDNN):

    * correctness: in bf16, oneDNN's *weight gradient* of a strided convolution on a 1-pixel
      input is wrong, 2D and 3D (3×3 or 7×7, stride 2: 24 to 40 of 40 calls off by more than 5 %
      of the largest entry, some NaN or 1e25). The two-view backbone meets that shape at
      S ≤ 54 (layer3/layer4 at 24³) and ResNet3D at S ≤ 16; at 24³ one bf16 epoch diverged
      in about one run in three. fp32 gradients are right.
    * speed: at S = 100 the two-view backbone's last stage runs at 1×1, where oneDNN's 3×3
      backward took 5 ms per convolution on one CPU thread (bf16, batch 8) for 19 M
      multiply-adds.
    """

    _conv = staticmethod(F.conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(n == 1 for n in x.shape[2:]):
            centre = tuple(slice(k // 2, k // 2 + 1) for k in self.kernel_size)
            return self._conv(
                x, self.weight[(slice(None), slice(None), *centre)], self.bias, groups=self.groups
            )
        return super().forward(x)


class CentreTapConv2d(_CentreTap, nn.Conv2d):
    """``nn.Conv2d`` with :class:`_CentreTap`'s 1×1-input path."""


class CentreTapConv3d(_CentreTap, nn.Conv3d):
    """``nn.Conv3d`` with :class:`_CentreTap`'s 1×1×1-input path."""

    _conv = staticmethod(F.conv3d)


_CENTRE_TAP = {nn.Conv2d: CentreTapConv2d, nn.Conv3d: CentreTapConv3d}


def _centre_tap_convs(module: nn.Module, strided_only: bool = False) -> None:
    """Make every same-padded, odd-kernel, undilated ``Conv2d``/``Conv3d`` (kernel > 1) below
    ``module`` a :class:`_CentreTap` convolution holding the same parameters (with
    ``strided_only``, only those of stride > 1: the ones whose bf16 gradient needs it)."""
    for name, child in module.named_children():
        kind = _CENTRE_TAP.get(type(child))
        if not (
            kind is not None
            and all(k % 2 == 1 and k > 1 for k in child.kernel_size)
            and child.padding == tuple(k // 2 for k in child.kernel_size)
            and all(d == 1 for d in child.dilation)
            and child.padding_mode == "zeros"
        ):
            _centre_tap_convs(child, strided_only)
            continue
        strided = any(s > 1 for s in child.stride)
        if strided_only and not strided:
            continue
        if kind is CentreTapConv2d and not strided and child.kernel_size == (3, 3):
            # The 2D 3×3 stride-1 ones (the first use, for speed) are built anew as before: the
            # discarded initialisation draws from the global RNG, and a seed must keep giving
            # the network, and the figures, of earlier releases.
            new = kind(
                child.in_channels,
                child.out_channels,
                3,
                padding=1,
                groups=child.groups,
                bias=child.bias is not None,
            )
            new.weight = child.weight
            new.bias = child.bias
            setattr(module, name, new)
        else:
            child.__class__ = kind  # no new parameters, no random draw


class CompressionBlock(nn.Module):
    """One view: a volume axis becomes the channel axis, then Conv2d(S->32, k7, s3)+BN+ReLU.

    Input (B, 1, S, S, S); output (B, 32, S', S') with S' = (S - 7) // 3 + 1 (32 for S = 100).
    """

    def __init__(
        self, size: int, axis: int, out_channels: int = 32, kernel_size: int = 7, stride: int = 3
    ):
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError("axis must be 0, 1 or 2")
        self.axis = axis
        self.conv = nn.Conv2d(size, out_channels, kernel_size, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0].movedim(1 + self.axis, 1)
        if torch.is_autocast_enabled(v.device.type):
            v = v.to(torch.get_autocast_dtype(v.device.type))
        # Cast and lay out each view once, here, channels-last (the 100 slices innermost): left
        # to the convolution, the strided view was reordered inside oneDNN for the forward pass
        # and again for the weight gradient. Profiled on 1 CPU thread, batch 8 at 100³, per
        # two-view-18 training step: bf16 102 -> 87 ms, fp32 173 -> 129 ms. The small output goes
        # back to the default layout, in which the 2D backbone measured faster.
        v = v.contiguous(memory_format=torch.channels_last)
        return self.act(self.bn(self.conv(v))).contiguous()


class MultiViewNet(nn.Module):
    """The paper's compressed network: one :class:`CompressionBlock` per view, outputs
    concatenated along channels, a 2D ResNet backbone (conv1 adapted to 32·views channels),
    dropout, and a linear classifier."""

    def __init__(
        self,
        size: int,
        depth: int = 18,
        views: Sequence[str] = ("lr", "ap"),
        num_classes: int = 2,
        dropout: float = 0.15,
        view_channels: int = 32,
    ):
        super().__init__()
        if len(set(views)) != len(views) or any(v not in AXES for v in views):
            raise ValueError(f"views must be distinct names from {list(AXES)}")
        if size < 7:
            raise ValueError("size must be at least 7 (the compression kernel)")
        self.size = size
        self.view_names = tuple(views)
        self.views = nn.ModuleList(
            CompressionBlock(size, AXES[v], view_channels) for v in self.view_names
        )
        self.backbone = resnet_backbone(depth, 2, view_channels * len(self.views))
        _centre_tap_convs(self.backbone)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(INPLANES[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone features (B, 512) that the classifier reads."""
        if x.shape[2:] != (self.size,) * 3:
            raise ValueError(f"expected input (B, 1, {self.size}, {self.size}, {self.size})")
        return self.backbone(torch.cat([view(x) for view in self.views], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


class ResNet3D(nn.Module):
    """3D ResNet baseline (Hara et al. style): 1 input channel, conv1 7³ stride 2, dropout, fc."""

    def __init__(
        self, depth: int = 18, num_classes: int = 2, dropout: float = 0.15, shortcut_type="B"
    ):
        super().__init__()
        self.backbone = resnet_backbone(depth, 3, 1, shortcut_type=shortcut_type)
        _centre_tap_convs(self.backbone, strided_only=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(INPLANES[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone features (B, 512) that the classifier reads."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))
