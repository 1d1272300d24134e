"""Named model builders (torchvision-style: small functions, weights as data).

Every torch model takes ``(B, 1, S, S, S)`` and returns 2-class logits (index 1 = NMOSD).
``lesionload-*`` models are scikit-learn pipelines on ``features.tsv`` columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import NmosdError
from . import weights as W
from .networks import MultiViewNet, ResNet3D


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "multiview" | "resnet3d" | "lesionload"
    description: str
    depth: int = 0
    views: tuple[str, ...] = ()

    @property
    def is_torch(self) -> bool:
        return self.family != "lesionload"

    def build(self, size: int = 100, weights: str = "none"):
        return _BUILDERS[self.family](self, size, weights)


def _multiview(spec: ModelSpec, size: int, weights: str) -> nn.Module:
    model = MultiViewNet(size=size, depth=spec.depth, views=spec.views)
    if weights == "imagenet":
        W.load_torchvision_backbone(model.backbone, W.imagenet_state_dict(spec.depth))
    elif weights != "none":
        path = _weights_path(weights)
        if path.suffix == ".safetensors":
            W.load_model_file(model, path)
        else:
            W.load_torchvision_backbone(model.backbone, W.safe_torch_load(path))
    return model


def _resnet3d(spec: ModelSpec, size: int, weights: str) -> nn.Module:
    if weights == "imagenet":
        raise NmosdError(f"{spec.name}: no ImageNet weights exist for 3D models (use a file)")
    if weights == "none":
        return ResNet3D(depth=spec.depth)
    path = _weights_path(weights)
    if path.suffix == ".safetensors":
        model = ResNet3D(depth=spec.depth)
        W.load_model_file(model, path)
        return model
    state = W.medicalnet_state_dict(path)
    model = ResNet3D(depth=spec.depth, shortcut_type="A" if W.uses_shortcut_a(state) else "B")
    W.load_3d_backbone(model.backbone, state)
    return model


def _lesionload(spec: ModelSpec, size: int, weights: str):
    from .lesionload import build_lesionload

    return build_lesionload(spec.name)


_BUILDERS: dict[str, Callable] = {
    "multiview": _multiview,
    "resnet3d": _resnet3d,
    "lesionload": _lesionload,
}


def _weights_path(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise NmosdError(
            f"weights must be none, imagenet or an existing file; not found: {path}",
            option="weights",
        )
    return path


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "twoview-18",
            "multiview",
            "paper: two-view compression + 2D ResNet-18",
            18,
            ("lr", "ap"),
        ),
        ModelSpec(
            "twoview-34",
            "multiview",
            "paper: two-view compression + 2D ResNet-34",
            34,
            ("lr", "ap"),
        ),
        ModelSpec(
            "threeview-18",
            "multiview",
            "ours: three-view compression + 2D ResNet-18",
            18,
            ("lr", "ap", "si"),
        ),
        ModelSpec(
            "threeview-34",
            "multiview",
            "ours: three-view compression + 2D ResNet-34",
            34,
            ("lr", "ap", "si"),
        ),
        ModelSpec("resnet3d-18", "resnet3d", "paper baseline: 3D ResNet-18 (Hara et al.)", 18),
        ModelSpec("resnet3d-34", "resnet3d", "paper baseline: 3D ResNet-34 (Hara et al.)", 34),
        ModelSpec(
            "lesionload-stump",
            "lesionload",
            "shortcut: the best single threshold on lesion count or volume (depth-1 tree)",
        ),
        ModelSpec(
            "lesionload-logreg",
            "lesionload",
            "classical: standardised logistic regression on lesion-load features",
        ),
        ModelSpec(
            "lesionload-forest", "lesionload", "classical: random forest on lesion-load features"
        ),
    )
}


def list_models() -> list[str]:
    """The names of every registered model (``nmosd-ms models``)."""
    return list(MODELS)


def parse_name(name: str) -> tuple[str, str | None]:
    """``twoview-18@imagenet`` -> (``twoview-18``, ``imagenet``): a registered model with its own
    weights, so that pretrained and from-scratch variants share one run (the paper's comparison)."""
    base, sep, weights = name.partition("@")
    if sep and weights not in ("imagenet", "none"):
        raise NmosdError(f"model '{name}': only @imagenet or @none may follow a model name")
    return base, (weights if sep else None)


def get_spec(name: str) -> ModelSpec:
    base, weights = parse_name(name)
    try:
        spec = MODELS[base]
    except KeyError:
        raise NmosdError(f"unknown model '{base}' (known: {', '.join(MODELS)})") from None
    if weights == "imagenet" and spec.family != "multiview":
        raise NmosdError(f"model '{name}': ImageNet weights exist only for the 2D backbones")
    return spec


def model_weights(name: str, default: str = "none") -> str:
    """The weights a (possibly suffixed) model name asks for, else ``default``."""
    return parse_name(name)[1] or default


def build_model(name: str, size: int = 100, weights: str = "none"):
    """Build the registered model ``name`` for input volumes of ``size``³, with initial
    ``weights`` ("none", "imagenet" for the 2D backbones, or a weight file's path)."""
    return get_spec(name).build(size=size, weights=weights)


def model_table(size: int = 100) -> list[dict]:
    """Every registered model with its parameter count and FLOPs per forward pass at input size
    ``size`` (``None`` for the lesion-load models, which are not networks)."""
    from .complexity import count_flops, count_parameters

    rows = []
    for name, spec in MODELS.items():
        params = flops = None
        if spec.is_torch:
            net = spec.build(size=size)
            params, flops = count_parameters(net), count_flops(net, size)
        rows.append(
            {"name": name, "parameters": params, "flops": flops, "description": spec.description}
        )
    return rows
