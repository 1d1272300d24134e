"""The whole nmosd-ms workflow through the Python API, on a small synthetic cohort.

    python examples/quickstart.py WORKDIR            # about a minute on 2 CPU cores
    python examples/quickstart.py WORKDIR --size 32 --epochs 10 --n 20

Each step writes what its command-line verb writes (the tests check that the files are equal):

    phantom -> prepare -> cv -> report -> export -> predict

and the last step does the same prediction again on arrays in memory, without files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

import nmosd_ms as nm


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="a new folder for everything written")
    parser.add_argument("--n", type=int, default=10, help="subjects per class")
    parser.add_argument("--size", type=int, default=24, help="prepared volume edge length")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", type=int, default=2)
    args = parser.parse_args(argv)
    work = args.workdir

    # 1. a synthetic BIDS cohort (nmosd-ms phantom)
    nm.generate_cohort(work / "cohort", n_nmosd=args.n, n_ms=args.n, seed=0)

    # 2. read it and prepare it (nmosd-ms prepare)
    cohort = nm.load_cohort(work / "cohort")
    summary = nm.prepare(cohort, work / "prepared", nm.PrepareConfig(size=args.size))
    print(f"prepared {summary['n_subjects']} subjects: {summary['counts']}")

    # 3. cross-validate the two-view network beside a lesion-load baseline (nmosd-ms cv); the
    #    lesion-counting shortcut (lesionload-stump) is added to every run
    config = nm.CVConfig(
        models=("twoview-18", "lesionload-logreg"),
        repeats=1,
        folds=args.folds,
        seed=0,
        train=nm.TrainConfig(epochs=args.epochs),
    )
    meta = nm.run_cv(
        work / "prepared", work / "run", config, device="cpu", executor=nm.LocalExecutor(threads=1)
    )
    print(f"cross-validated {', '.join(meta['models'])}")

    # 4. the report (nmosd-ms report): tables, figures and one HTML page
    print(f"report: {nm.build_report(work / 'run')}")

    # 5. the fold models as one bundle (nmosd-ms export), then predictions (nmosd-ms predict)
    bundle = nm.load_bundle(nm.export_bundle(work / "run", "twoview-18", work / "model"))
    new = cohort.subjects[:4]
    table = nm.predict_subjects(bundle, new, work / "predictions")
    print(table[["participant_id", "prob_nmosd", "predicted"]].to_string(index=False))

    # 6. the same prediction on arrays in memory (no files written)
    first = new[0]

    def array(path):
        return None if path is None else np.asarray(nib.load(path).dataobj, dtype=np.float32)

    result = nm.predict_arrays(
        bundle,
        nib.load(first.lesion_mask).affine,
        lesion=array(first.lesion_mask),
        flair=array(first.flair),
        brain=array(first.brain_mask),
        participant_id=first.participant_id,
    )
    saliency = nm.saliency_volume(bundle, result["prepared"].array, occlusion_size=8)
    print(
        f"{first.participant_id} from arrays: P(NMOSD) = {result['prob_nmosd']:.3f} "
        f"({result['predicted']}); saliency map {saliency.shape}"
    )
    return {"table": table, "arrays": result}


if __name__ == "__main__":
    main()
