"""Cohort ingestion: a BIDS folder or a manifest table becomes a validated :class:`Cohort`.

Only the structure is checked here (files, identifiers, labels); image contents are checked when
they are read (:mod:`nmosd_ms.nifti`), still before anything is written.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..constants import LABELS
from ..errors import NmosdError
from ..ids import (  # noqa: F401 (validate_participant_id and scan_key are used from here)
    BIDS_SUBJECT,
    MAX_ID_LENGTH,
    scan_key,
    validate_participant_id,
    validate_session_id,
)
from ..io import regular_file

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Subject:
    """One scan of one person: a participant, optionally a session (``ses-<label>``), the
    diagnosis ("NMOSD", "MS", or "" for prediction) and the image files."""

    participant_id: str
    diagnosis: str  # "NMOSD" or "MS"
    flair: Path | None
    lesion_mask: Path | None
    brain_mask: Path | None = None
    session_id: str = ""

    def __post_init__(self) -> None:
        validate_participant_id(self.participant_id)
        validate_session_id(self.session_id, self.participant_id)

    @property
    def key(self) -> str:
        """The scan's unique name (``sub-01`` or ``sub-01_ses-02``): names its files."""
        return scan_key(self.participant_id, self.session_id)

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


def read_table(path: Path) -> pd.DataFrame:
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


def check_ids(ids: list[str], where: Path, sessions: list[str] | None = None) -> None:
    """Every ID safe, and every participant (with a session: every participant-session) once."""
    for i in ids:
        validate_participant_id(i, str(where))
    keys = [scan_key(i, s) for i, s in zip(ids, sessions or [""] * len(ids), strict=True)]
    dup = sorted(i for i, n in Counter(keys).items() if n > 1)
    if dup:
        what = "participant_id and session_id" if sessions else "participant_id"
        raise NmosdError(f"{where}: duplicate {what} {', '.join(dup)}")


def require_columns(df: pd.DataFrame, cols: list[str], where: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise NmosdError(f"{where}: missing column(s) {', '.join(missing)}")


def _existing(path: Path, what: str, pid: str) -> Path:
    return regular_file(path, f"participant {pid}: {what}")


def load_manifest(path: str | Path, labelled: bool = True) -> Cohort:
    """Read a ``.tsv``/``.csv`` manifest: participant_id, diagnosis, flair, lesion_mask[, brain_mask]
    [, session_id] (``ses-<label>``: one row per participant and session).

    Paths are relative to the manifest. An empty ``flair`` cell means mask-only data; an empty
    ``lesion_mask`` cell is only usable with WMH segmentation (``prepare --segment-missing``).
    With ``labelled=False`` (new patients to predict) there is no diagnosis column, and either
    image column may be absent; subjects get an empty diagnosis.

    Parameters
    ----------
    path : path
        The manifest; every ID is validated (it names files later) and every path must exist.
    labelled : bool
        Whether the manifest must have a diagnosis column.
    """
    path = Path(path)
    regular_file(path, "manifest")
    df = read_table(path)
    if labelled:
        require_columns(df, ["participant_id", "diagnosis", "flair", "lesion_mask"], path)
    elif "participant_id" not in df.columns or not {"lesion_mask", "flair"} & set(df.columns):
        raise NmosdError(f"{path}: needs participant_id and lesion_mask (or flair) columns")
    ids = [str(v).strip() for v in df["participant_id"]]
    sessions = [str(v).strip() for v in df["session_id"]] if "session_id" in df.columns else None
    check_ids(ids, path, sessions)
    base = path.parent
    subjects = []
    for i, (pid, (_, row)) in enumerate(zip(ids, df.iterrows(), strict=True)):
        label = normalise_label(row["diagnosis"], pid, "diagnosis") if labelled else ""

        def opt(col: str, what: str, pid: str = pid, row=row) -> Path | None:
            cell = str(row.get(col, "") or "").strip()
            return _existing((base / cell).resolve(), what, pid) if cell else None

        flair = opt("flair", "FLAIR")
        lesion = opt("lesion_mask", "lesion mask")
        brain = opt("brain_mask", "brain mask")
        if flair is None and lesion is None:
            raise NmosdError(f"participant {pid}: neither a FLAIR nor a lesion mask is given")
        session = sessions[i] if sessions else ""
        subjects.append(Subject(pid, label, flair, lesion, brain, session_id=session))
    return Cohort(tuple(subjects), source=str(path.resolve()))


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
