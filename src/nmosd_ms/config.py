"""Validated option sets. Defaults are the paper's protocol unless a comment says otherwise.

Nothing here reads files or the environment: the CLI builds these objects from its arguments,
library users build them directly, and every run writes them back out as JSON.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

InputKind = Literal["lesion-mask", "lesion-flair", "flair"]
Interpolation = Literal["antialiased", "trilinear"]
#: Training precision: "bf16"/"fp16" run the forward pass under torch.autocast in that dtype.
Precision = Literal["fp32", "bf16", "fp16"]
#: Where torch models run ("auto": CUDA when available, else the CPU).
Device = Literal["auto", "cpu", "cuda"]
#: Where cross-validation folds are trained (nmosd_ms.training.executors).
ExecutorName = Literal["local", "dask"]
#: The synthetic cohort's presets (nmosd_ms.phantom.lesions.DIFFICULTIES).
DifficultyName = Literal["easy", "paper", "spatial", "hard"]
#: Named initial weights; any other value of ``TrainConfig.weights`` is a weight file's path.
NAMED_WEIGHTS = ("none", "imagenet")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


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
    min_lesion_mm3: float = Field(
        24.0,
        ge=0,
        description=(
            "smallest connected component counted as a lesion in the lesion-load features, in "
            "mm³ (24: three 2 mm voxels; a count of voxels would make lesion counts depend on "
            "the voxel size)"
        ),
    )
    min_lesion_voxels: int | None = Field(
        None,
        ge=1,
        description=(
            "the old rule, in voxels (caches and bundles made before min_lesion_mm3 used 3); "
            "when set it replaces min_lesion_mm3"
        ),
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
    precision: Precision = Field("fp32", description="autocast dtype of training and inference")
    pretext_epochs: int = Field(
        0,
        ge=0,
        description=(
            "epochs of the pretext nmosd-ms pretrain uses (which cells of a 10³ grid hold "
            "lesion), run on the fold's own training maps before the supervised epochs: a "
            "prior from no other data and no labels (0: none; not in the paper)"
        ),
    )
    weights: str = Field(
        "none",
        description=(
            "none | imagenet | path to a .safetensors (or torchvision .pth) file; a model name "
            "may also carry its own, as twoview-18@imagenet"
        ),
    )
    eval_every: int = Field(
        1, ge=1, description="epochs between held-out curve points (curves only, never selection)"
    )
    channels_last: bool = Field(
        False,
        description=(
            "CUDA only (ignored on a CPU): the network and its batches in channels-last memory "
            "(NDHWC for 3D networks), which cuDNN runs faster in bf16"
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "CUDA only (ignored on a CPU): torch.compile the network's training steps (a minute "
            "or more of compilation per fold, then shorter steps)"
        ),
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        v = v.strip()
        if v in NAMED_WEIGHTS or v.lower().endswith(WEIGHT_SUFFIXES):
            return v
        raise ValueError(
            f"weights must be {' or '.join(NAMED_WEIGHTS)} or a weight file "
            f"({', '.join(WEIGHT_SUFFIXES)}), not {v!r}"
        )


class PretrainConfig(_Options):
    """Self-supervised pretraining on unlabelled lesion maps (``nmosd-ms pretrain``): the network
    learns to say which cells of a grid over the prepared volume hold lesion. Diagnoses are never
    read. Not in the paper, which started from ImageNet weights; this is the prior a small cohort
    can make for itself from lesion maps without labels when those weights are not at hand."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=2, description="at least 2 (BatchNorm trains on batches)")
    lr: float = Field(
        1e-3,
        gt=0,
        description=(
            "Adam learning rate (the pretext has a thousand sparse outputs; the paper's SGD "
            "schedule applies to the fine-tuning that follows)"
        ),
    )
    grid: int = Field(
        10, ge=2, le=32, description="the pretext's grid: G³ cells, each 'holds lesion or not'"
    )
    shift: int = Field(5, ge=0, description="max random shift in voxels per axis")
    flip: bool = Field(True, description="random left-right flip")
    precision: Precision = Field("fp32", description="autocast dtype")


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


class SegmentConfig(_Options):
    """White-matter-hyperintensity segmentation from a FLAIR (``nmosd-ms segment``; the steps are
    described in :mod:`nmosd_ms.segment.wmh`). The defaults were chosen on the two public FLAIRs
    with consensus masks that the tests use."""

    low: float = Field(2.5, gt=0, description="local-contrast z the seeds grow through")
    high: float = Field(3.5, gt=0, description="local-contrast z of the seeds")
    min_volume_mm3: float = Field(10.0, ge=0, description="smallest lesion kept (mm³)")
    min_seed_mm3: float = Field(3.0, ge=0, description="smallest seed component that may grow")
    rim_mm: float = Field(1.0, ge=0, description="lesions take in their border this deep ...")
    rim_low: float = Field(1.5, description="... where z is at least this (partial volume)")
    edge_mm: float = Field(
        2.0, ge=0, description="brain-edge rim whose components are dropped (mm)"
    )
    background_mm: float = Field(
        8.0, gt=0, description="Gaussian σ of the local tissue background (mm)"
    )
    background_fraction: float = Field(
        0.6, gt=0, description="brighter than this × tissue mode enters the background"
    )
    csf_fraction: float = Field(0.8, gt=0, description="darker than this × tissue mode = CSF")
    csf_margin_mm: float = Field(2.5, ge=0, description="seeds at least this far from CSF (mm)")
    drop_symmetric: bool = Field(
        True,
        description=(
            "drop lesions whose mirror image across the mid-sagittal plane is as bright (normal "
            "FLAIR-bright anatomy); keep them when small bilateral symmetric lesions are expected"
        ),
    )
    max_pair_mm3: float = Field(
        2000.0, ge=0, description="a lesion this large whose mirror is a lesion too is kept"
    )
    working_mm: float = Field(
        1.0,
        ge=0,
        description="scans with voxels under half this cube are box-averaged to it first (0: never)",
    )

    @field_validator("high")
    @classmethod
    def _order(cls, v: float, info) -> float:
        low = info.data.get("low")
        if low is not None and v < low:
            raise ValueError(f"high ({v}) must be at least low ({low})")
        return v
