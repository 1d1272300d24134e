"""Pretrained weights: described by data (URL, hash, metadata), loaded without unpickling code.

- ``imagenet`` (2D backbones): torchvision's ResNet-18/34 ImageNet-1k state dicts, fetched with
  ``torch.hub.load_state_dict_from_url`` (sha256-prefix checked, cached under TORCH_HOME).
  conv1's RGB kernels are adapted to the compression blocks' channels as timm's
  ``adapt_input_conv`` does; the classifier is always new.
- a file path: our own ``.safetensors`` (a whole model, e.g. from a cv run), a torchvision-format
  2D state dict, or a MedicalNet 3D ResNet checkpoint (``{"state_dict": {"module.conv1...": }}``,
  shortcut A for ResNet-18/34). ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import math
import os
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ..errors import NmosdError


@dataclass(frozen=True)
class WeightsSpec:
    """One published weight file (the torchvision ``Weights`` idea, without the enum)."""

    url: str
    sha256_prefix: str
    meta: dict = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


IMAGENET: dict[int, WeightsSpec] = {
    18: WeightsSpec(
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "f37072fd",
        {
            "source": "torchvision ResNet18_Weights.IMAGENET1K_V1",
            "num_params": 11689512,
            "imagenet_acc@1": 69.758,
            "license": "BSD-3-Clause (torchvision)",
        },
    ),
    34: WeightsSpec(
        "https://download.pytorch.org/models/resnet34-b627a593.pth",
        "b627a593",
        {
            "source": "torchvision ResNet34_Weights.IMAGENET1K_V1",
            "num_params": 21797672,
            "imagenet_acc@1": 73.314,
            "license": "BSD-3-Clause (torchvision)",
        },
    ),
}


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def safe_torch_load(path: str | os.PathLike) -> dict:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary objects)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage makes the weights-only unpickler raise almost anything
        # (UnpicklingError, EOFError, and on some byte strings IndexError, KeyError...): every
        # one of them means the same to the user, a file that is not a plain tensor file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NmosdError(
            f"refusing weight file {path}: not a plain tensor file ({first})"
        ) from None
    if not isinstance(obj, dict):
        raise NmosdError(f"weight file {path} does not hold a state dict")
    return obj


def imagenet_state_dict(depth: int) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet state dict, from TORCH_HOME or downloaded (hash-checked)."""
    spec = IMAGENET.get(depth)
    if spec is None:
        raise NmosdError(f"no ImageNet weights for depth {depth} (have {sorted(IMAGENET)})")
    local = hub_checkpoint_dir() / spec.file_name
    hint = (
        f"download {spec.url} on a connected machine and put it at {local} "
        "(or set TORCH_HOME), or give the file's path as the weights"
    )
    if local.is_file():
        if not _sha256(local).startswith(spec.sha256_prefix):
            raise NmosdError(f"{local} does not match its published sha256 prefix: {hint}")
        return safe_torch_load(local)
    try:
        return torch.hub.load_state_dict_from_url(
            spec.url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise NmosdError(f"cannot fetch ImageNet weights (offline?): {exc}; {hint}") from None
    except RuntimeError as exc:  # torch.hub raises RuntimeError on a hash mismatch
        raise NmosdError(f"ImageNet weights rejected: {exc}; {hint}") from None


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """Adapt RGB conv1 kernels to ``in_chans`` inputs (timm's ``adapt_input_conv`` rule):
    sum for one channel; otherwise repeat the RGB kernels, truncate to ``in_chans`` and scale by
    3 / in_chans so that activations keep their magnitude."""
    dtype = conv_weight.dtype
    w = conv_weight.float()
    out_c, in_c = w.shape[:2]
    if in_c != 3:
        raise ValueError("adapt_input_conv expects RGB (3-channel) kernels")
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        repeat = math.ceil(in_chans / 3)
        w = w.repeat(1, repeat, *([1] * (w.ndim - 2)))[:, :in_chans] * (3.0 / in_chans)
    return w.to(dtype)


def load_torchvision_backbone(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision-format ResNet state dict strictly into a MONAI 2D backbone."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = backbone.conv1.weight
    if "conv1.weight" in state and state["conv1.weight"].shape[1] != conv1.shape[1]:
        state["conv1.weight"] = adapt_input_conv(conv1.shape[1], state["conv1.weight"])
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NmosdError(f"weights do not fit the backbone: {first}") from None


def medicalnet_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A MedicalNet checkpoint's backbone weights with the DataParallel prefix removed."""
    obj = safe_torch_load(path)
    state = obj.get("state_dict", obj)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith(("conv_seg", "fc."))}


def uses_shortcut_a(state: dict[str, torch.Tensor]) -> bool:
    """MedicalNet ResNet-10/18/34 use parameter-free shortcuts (type A): no downsample weights."""
    return not any(".downsample." in k for k in state)


def load_3d_backbone(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NmosdError(f"weights do not fit the 3D backbone: {first}") from None


def load_model_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load our own whole-model safetensors file strictly."""
    try:
        state = load_safetensors(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise NmosdError(f"cannot read weights {path}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise NmosdError(f"weights {path} do not fit the model: {first}") from None
