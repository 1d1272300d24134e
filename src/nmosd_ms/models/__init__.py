"""Model registry: the paper's two-view network, our three-view extension, 3D ResNet baselines
and classical lesion-load baselines.

>>> from nmosd_ms.models import build_model
>>> net = build_model("twoview-18", size=100)           # nn.Module: (B,1,S,S,S) -> (B,2)
"""

from .registry import (
    MODELS,
    ModelSpec,
    build_model,
    get_spec,
    list_models,
    model_table,
    model_weights,
)

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "get_spec",
    "list_models",
    "model_table",
    "model_weights",
]
