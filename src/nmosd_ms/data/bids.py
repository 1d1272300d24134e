"""Reading a BIDS dataset into a :class:`~.ingest.Cohort`, with pybids.

One subject per participant and session (``ses-*``; datasets without sessions give one per
participant). For each, exactly one FLAIR (``anat/*_FLAIR.nii[.gz]``) must remain after the
user's entity filters (``acq=3D``, ``run=1``, ...); its lesion mask is looked up in the lesion
derivatives (``derivatives/<lesions>``): a ``mask`` whose ``label`` or ``desc`` entity is
``lesion`` (``sub-01_label-lesion_mask.nii.gz``, ``sub-01_space-orig_desc-lesion_mask.nii.gz``),
or any ``mask`` whose JSON sidecar says ``"Type": "Lesion"``. A mask that carries an acquisition
entity (``acq``, ``ce``, ``rec``, ``run``) must carry the FLAIR's value (derivatives inherit their
source's entities); so must its ``space``, if any, be ``orig`` (the FLAIR's grid). The optional
brain mask is a ``desc-brain`` or ``label-brain`` mask, in the derivatives or beside the FLAIR.

We use pybids (the BIDS community's maintained reader) rather than globbing: it knows the entity
grammar, sessions, inheritance of sidecars and the derivatives' own descriptions. Indexing 88
subjects takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import NmosdError
from .ingest import (
    BIDS_SUBJECT,
    Cohort,
    Subject,
    check_ids,
    normalise_label,
    read_table,
    require_columns,
)

#: Short entity names (as in file names) -> pybids' names.
ENTITIES = {
    "sub": "subject",
    "ses": "session",
    "acq": "acquisition",
    "ce": "ceagent",
    "rec": "reconstruction",
    "run": "run",
    "echo": "echo",
    "part": "part",
    "inv": "inv",
    "space": "space",
    "desc": "desc",
    "label": "label",
}
#: Entities of an acquisition: a derivative that carries one must carry its source's value.
ACQUISITION_ENTITIES = ("acquisition", "ceagent", "reconstruction", "run", "echo", "part", "inv")
QUERIES = ("flair", "lesion_mask", "brain_mask")
NIFTI = [".nii", ".nii.gz"]


def parse_bids_filters(values: list[str] | None = None, file: str | Path | None = None) -> dict:
    """Entity filters per query, from ``values`` (``KEY=VALUE`` strings, applied to the FLAIR
    query) and/or ``file`` (a JSON file like fMRIPrep's ``--bids-filter-file``): ``{"flair": {"acq": "3D"}, "lesion_mask":
    {"desc": "manual"}}``. Keys are BIDS entity names, short (``acq``) or long
    (``acquisition``). Returns ``{query: {pybids entity: value}}``."""
    out: dict[str, dict] = {q: {} for q in QUERIES}
    if file is not None:
        path = Path(file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise NmosdError(f"cannot read the BIDS filter file {path}: {exc}") from None
        if not isinstance(data, dict) or not set(data) <= set(QUERIES):
            raise NmosdError(
                f"{path}: a BIDS filter file maps {', '.join(QUERIES)} to entity filters"
            )
        for query, filters in data.items():
            if not isinstance(filters, dict):
                raise NmosdError(f"{path}: '{query}' must map entity names to values")
            for key, value in filters.items():
                out[query][_entity(key)] = _value(value, key)
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise NmosdError(f"a BIDS filter is KEY=VALUE (like acq=3D), not '{item}'")
        out["flair"][_entity(key.strip())] = value.strip()
    return out


def _entity(key: str) -> str:
    name = ENTITIES.get(key, key)
    if name not in ENTITIES.values() or name in ("subject", "session"):
        allowed = ", ".join(k for k in ENTITIES if k not in ("sub", "ses"))
        raise NmosdError(f"unknown or unsupported BIDS filter entity '{key}' (use {allowed})")
    return name


def _value(value, key: str):
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    raise NmosdError(f"BIDS filter {key}: give a string or a list of strings")


def _describe(filters: dict) -> str:
    short = {v: k for k, v in ENTITIES.items()}
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in filters.items())


def load_bids(
    root: str | Path,
    lesions: str = "lesions",
    label_column: str = "diagnosis",
    require_lesion_masks: bool = True,
    filters: dict | None = None,
) -> Cohort:
    """Read a BIDS dataset (see the module docstring for what is looked up, and where).

    Parameters
    ----------
    root : path
        The BIDS dataset (``participants.tsv``, ``dataset_description.json``, ``sub-*``).
    lesions : str
        The derivatives pipeline that holds the lesion masks (``derivatives/<lesions>``).
    label_column : str
        The participants.tsv column with the diagnosis (NMOSD or MS); other columns are kept
        in ``Cohort.extra["participants"]``.
    require_lesion_masks : bool
        Refuse a participant-session without a lesion mask (set False when the missing masks
        are to be segmented from the FLAIR).
    filters : dict, optional
        ``{query: {entity: value}}`` from :func:`parse_bids_filters`, to choose among several FLAIRs
        or masks.

    Returns a :class:`Cohort` with one :class:`Subject` per participant and session.
    """
    root = Path(root)
    filters = filters or {q: {} for q in QUERIES}
    table = root / "participants.tsv"
    if not table.exists():
        raise NmosdError(f"{root} is not a BIDS folder: participants.tsv not found")
    df = read_table(table)
    require_columns(df, ["participant_id", label_column], table)
    ids = [str(v).strip() for v in df["participant_id"]]
    check_ids(ids, table)
    for pid in ids:
        if not BIDS_SUBJECT.fullmatch(pid):
            raise NmosdError(
                f"{table}: participant_id '{pid}' is not a BIDS subject label "
                "(sub-<letters and digits>)"
            )
    deriv = root / "derivatives" / lesions
    if require_lesion_masks and not deriv.is_dir():
        raise NmosdError(
            f"lesion derivatives folder not found: {deriv} (name the derivatives pipeline "
            "that holds the lesion masks, or segment the missing masks from the FLAIRs)",
            option="lesions",
        )
    layout = _layout(root, deriv if deriv.is_dir() else None)
    _check_filters_match(layout, filters, root)
    subjects = []
    for pid, value in zip(ids, df[label_column], strict=True):
        label = normalise_label(value, pid, label_column)
        sub = pid.removeprefix("sub-")
        sessions = sorted(layout.get_sessions(subject=sub, scope="raw")) or [None]
        for ses in sessions:
            subjects.append(
                _subject(layout, pid, sub, ses, label, filters, require_lesion_masks, deriv)
            )
    extra = {
        "lesions": lesions,
        "participants": df.set_index("participant_id").to_dict("index"),
        "filters": {q: f for q, f in filters.items() if f},
    }
    return Cohort(tuple(subjects), source=str(root.resolve()), extra=extra)


def _layout(root: Path, deriv: Path | None):
    import logging

    from bids import BIDSLayout

    logging.getLogger("bids").setLevel(logging.ERROR)
    if not (root / "dataset_description.json").is_file():
        raise NmosdError(f"{root} is not a BIDS folder: dataset_description.json not found")
    try:
        return BIDSLayout(root, validate=False, derivatives=[str(deriv)] if deriv else False)
    except Exception as exc:  # pybids raises several types (validation, JSON, value errors)
        msg = " ".join(str(exc).split())[:200]
        raise NmosdError(f"{root}: not a readable BIDS dataset ({msg})") from None


def _check_filters_match(layout, filters: dict, root: Path) -> None:
    """A filter that matches no file anywhere is a typo, not a choice: refuse it by name."""
    flair = filters.get("flair") or {}
    if flair and not layout.get(
        scope="raw", suffix="FLAIR", extension=NIFTI, return_type="filename", **flair
    ):
        raise NmosdError(f"{root}: no FLAIR matches the BIDS filter {_describe(flair)}")


def _files(layout, scope: str, **query) -> list[Path]:
    from bids.layout import Query

    query = {k: (Query.NONE if v is None else v) for k, v in query.items()}
    return sorted({Path(f) for f in layout.get(scope=scope, return_type="filename", **query)})


def _where(pid: str, ses: str | None) -> str:
    return f"participant {pid}" + (f" session ses-{ses}" if ses else "")


def _subject(layout, pid, sub, ses, label, filters, require_lesion_masks, deriv) -> Subject:
    where = _where(pid, ses)
    common = {"subject": sub, "session": ses, "extension": NIFTI}
    flairs = _files(layout, "raw", suffix="FLAIR", datatype="anat", **common, **filters["flair"])
    if not flairs:
        raise NmosdError(f"{where}: no FLAIR (anat/*_FLAIR.nii.gz) matches")
    if len(flairs) > 1:
        names = ", ".join(f.name for f in flairs)
        raise NmosdError(
            f"{where}: {len(flairs)} FLAIRs match ({names}); choose one with a BIDS filter "
            "(e.g. acq=3D)"
        )
    flair = flairs[0]
    source = layout.get_file(str(flair)).get_entities()
    lesion = _mask(layout, common, source, "lesion", filters["lesion_mask"], where)
    if lesion is None and require_lesion_masks:
        raise NmosdError(
            f"{where}: no lesion mask for {flair.name} in {deriv} (label-lesion or desc-lesion "
            "mask, or a mask whose sidecar says Type Lesion; or segment the missing masks "
            "from the FLAIR)",
            option="segment_missing",
        )
    brain = _mask(layout, common, source, "brain", filters["brain_mask"], where)
    return Subject(pid, label, flair, lesion, brain, session_id=f"ses-{ses}" if ses else "")


def _mask(layout, common, source, kind, extra, where) -> Path | None:
    """The one mask of ``kind`` (lesion, brain) that fits the FLAIR whose entities are
    ``source``; None when there is none; an error when several fit."""
    found: set[Path] = set()
    for entity in ("label", "desc"):
        found |= set(_files(layout, "all", suffix="mask", **{entity: kind}, **common, **extra))
    if kind == "lesion":  # masks named otherwise whose sidecar says what they are
        for f in _files(layout, "all", suffix="mask", **common, **extra):
            if str(layout.get_metadata(str(f)).get("Type", "")).lower() == "lesion":
                found.add(f)
    fitting = []
    for f in sorted(found):
        ent = layout.get_file(str(f)).get_entities()
        if any(e in ent and ent[e] != source.get(e) for e in ACQUISITION_ENTITIES):
            continue  # the mask of another acquisition
        if ent.get("space") not in (None, "orig"):
            continue  # on another grid (a template space)
        fitting.append(f)
    if len(fitting) > 1:
        names = ", ".join(f.name for f in fitting)
        raise NmosdError(
            f"{where}: {len(fitting)} {kind} masks fit ({names}); choose one with a BIDS filter "
            "file"
        )
    return fitting[0] if fitting else None
