"""The demo workflow: synthetic cohort -> prepare -> quick cross-validation -> report.

A quick version of the paper's protocol that finishes in minutes on two CPU cores; re-running it
resumes every step (the phantom is reused, the cache is reused, finished folds are skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from .config import CVConfig, PrepareConfig, TrainConfig
from .data.cache import prepare
from .data.dataset import load_cohort
from .phantom import generate_cohort
from .report import build_report
from .training.cv import run_cv

ProgressFactory = Callable[[str], contextlib.AbstractContextManager]

DEMO_MODELS = ("twoview-18", "resnet3d-18", "lesionload-logreg")
DEMO_TRAIN = TrainConfig(epochs=15, batch_size=8, eval_every=3)
#: The 3D baseline at 100³ costs ~30x the two-view model per step (make bench); at 32³ it took
#: 7.4 of the demo's 11.8 min on an AVX2-only 2-core CPU, at 24³ (2.4x fewer voxels) the demo
#: stays under 10 min there.
DEMO_3D_SIZE = 24

#: The paper's arms: 3D ResNet-18/34 baselines, two-view 18/34 from scratch and, when the weights
#: are on this machine, ImageNet-pretrained (the paper's best figures are the pretrained ones).
PAPER_MODELS = ("twoview-18", "twoview-34", "resnet3d-18", "resnet3d-34", "lesionload-logreg")
PRETRAINED_MODELS = ("twoview-18@imagenet", "twoview-34@imagenet")
FULL_PROTOCOL = (
    "nmosd-ms cv {cache} --out {out}/paper-run --models {models} "
    "--repeats 15 --folds 5 --epochs 100 && nmosd-ms report {out}/paper-run"
)


def imagenet_weights_present() -> dict[int, bool]:
    """Whether torchvision's ImageNet ResNet-18/34 files are in the local torch hub cache (they
    cannot be downloaded on an offline machine)."""
    from .models.weights import IMAGENET, hub_checkpoint_dir

    return {depth: (hub_checkpoint_dir() / s.file_name).is_file() for depth, s in IMAGENET.items()}


def full_protocol(cache: Path, out: Path) -> tuple[str, str]:
    """The command that runs the paper's protocol on ``cache``, and a sentence saying whether
    it includes the ImageNet-pretrained arms the paper's headline figures come from."""
    present = imagenet_weights_present()
    models = list(PAPER_MODELS)
    if all(present.values()):
        models[2:2] = PRETRAINED_MODELS
        note = "ImageNet-pretrained two-view arms included (weights found in the torch hub cache)."
    else:
        note = (
            "ImageNet weights are not on this machine, so the pretrained two-view arms (the "
            "paper's 0.75 / 0.725 accuracies) are left out: compare the from-scratch arms with "
            "the paper's non-pretrained figures only. To add them, put torchvision's "
            "resnet18-f37072fd.pth and resnet34-b627a593.pth in $TORCH_HOME/hub/checkpoints and "
            "add twoview-18@imagenet,twoview-34@imagenet to --models."
        )
    return FULL_PROTOCOL.format(cache=cache, out=out, models=",".join(models)), note


@contextlib.contextmanager
def _silent(label: str):
    yield lambda *a, **k: None


def run_demo(
    out_dir: str | Path,
    seed: int = 0,
    difficulty: str = "paper",
    repeats: int = 1,
    folds: int = 5,
    progress: ProgressFactory = _silent,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the demo into ``out_dir``; returns paths of what it wrote."""
    out = Path(out_dir)
    cohort_dir, cache, run = out / "cohort", out / "cache", out / "run"
    if (cohort_dir / "participants.tsv").is_file():
        log(f"reusing the synthetic cohort in {cohort_dir}")
    else:
        with progress("1/4 phantom") as bar:
            generate_cohort(cohort_dir, 41, 47, seed, difficulty, workers=2, progress=bar)
    with progress("2/4 prepare") as bar:
        prepare(load_cohort(cohort_dir), cache, PrepareConfig(size=100), workers=2, progress=bar)
    config = CVConfig(
        models=DEMO_MODELS,
        repeats=repeats,
        folds=folds,
        seed=seed,
        model_sizes={"resnet3d-18": DEMO_3D_SIZE},
        train=DEMO_TRAIN,
    )
    with progress("3/4 cv") as bar:
        run_cv(cache, run, config, device="auto", progress=bar)
    log("4/4 report")
    index = build_report(run)
    command, note = full_protocol(cache, out)
    return {
        "cohort": cohort_dir,
        "cache": cache,
        "run": run,
        "report": index,
        "full_protocol": command,
        "full_protocol_note": note,
    }
