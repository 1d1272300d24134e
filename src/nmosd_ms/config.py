"""Validated option sets. Defaults are the paper's protocol unless a comment says otherwise.

Nothing here reads files or the environment: the CLI builds these objects from its arguments,
library users build them directly, and every run writes them back out as JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

InputKind = Literal["lesion-mask", "lesion-flair", "flair"]
Interpolation = Literal["antialiased", "trilinear"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareConfig(_Options):
    """How a cohort becomes model-ready S³ volumes (``nmosd-ms prepare``)."""

    size: int = Field(100, ge=8, le=512, description="output edge length S (paper: 100)")
    input: InputKind = Field("lesion-mask", description="which lesion image feeds the model")
    interpolation: Interpolation = Field(
        "antialiased",
        description=(
            "'trilinear' samples the cropped box at S³ points like the paper's OpenCV resize; "
            "'antialiased' first box-averages axes that shrink, so lesions smaller than one output "
            "voxel keep their volume instead of vanishing between sample points"
        ),
    )
    segment_missing: bool = Field(
        False, description="segment WMH from the FLAIR when a subject has no lesion mask"
    )
    segment_drop_symmetric: bool = Field(
        False,
        description=(
            "when segmenting, drop lesions whose mirror image across the mid-sagittal plane is as "
            "bright (normal FLAIR-bright anatomy). Off here, unlike `nmosd-ms segment`: it also "
            "drops bilateral symmetric lesions under 2 ml a side (bilateral corticospinal-tract "
            "lesions, typical of NMOSD), which would bias the classifier's input by class"
        ),
    )
    min_lesion_voxels: int = Field(
        3, ge=1, description="smallest connected component counted as a lesion in features.tsv"
    )


class TrainConfig(_Options):
    """One fold's training (paper: SGD lr 0.01, lr x0.9 every 10 epochs, dropout 0.15)."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description=(
            "the paper states plain SGD at lr 0.01 (PyTorch's default momentum is 0); with 0.9 "
            "the two-view model's training loss oscillated above chance on the synthetic cohort"
        ),
    )
    weight_decay: float = Field(
        0.0, ge=0, description="not stated in the paper (PyTorch default 0)"
    )
    step_size: int = Field(10, ge=1, description="epochs between learning-rate decays")
    gamma: float = Field(0.9, gt=0, le=1, description="learning-rate factor per step")
    shift: int = Field(5, ge=0, description="max random shift in voxels per axis (training only)")
    flip: bool = Field(True, description="random left-right flip (training only)")
    class_weights: bool = Field(False, description="inverse-frequency weights in the loss")
    inner_val: float = Field(
        0.0, ge=0, lt=0.5, description="fraction of the training part held out for early stopping"
    )
    patience: int = Field(20, ge=1, description="early-stopping patience in epochs (inner-val)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    weights: str = Field("none", description="none | imagenet | path to a weight file")
    eval_every: int = Field(
        1, ge=1, description="epochs between held-out curve points (curves only, never selection)"
    )


class CVConfig(_Options):
    """Repeated stratified k-fold cross-validation (paper: 5 folds x 15 repeats)."""

    models: tuple[str, ...] = ("twoview-18", "resnet3d-18")
    repeats: int = Field(15, ge=1)
    folds: int = Field(5, ge=2)
    seed: int = 0
    model_sizes: dict[str, int] = Field(
        default_factory=dict,
        description="per-model input size S when smaller than the cache (e.g. resnet3d-18=48)",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    shortcut: bool = Field(
        True,
        description=(
            "also run lesionload-stump, the best single threshold on lesion load (seconds of "
            "CPU), so that every report shows the shortcut beside each deep model"
        ),
    )

    @property
    def run_models(self) -> tuple[str, ...]:
        """The models a run trains: ``models``, plus the shortcut baseline when asked for."""
        extra = (
            ("lesionload-stump",) if self.shortcut and "lesionload-stump" not in self.models else ()
        )
        return (*self.models, *extra)

    @field_validator("models")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one model is needed")
        if len(set(v)) != len(v):
            raise ValueError("a model is listed twice")
        return v
