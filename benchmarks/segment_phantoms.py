"""WMH segmentation on synthetic FLAIRs whose truth is known: what the symmetry step (step 7 of
``nmosd-ms segment``) removes, and from whom.

Two parts, both on phantoms of the current lesion generator (the revision is printed):

- **cohort**: each subject of a phantom cohort (its FLAIR and the lesion mask it was drawn
  with; brain mask estimated, as ``segment`` does without one) segmented with step 7 and
  without it. Per diagnosis: mean Dice both ways, the volume step 7 removed per patient and how
  much of it was true lesion, and found against true volume (Pearson r, Spearman ρ, slope).
  Step 7 removes normal anatomy that is bright on both sides; the question is whether it also
  removes one class's lesions more than the other's (a class-dependent change of the
  classifier's input).
- **cst**: NMOSD's long corticospinal-tract lesions painted on the template, on both sides
  (mirror images) or on the right only, at several lengths and thicknesses; the lesion's recall
  with and without step 7. A pair under ``large_ml`` (2 ml) a side looks like normal symmetric
  anatomy to the step, which is why ``prepare`` and ``predict`` leave it off by default. The
  lesions are drawn at ``gain`` × the phantom's contrast (default 1.85 / 1.4, the first
  generator's contrast, as the unit test does): at the realistic 1.3–1.5× the segmentation
  finds few thin tract lesions at all, and this part is about what step 7 does with the ones it
  finds.

    python -m benchmarks.segment_phantoms COHORT [--n 40] [--out TSV_PREFIX]

Prints a markdown summary; ``--out P`` also writes ``P-cohort.tsv`` and ``P-cst.tsv`` (one row per
subject or lesion), each refused if it exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from benchmarks import ArgumentParser
from nmosd_ms.config import SegmentConfig
from nmosd_ms.data.bids import load_bids
from nmosd_ms.errors import NmosdError
from nmosd_ms.io import write_tsv
from nmosd_ms.nifti import load
from nmosd_ms.segment.wmh import segment_wmh

WITH_STEP7 = SegmentConfig()
WITHOUT_STEP7 = SegmentConfig(drop_symmetric=False)
#: (start, end) fractions of the right CST path (capsule -> peduncle) and tube radii in mm.
CST_SPANS = ((0.30, 0.55), (0.25, 0.65), (0.15, 0.75))
CST_RADII = (2.5, 3.5)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def segment_cohort(cohort_dir: str | Path, n: int | None = None) -> pd.DataFrame:
    """One row per subject (the first ``n``, in participant order): diagnosis, true, found
    (with and without step 7) and removed volumes in ml, and both Dice values."""
    cohort = load_bids(cohort_dir)
    subjects = cohort.subjects[:n] if n else cohort.subjects
    rows = []
    for s in subjects:
        if s.lesion_mask is None:
            raise NmosdError(f"{s.participant_id} has no lesion mask: a phantom cohort is needed")
        flair = load(s.flair, "FLAIR")
        truth = load(s.lesion_mask, "lesion mask").data > 0
        on = segment_wmh(flair.data, flair.zooms, None, WITH_STEP7)
        off = segment_wmh(flair.data, flair.zooms, None, WITHOUT_STEP7)
        removed = off & ~on
        ml = flair.voxel_ml
        rows.append(
            {
                "participant_id": s.participant_id,
                "diagnosis": s.diagnosis,
                "true_ml": truth.sum() * ml,
                "found_ml": on.sum() * ml,
                "found_without_step7_ml": off.sum() * ml,
                "removed_ml": removed.sum() * ml,
                "removed_lesion_ml": (removed & truth).sum() * ml,
                "dice": dice(on, truth),
                "dice_without_step7": dice(off, truth),
            }
        )
    return pd.DataFrame(rows)


def cst_recall(
    spans=CST_SPANS, radii=CST_RADII, gain: float = 1.85 / 1.4, seed: int = 2
) -> pd.DataFrame:
    """One row per (span, radius, sides): the lesion's volume a side (ml) and its recall with
    and without step 7."""
    from nmosd_ms.phantom.anatomy import CST_PATH_RIGHT, load_anatomy, mirror, sample_path
    from nmosd_ms.phantom.generate import synth_flair
    from nmosd_ms.phantom.lesions import Lesion, paint

    anat = load_anatomy(2)
    voxel_ml = float(np.prod(anat.zooms)) / 1000
    rows = []
    for start, end in spans:
        for radius in radii:
            for sides in ("both", "right"):
                paths = (CST_PATH_RIGHT, mirror(CST_PATH_RIGHT))[: 2 if sides == "both" else 1]
                # Built by hand, not with the generator's make_lesion(anat, "nmosd_cst", ...):
                # that draws a random span and radius, and this table needs the same controlled
                # span and radius on one side and on both.
                tubes = []
                for path in paths:
                    pts = sample_path(path, 1.0)
                    part = pts[int(len(pts) * start) : int(len(pts) * end)]
                    volume = np.pi * radius**2 * len(part)  # a tube of 1 mm steps
                    tubes.append(Lesion("nmosd_cst", volume, tube=(part, radius)))
                lesion = paint(tubes, anat)
                flair = synth_flair(anat, lesion, np.random.default_rng(seed))
                flair = np.where(lesion, flair * gain, flair).astype(np.float32)
                on = segment_wmh(flair, anat.zooms, None, WITH_STEP7)
                off = segment_wmh(flair, anat.zooms, None, WITHOUT_STEP7)
                total = int(lesion.sum())
                rows.append(
                    {
                        "span": f"{start:.2f}-{end:.2f}",
                        "radius_mm": radius,
                        "sides": sides,
                        "ml_a_side": total * voxel_ml / len(paths),
                        "recall_without_step7": (off & lesion).sum() / total,
                        "recall": (on & lesion).sum() / total,
                    }
                )
    return pd.DataFrame(rows)


def summary(cohort: pd.DataFrame, cst: pd.DataFrame, large_ml: float = 2.0) -> str:
    from nmosd_ms.phantom.lesions import GENERATOR_REVISION

    out = [f"Lesion generator revision {GENERATOR_REVISION}.", ""]
    if len(cohort):
        out += [
            f"**Cohort** ({len(cohort)} subjects; brain mask estimated):",
            "",
            "| group | n | Dice without → with step 7 | removed ml per patient | of it true lesion |",
            "|---|---|---|---|---|",
        ]
        for name, g in [*cohort.groupby("diagnosis"), ("all", cohort)]:
            out.append(
                f"| {name} | {len(g)} | {g['dice_without_step7'].mean():.2f} → "
                f"{g['dice'].mean():.2f} | {g['removed_ml'].mean():.2f} | "
                f"{g['removed_lesion_ml'].mean():.3f} |"
            )
        t, f, f0 = cohort["true_ml"], cohort["found_ml"], cohort["found_without_step7_ml"]
        slope = float(np.polyfit(t, f, 1)[0]) if t.nunique() > 1 else float("nan")
        out += [
            "",
            f"Found against true volume ({t.min():.1f}–{t.max():.1f} ml): Pearson r "
            f"{stats.pearsonr(t, f)[0]:.2f}, Spearman ρ {stats.spearmanr(t, f)[0]:.2f} "
            f"({stats.spearmanr(t, f0)[0]:.2f} without step 7), slope {slope:.2f}.",
            "",
        ]
    if len(cst):
        out += [
            f"**Corticospinal-tract lesions** (drawn at {len(cst)} configurations; recall "
            "without → with step 7):",
            "",
            "| sides | ml a side | recall without → with step 7 |",
            "|---|---|---|",
        ]
        for r in cst.sort_values(["sides", "ml_a_side"]).itertuples():
            out.append(
                f"| {r.sides} | {r.ml_a_side:.2f} | {r.recall_without_step7:.2f} → {r.recall:.2f} |"
            )
        pairs = cst[(cst["sides"] == "both") & (cst["recall_without_step7"] > 0.5)]
        small = pairs[pairs["ml_a_side"] < large_ml]
        out += [
            "",
            f"Bilateral pairs found without step 7: {len(pairs)}; under {large_ml:g} ml a side: "
            f"{len(small)}, of which step 7 removed (recall < 0.1) {int((small['recall'] < 0.1).sum())}.",
        ]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.segment_phantoms", description=__doc__)
    ap.add_argument("cohort", help="a phantom cohort (nmosd-ms phantom): FLAIRs and lesion masks")
    ap.add_argument("--n", type=int, default=40, help="the first N subjects (0: all)")
    ap.add_argument("--parts", default="cohort,cst", help="cohort, cst or both")
    ap.add_argument("--out", help="prefix of the per-row tables (P-cohort.tsv, P-cst.tsv)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"cohort", "cst"}:
        ap.error(f"--parts takes cohort and/or cst, not {args.parts}")
    if args.n < 0:
        ap.error(f"--n is 0 (all subjects) or more, not {args.n}")
    outs = {}
    if args.out:
        for part in parts:
            path = Path(f"{args.out}-{part}.tsv")
            if path.exists():
                ap.error(f"{path} exists; it is never overwritten")
            outs[part] = path
    try:
        cohort = segment_cohort(args.cohort, args.n or None) if "cohort" in parts else None
    except NmosdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cst = cst_recall() if "cst" in parts else None
    for part, table in (("cohort", cohort), ("cst", cst)):
        if part in outs:
            write_tsv(outs[part], table)
    print(
        summary(
            cohort if cohort is not None else pd.DataFrame(),
            cst if cst is not None else pd.DataFrame(),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
