"""Cohort ingestion: a BIDS folder or a manifest table becomes a validated :class:`Cohort`.

Only the structure is checked here (files, identifiers, labels); image contents are checked when
they are read (:mod:`nmosd_ms.data.nifti`), still before anything is written.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import LABELS
from ..errors import NmosdError
from ..io import regular_file

NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: A participant ID becomes part of file names (``<id>.npy``, ``<id>_saliency.nii.gz``), so it is
#: checked once, here: letters and digits (any script), ``-``, ``_`` and ``.``; no leading ``.``,
#: no ``..``; at most 128 characters. BIDS labels (``sub-<alphanumeric>``) always pass.
MAX_ID_LENGTH = 128
_ID_CHARS = re.compile(r"[\w.-]+")  # \w: letters, digits and "_" in any script
_BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")


def validate_participant_id(pid: str, where: str = "") -> str:
    """Return ``pid`` if it is safe as part of a file name, else raise one user error."""
    at = f"{where}: " if where else ""
    shown = pid.encode("unicode_escape").decode("ascii")[:60]
    if not pid:
        raise NmosdError(f"{at}a row has an empty participant_id")
    if (
        len(pid) > MAX_ID_LENGTH
        or not _ID_CHARS.fullmatch(pid)
        or pid.startswith(".")
        or ".." in pid
        or not pid.isprintable()
    ):
        raise NmosdError(
            f"{at}participant_id '{shown}' is not allowed: use letters, digits, '-', '_' and '.' "
            f"(not first, never '..'), at most {MAX_ID_LENGTH} characters"
        )
    return pid


@dataclass(frozen=True)
class Subject:
    participant_id: str
    diagnosis: str  # "NMOSD" or "MS"
    flair: Path | None
    lesion_mask: Path | None
    brain_mask: Path | None = None

    def __post_init__(self) -> None:
        validate_participant_id(self.participant_id)

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


#: The largest table read (a cohort of tens to thousands of rows is a few hundred kB).
MAX_TABLE_BYTES = 64 * 2**20


def _read_table(path: Path) -> pd.DataFrame:
    """A TSV (CSV for ``.csv``) of strings. Read with the csv module first so that a row with more
    or fewer cells than the header (a stray tab) is refused: pandas would shift the columns and
    use the first one as an index."""
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    regular_file(path, "table")
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise NmosdError(f"{path} is larger than {MAX_TABLE_BYTES // 2**20} MB; not a cohort table")
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=sep, strict=True))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise NmosdError(f"cannot parse {path}: {exc}") from None
    except OSError as exc:
        raise NmosdError(f"cannot read {path}: {exc.strerror or exc}") from None
    numbered = [(i, r) for i, r in enumerate(rows, start=1) if any(c.strip() for c in r)]
    if not numbered:
        raise NmosdError(f"cannot parse {path}: the table is empty")
    (_, header), body = numbered[0], numbered[1:]
    header = [c.strip() for c in header]
    for line, r in body:
        if len(r) != len(header):
            what = "tab" if sep == "\t" else "comma"
            raise NmosdError(
                f"{path} line {line} has {len(r)} cells but the header has {len(header)}: the "
                f"columns would shift (a stray or missing {what}?)"
            )
    dup = sorted(c for c, n in Counter(header).items() if n > 1)
    if dup or "" in header:
        raise NmosdError(f"{path}: the header has empty or repeated column names")
    return pd.DataFrame([r for _, r in body], columns=header, dtype=str)


def _check_ids(ids: list[str], where: Path) -> None:
    for i in ids:
        validate_participant_id(i, str(where))
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise NmosdError(f"{where}: duplicate participant_id {', '.join(dup)}")


def _require_columns(df: pd.DataFrame, cols: list[str], where: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise NmosdError(f"{where}: missing column(s) {', '.join(missing)}")


def _existing(path: Path, what: str, pid: str) -> Path:
    return regular_file(path, f"participant {pid}: {what}")


def load_manifest(path: str | Path, labelled: bool = True) -> Cohort:
    """Read a ``.tsv``/``.csv`` manifest: participant_id, diagnosis, flair, lesion_mask[, brain_mask].

    Paths are relative to the manifest. An empty ``flair`` cell means mask-only data; an empty
    ``lesion_mask`` cell is only usable with WMH segmentation (``prepare --segment-missing``).
    With ``labelled=False`` (new patients to predict) there is no diagnosis column, and either
    image column may be absent; subjects get an empty diagnosis.
    """
    path = Path(path)
    regular_file(path, "manifest")
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
    if not table.exists():
        raise NmosdError(f"{root} is not a BIDS folder: participants.tsv not found")
    df = _read_table(table)
    _require_columns(df, ["participant_id", label_column], table)
    ids = [str(v).strip() for v in df["participant_id"]]
    _check_ids(ids, table)
    for pid in ids:
        if not _BIDS_SUBJECT.fullmatch(pid):
            raise NmosdError(
                f"{table}: participant_id '{pid}' is not a BIDS subject label "
                "(sub-<letters and digits>)"
            )
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
