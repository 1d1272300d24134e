"""A paper-sized estimate for N GPUs, from the FLOPs the benchmark measured per training step.

No GPU was available to this project, so this is arithmetic, not a measurement: the FLOPs of
one training step (``step_gflops × step_seconds`` in ``results/full.json``: torch's
FlopCounterMode on the autograd graph, batch 8, S = 100) times the steps of the protocol,
divided by an assumed sustained GPU throughput (``--peak-tflops`` × ``--utilisation``) and by
the number of GPUs (the folds are independent: one fold per GPU). Small models (the two-view
ones) are bound by data movement and kernel launches rather than FLOPs on a GPU, so their
figure is a lower bound.

    python -m benchmarks.gpu_estimate [--peak-tflops 11.3] [--utilisation 0.5] [--gpus 1 4 8]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import ArgumentParser

RESULTS = Path(__file__).parent / "results"
#: The paper's protocol: 15 repeats x 5 folds, 100 epochs, 4/5 of 88 subjects per training part.
FOLDS, EPOCHS, TRAIN_SUBJECTS = 75, 100, 70
MODELS = ("twoview-18", "twoview-34", "resnet3d-18", "resnet3d-34")


def protocol_tflop(full: dict, model: str) -> float:
    """TFLOP of every training step of the protocol for ``model`` (fp32)."""
    step_gflop = full["step_gflops"][model] * full["step_seconds"][model]
    steps = FOLDS * EPOCHS * math.ceil(TRAIN_SUBJECTS / full["batch"])
    return step_gflop * steps / 1000.0


def estimate(full: dict, peak_tflops: float, utilisation: float, gpus: list[int]) -> list[dict]:
    rows = []
    for model in MODELS:
        tflop = protocol_tflop(full, model)
        hours = tflop / (peak_tflops * utilisation) / 3600.0
        rows.append(
            {"model": model, "pflop": tflop / 1000.0, **{f"{n} GPU": hours / n for n in gpus}}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak-tflops", type=float, default=11.3, help="fp32 peak (1080 Ti: 11.3)")
    ap.add_argument("--utilisation", type=float, default=0.5, help="sustained share of peak")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu_estimate.md")
    args = ap.parse_args(argv)
    full = json.loads((RESULTS / "full.json").read_text())
    rows = estimate(full, args.peak_tflops, args.utilisation, args.gpus)
    head = ["model", "PFLOP (75 folds)", *(f"h on {n} GPU" for n in args.gpus)]
    lines = [
        f"Estimate (not measured): {args.peak_tflops} TFLOP/s fp32 peak at "
        f"{args.utilisation:.0%} sustained; FLOPs from the CPU benchmark's training steps.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["model"], f"{r['pflop']:.2f}", *(f"{r[f'{n} GPU']:.2f}" for n in args.gpus)]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_estimate.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
