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


class CentreTapConv2d(nn.Conv2d):
    """A 3×3, stride-1, padding-1 ``Conv2d`` that, on a 1×1 input, multiplies by its centre tap
    only: the other eight taps see zero padding, so output and gradients are the same (the
    other taps' gradients are exactly zero either way). Same parameters and state-dict keys.

    At S = 100 the two-view backbone's last stage runs at 1×1, where oneDNN's 3×3 backward took
    5 ms per convolution on one CPU thread (bf16, batch 8) for 19 M multiply-adds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1):
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        return super().forward(x)


def _centre_tap_convs(module: nn.Module) -> None:
    """Swap every plain 3×3/stride 1/padding 1 ``Conv2d`` below ``module`` for the
    :class:`CentreTapConv2d` holding the same parameters."""
    for name, child in module.named_children():
        if (
            type(child) is nn.Conv2d
            and child.kernel_size == (3, 3)
            and child.stride == (1, 1)
            and child.padding == (1, 1)
            and child.dilation == (1, 1)
            and child.groups == 1
            and child.padding_mode == "zeros"
        ):
            new = CentreTapConv2d(
                child.in_channels, child.out_channels, 3, padding=1, bias=child.bias is not None
            )
            new.weight = child.weight
            new.bias = child.bias
            setattr(module, name, new)
        else:
            _centre_tap_convs(child)


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
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(INPLANES[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled backbone features (B, 512) that the classifier reads."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))
