"""Cohort ingestion: a BIDS folder or a manifest table becomes a validated :class:`Cohort`.

Only the structure is checked here (files, identifiers, labels); image contents are checked when
they are read (:mod:`nmosd_ms.data.nifti`), still before anything is written.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import LABELS
from ..errors import NmosdError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Subject:
    participant_id: str
    diagnosis: str  # "NMOSD" or "MS"
    flair: Path | None
    lesion_mask: Path | None
    brain_mask: Path | None = None

    @property
    def label(self) -> int:
        return LABELS.index(self.diagnosis)


@dataclass(frozen=True)
class Cohort:
    subjects: tuple[Subject, ...]
    source: str
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(s.diagnosis for s in self.subjects)
        return {label: c.get(label, 0) for label in LABELS}


def normalise_label(value: object, pid: str, column: str) -> str:
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    label = text.strip().upper()
    if label not in LABELS:
        raise NmosdError(
            f"participant {pid}: unknown {column} '{text}' (expected NMOSD or MS, any case)"
        )
    return label


def _read_table(path: Path) -> pd.DataFrame:
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise NmosdError(f"cannot parse {path}: {exc}") from None
    df.columns = [c.strip() for c in df.columns]
    return df


def _check_ids(ids: list[str], where: Path) -> None:
    if any(not i for i in ids):
        raise NmosdError(f"{where}: a row has an empty participant_id")
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise NmosdError(f"{where}: duplicate participant_id {', '.join(dup)}")


def _require_columns(df: pd.DataFrame, cols: list[str], where: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise NmosdError(f"{where}: missing column(s) {', '.join(missing)}")


def _existing(path: Path, what: str, pid: str) -> Path:
    if not path.is_file():
        raise NmosdError(f"participant {pid}: {what} not found: {path}")
    return path


def load_manifest(path: str | Path, labelled: bool = True) -> Cohort:
    """Read a ``.tsv``/``.csv`` manifest: participant_id, diagnosis, flair, lesion_mask[, brain_mask].

    Paths are relative to the manifest. An empty ``flair`` cell means mask-only data; an empty
    ``lesion_mask`` cell is only usable with WMH segmentation (``prepare --segment-missing``).
    With ``labelled=False`` (new patients to predict) there is no diagnosis column, and either
    image column may be absent; subjects get an empty diagnosis.
    """
    path = Path(path)
    if not path.is_file():
        raise NmosdError(f"manifest not found: {path}")
    df = _read_table(path)
    if labelled:
        _require_columns(df, ["participant_id", "diagnosis", "flair", "lesion_mask"], path)
    elif "participant_id" not in df.columns or not {"lesion_mask", "flair"} & set(df.columns):
        raise NmosdError(f"{path}: needs participant_id and lesion_mask (or flair) columns")
    ids = [str(v).strip() for v in df["participant_id"]]
    _check_ids(ids, path)
    base = path.parent
    subjects = []
    for pid, (_, row) in zip(ids, df.iterrows(), strict=True):
        label = normalise_label(row["diagnosis"], pid, "diagnosis") if labelled else ""

        def opt(col: str, what: str, pid: str = pid, row=row) -> Path | None:
            cell = str(row.get(col, "") or "").strip()
            return _existing((base / cell).resolve(), what, pid) if cell else None

        flair = opt("flair", "FLAIR")
        lesion = opt("lesion_mask", "lesion mask")
        brain = opt("brain_mask", "brain mask")
        if flair is None and lesion is None:
            raise NmosdError(f"participant {pid}: neither a FLAIR nor a lesion mask is given")
        subjects.append(Subject(pid, label, flair, lesion, brain))
    return Cohort(tuple(subjects), source=str(path.resolve()))


def _one(
    matches: list[Path], what: str, pid: str, required: bool, where: Path, hint: str = ""
) -> Path | None:
    matches = sorted(m for m in matches if m.name.endswith(NIFTI_SUFFIXES))
    if not matches:
        if required:
            raise NmosdError(f"participant {pid}: {what} not found under {where}{hint}")
        return None
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise NmosdError(f"participant {pid}: more than one {what} under {where} ({names})")
    return matches[0]


def load_bids(
    root: str | Path,
    lesions: str = "lesions",
    label_column: str = "diagnosis",
    require_lesion_masks: bool = True,
) -> Cohort:
    """Read a BIDS folder: participants.tsv, sub-*/anat/*_FLAIR, derivatives/<lesions>/ masks."""
    root = Path(root)
    table = root / "participants.tsv"
    if not table.is_file():
        raise NmosdError(f"{root} is not a BIDS folder: participants.tsv not found")
    df = _read_table(table)
    _require_columns(df, ["participant_id", label_column], table)
    ids = [str(v).strip() for v in df["participant_id"]]
    _check_ids(ids, table)
    deriv = root / "derivatives" / lesions
    if require_lesion_masks and not deriv.is_dir():
        raise NmosdError(
            f"lesion derivatives folder not found: {deriv} (see --lesions, or use "
            "--segment-missing to segment the FLAIRs)"
        )
    subjects = []
    for pid, value in zip(ids, df[label_column], strict=True):
        label = normalise_label(value, pid, label_column)
        anat = root / pid / "anat"
        flair = _one(list(anat.glob(f"{pid}*_FLAIR.nii*")), "FLAIR", pid, True, anat)
        danat = deriv / pid / "anat"
        lesion = _one(
            list(danat.glob("*_desc-lesion_mask.nii*")),
            "lesion mask",
            pid,
            require_lesion_masks,
            danat,
            " (or use --segment-missing to segment the FLAIR)",
        )
        brain = _one(
            list(danat.glob("*_desc-brain_mask.nii*")) + list(anat.glob("*_desc-brain_mask.nii*")),
            "brain mask",
            pid,
            False,
            danat,
        )
        subjects.append(Subject(pid, label, flair, lesion, brain))
    return Cohort(tuple(subjects), source=str(root.resolve()), extra={"lesions": lesions})


def load_cohort(
    dataset: str | Path,
    lesions: str = "lesions",
    label_column: str = "diagnosis",
    require_lesion_masks: bool = True,
) -> Cohort:
    """A BIDS folder or a manifest file, whichever ``dataset`` is."""
    dataset = Path(dataset)
    if dataset.is_dir():
        cohort = load_bids(dataset, lesions, label_column, require_lesion_masks)
    elif dataset.suffix.lower() in (".tsv", ".csv"):
        cohort = load_manifest(dataset)
    elif not dataset.exists():
        raise NmosdError(f"dataset not found: {dataset}")
    else:
        raise NmosdError(f"{dataset} is neither a BIDS folder nor a .tsv/.csv manifest")
    if not cohort.subjects:
        raise NmosdError(f"{dataset}: the cohort is empty")
    if require_lesion_masks:
        for s in cohort.subjects:
            if s.lesion_mask is None:
                raise NmosdError(
                    f"participant {s.participant_id}: no lesion mask (give one, or use "
                    "--segment-missing to segment it from the FLAIR)"
                )
    return cohort


def check_trainable(labels: list[str] | tuple[str, ...], folds: int) -> None:
    """Commands that train refuse a cohort with one class or too few subjects per class."""
    counts = Counter(labels)
    present = [lab for lab in LABELS if counts.get(lab, 0) > 0]
    if len(present) < 2:
        only = present[0] if present else "none"
        raise NmosdError(f"the cohort has one class only ({only}); training needs NMOSD and MS")
    for lab in LABELS:
        if counts[lab] < folds:
            raise NmosdError(
                f"the cohort has {counts[lab]} {lab} subject(s), fewer than the {folds} folds"
            )
