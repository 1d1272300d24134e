"""BIDS derivative datasets: the one owner of what ``segment``, ``prepare --segment-missing`` and
``predict`` write in BIDS form.

Layout (BIDS-Derivatives; validated by the reference BIDS validator in the tests)::

    OUT/dataset_description.json   DatasetType "derivative", GeneratedBy: nmosd-ms, its version
                                   and (predict) the model bundle
    OUT/README.md                  what the files are
    OUT/participants.tsv           the participants written
    OUT/.bidsignore                the review montages (PNG), which BIDS does not name
    OUT/sub-X/[ses-Y/]anat/sub-X[_ses-Y]_space-orig_label-WMH_mask.nii.gz (+ .json)
    OUT/sub-X/[ses-Y/]anat/sub-X[_ses-Y]_space-orig_desc-saliency_FLAIR.nii.gz (+ .json)
    OUT/phenotype/predictions.tsv (+ .json)   one row per participant[-session]

``space-orig`` means the grid of the input FLAIR (or lesion mask); each image's sidecar names
that file (``SpatialReference``) and says what the values mean. Participant IDs that are not
BIDS labels (``Patient.01`` from a manifest) become ``sub-Patient01``; two IDs that would give
one label are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .constants import __version__
from .errors import NmosdError
from .io import inside, write_json, write_text, write_tsv

BIDS_VERSION = "1.9.0"
#: The files that describe a dataset (not data files).
DESCRIPTION_FILES = ("dataset_description.json", "README.md", ".bidsignore", "participants.tsv")
#: Where per-participant tables go in a BIDS dataset.
TABLES = "phenotype"
_LABEL = re.compile(r"[A-Za-z0-9]+")


def montage_path(image: Path) -> Path:
    """The review montage of ``image``: ``<name>.png`` beside ``<name>.nii[.gz]`` (a WMH mask or a
    saliency map). The one rule for that name: the writers and the pages that link to it use it."""
    return _beside(image, ".png")


def sidecar_path(image: Path) -> Path:
    """The JSON sidecar of ``image``: ``<name>.json`` beside ``<name>.nii[.gz]``."""
    return _beside(image, ".json")


def _beside(image: Path, extension: str) -> Path:
    return image.with_name(image.name.removesuffix(".gz").removesuffix(".nii") + extension)


README = """# {name}

A BIDS derivative dataset written by nmosd-ms {version} ({what}).

- `sub-*/[ses-*/]anat/*_space-orig_label-WMH_mask.nii.gz`: white-matter-hyperintensity masks
  (1 = lesion) on the grid of the input FLAIR, which each JSON sidecar names.
- `sub-*/[ses-*/]anat/*_space-orig_desc-saliency_FLAIR.nii.gz`: occlusion saliency on the input
  grid (see the sidecar for what the values mean).
- `phenotype/predictions.tsv`: P(NMOSD) per participant (and session), described column by
  column in `phenotype/predictions.json`.
- `*.png`: review montages (listed in `.bidsignore`).

Research use only; not for diagnosis.
"""


def bids_label(participant_id: str) -> str:
    """``sub-01`` -> ``01``; ``Patient.01`` -> ``Patient01`` (letters and digits only)."""
    label = re.sub(r"[^A-Za-z0-9]", "", participant_id.removeprefix("sub-"))
    if not label:
        raise NmosdError(f"participant {participant_id}: no letters or digits for a BIDS label")
    return label


class DerivativeDataset:
    """A BIDS derivative dataset being written at ``root`` (created if needed)."""

    def __init__(self, root: str | Path, name: str, what: str, generated_by: dict | None = None):
        self.root = Path(root)
        self.name = name
        self.what = what
        self.generated_by = {"Name": "nmosd-ms", "Version": __version__, **(generated_by or {})}
        self._labels: dict[str, str] = {}  # BIDS label -> participant_id it came from

    def start(self) -> DerivativeDataset:
        """Write the dataset's description files (kept when they exist)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / "dataset_description.json").is_file():
            write_json(
                self.root / "dataset_description.json",
                {
                    "Name": self.name,
                    "BIDSVersion": BIDS_VERSION,
                    "DatasetType": "derivative",
                    "GeneratedBy": [self.generated_by],
                    "Authors": ["nmosd-ms"],
                    "License": "research use only",
                },
            )
        if not (self.root / "README.md").is_file():
            write_text(
                self.root / "README.md",
                README.format(name=self.name, version=__version__, what=self.what),
            )
        if not (self.root / ".bidsignore").is_file():
            write_text(self.root / ".bidsignore", "*.png\n")
        return self

    def label(self, participant_id: str) -> str:
        label = bids_label(participant_id)
        other = self._labels.setdefault(label, participant_id)
        if other != participant_id:
            raise NmosdError(
                f"participants {other} and {participant_id} would both be sub-{label} in the "
                "BIDS output; give IDs that differ in their letters or digits"
            )
        return label

    def path(
        self,
        participant_id: str,
        session_id: str,
        suffix: str,
        extension: str = ".nii.gz",
        **entities: str,
    ) -> Path:
        """The file ``sub-X[_ses-Y][_key-value...]_suffix.ext`` in its folder (checked to stay
        inside the dataset)."""
        sub = f"sub-{self.label(participant_id)}"
        parts = [sub]
        folders = [sub]
        if session_id:
            ses = f"ses-{bids_label(session_id.removeprefix('ses-'))}"
            parts.append(ses)
            folders.append(ses)
        for key in ("space", "label", "desc"):  # BIDS entity order
            if entities.get(key):
                parts.append(f"{key}-{bids_label(entities[key])}")
        name = "_".join(parts) + f"_{suffix}{extension}"
        return inside(self.root, *folders, "anat", name)

    def sidecar(self, image: Path, fields: dict) -> Path:
        """The JSON sidecar of ``image`` (same name, ``.json``)."""
        path = sidecar_path(image)
        write_json(inside(self.root, path.relative_to(self.root)), fields)
        return path

    def write_participants(self, participant_ids: list[str]) -> None:
        """``participants.tsv``: every participant written (BIDS labels)."""
        rows = sorted({f"sub-{self.label(p)}" for p in participant_ids})
        write_tsv(self.root / "participants.tsv", pd.DataFrame({"participant_id": rows}))

    def write_table(self, name: str, table: pd.DataFrame, columns: dict[str, str], meta: dict):
        """``phenotype/<name>.tsv`` keyed by participant_id[, session_id] (BIDS labels), with a
        sidecar describing each column (``columns``) and the table (``meta``)."""
        table = table.copy()
        table["participant_id"] = [f"sub-{self.label(p)}" for p in table["participant_id"]]
        if "session_id" in table:
            table["session_id"] = [
                f"ses-{bids_label(s.removeprefix('ses-'))}" if s else "n/a"
                for s in table["session_id"]
            ]
        described = {c: {"Description": columns.get(c, c)} for c in table.columns}
        write_tsv(inside(self.root, TABLES, f"{name}.tsv"), table)
        sidecar = {"MeasurementToolMetadata": meta, **described}
        write_json(inside(self.root, TABLES, f"{name}.json"), sidecar)
        return self.root / TABLES / f"{name}.tsv"

    @staticmethod
    def table_path(name: str) -> Path:
        """Where :meth:`write_table` puts table ``name``, relative to the dataset."""
        return Path(TABLES) / f"{name}.tsv"


def wmh_sidecar(source: Path | None, method: str) -> dict:
    """What a WMH mask's sidecar says."""
    fields = {
        "Description": "white-matter hyperintensity mask (1 = lesion) on the input's grid",
        "Type": "Lesion",
        "Method": method,
    }
    if source is not None:
        fields["SpatialReference"] = Path(source).resolve().as_uri()
        fields["Sources"] = [Path(source).resolve().as_uri()]
    return fields
