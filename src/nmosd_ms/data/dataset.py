"""Which reader a dataset needs: a BIDS folder (:mod:`.bids`) or a manifest table
(:mod:`.ingest`), and the checks every cohort passes whatever its reader."""

from __future__ import annotations

from pathlib import Path

from ..errors import NmosdError
from .bids import load_bids
from .ingest import Cohort, load_manifest


def load_cohort(
    dataset: str | Path,
    lesions: str = "lesions",
    label_column: str = "diagnosis",
    require_lesion_masks: bool = True,
    filters: dict | None = None,
) -> Cohort:
    """A labelled cohort from a BIDS folder or a manifest file, whichever ``dataset`` is.

    Parameters
    ----------
    dataset : path
        A BIDS folder (:func:`load_bids`) or a ``.tsv``/``.csv`` manifest (:func:`load_manifest`).
    lesions : str
        BIDS only: the derivatives pipeline that holds the lesion masks.
    label_column : str
        BIDS only: the participants.tsv column with the diagnosis (NMOSD or MS).
    require_lesion_masks : bool
        Refuse subjects without a lesion mask (set False when they are to be segmented).
    filters : dict, optional
        BIDS only: entity filters (:func:`nmosd_ms.data.bids.parse_bids_filters`).
    """
    dataset = Path(dataset)
    if dataset.is_dir():
        cohort = load_bids(dataset, lesions, label_column, require_lesion_masks, filters)
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
                    f"participant {s.participant_id}: no lesion mask (give one, or segment "
                    "the missing masks from the FLAIR)",
                    option="segment_missing",
                )
    return cohort
